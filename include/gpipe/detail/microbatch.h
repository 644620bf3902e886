// Splitting a batch into micro-batches and gathering their outputs.
//
// torch::chunk can return fewer pieces than asked (a batch of 6 in 4 chunks
// gives 3), which is how torchgpipe's except_last came to checkpoint the wrong
// micro-batch. torch::tensor_split always returns exactly the number asked,
// sizes differing by at most one, so every count below is the real one.
#pragma once

#include <c10/util/Exception.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace gpipe::detail {

/// Checks that `input` has a non-empty batch dimension.
inline void check_batch(const torch::Tensor& input, const char* what) {
  TORCH_CHECK(input.defined(), "gpipe: ", what, " is an undefined tensor");
  TORCH_CHECK(
      input.dim() >= 1,
      "gpipe: ",
      what,
      " has no batch dimension (",
      what,
      " shape: ",
      input.sizes(),
      ")");
  TORCH_CHECK(
      input.size(0) >= 1,
      "gpipe: ",
      what,
      " has an empty batch (",
      what,
      " shape: ",
      input.sizes(),
      ")");
}

inline void check_microbatches(int64_t microbatches) {
  TORCH_CHECK(
      microbatches >= 1,
      "gpipe: microbatches must be at least 1 (microbatches: ",
      microbatches,
      ")");
}

/// min(microbatches, batch) pieces along dim 0, sizes differing by at most one.
inline std::vector<torch::Tensor> scatter(
    const torch::Tensor& input,
    int64_t microbatches) {
  check_microbatches(microbatches);
  check_batch(input, "input");
  return torch::tensor_split(
      input, std::min(microbatches, input.size(0)), /*dim=*/0);
}

/// The micro-batch outputs concatenated in order (no copy for one).
inline torch::Tensor gather(const std::vector<torch::Tensor>& outputs) {
  return outputs.size() == 1 ? outputs.front() : torch::cat(outputs, /*dim=*/0);
}

} // namespace gpipe::detail
