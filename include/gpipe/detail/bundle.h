// Several tensors between stages: what one layer hands the next.
//
// Sequential chains any value (an AnyValue) from one module to the next.
// The pipe has to split that value into micro-batches, move it between
// devices and gather it again, so it must see its tensors. Two spellings are
// supported: a `torch::Tensor`, and a `std::vector<torch::Tensor>`, the one
// spelling of any arity the pipe can take apart without knowing the count
// when it is compiled (a `std::tuple` of n tensors is a different type for
// every n, and an AnyValue only answers "is it exactly this type?"). Inside
// the pipe both are a Bundle: a single tensor is a bundle of one that
// remembers it was not a list.
#pragma once

#include <gpipe/detail/microbatch.h>

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>
#include <torch/nn/modules/container/any_value.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace gpipe::detail {

/// The tensors that travel together: a stage's inputs or outputs.
using Bundle = std::vector<torch::Tensor>;

/// A bundle and the spelling it had: one tensor, or a list.
struct Value {
  Bundle tensors;
  bool is_list = false;
};

inline Value value_of(const torch::Tensor& tensor) {
  return {{tensor}, false};
}

inline Value value_of(const std::vector<torch::Tensor>& tensors) {
  return {tensors, true};
}

/// Back to the spelling a module takes: a Tensor or a list of them.
inline torch::nn::AnyValue any_value_of(const Bundle& tensors, bool is_list) {
  if (is_list) {
    return torch::nn::AnyValue(std::vector<torch::Tensor>(tensors));
  }
  TORCH_INTERNAL_ASSERT(
      tensors.size() == 1, "gpipe: one tensor, got ", tensors.size());
  return torch::nn::AnyValue(tensors.front());
}

/// The tensors a layer returned; anything but a Tensor or a list of them
/// is an error that names `where` and the type.
inline Value value_of(torch::nn::AnyValue&& value, const std::string& where) {
  if (auto* tensor = value.try_get<torch::Tensor>()) {
    return {{std::move(*tensor)}, false};
  }
  if (auto* list = value.try_get<std::vector<torch::Tensor>>()) {
    return {std::move(*list), true};
  }
  TORCH_CHECK(
      false,
      "gpipe: ",
      where,
      " returned a value of type ",
      value.type_info().name(),
      "; a pipe carries a torch::Tensor or a std::vector<torch::Tensor> "
      "between layers (return several tensors as a std::vector)");
  return {};
}

/// Checks an input bundle: not empty, every tensor defined with a batch
/// dimension of the same size as the first.
inline void check_bundle(const Bundle& tensors, const char* what) {
  TORCH_CHECK(
      !tensors.empty(), "gpipe: ", what, " is an empty list of tensors");
  check_batch(tensors.front(), what);
  for (size_t k = 1; k < tensors.size(); ++k) {
    const auto& t = tensors[k];
    TORCH_CHECK(t.defined(), "gpipe: ", what, " tensor ", k, " is undefined");
    TORCH_CHECK(
        t.dim() >= 1 && t.size(0) == tensors.front().size(0),
        "gpipe: every tensor of the ",
        what,
        " is split along dimension 0 into micro-batches, so all need the "
        "same batch size (",
        what,
        " tensor 0 shape: ",
        tensors.front().sizes(),
        ", tensor ",
        k,
        " shape: ",
        t.sizes(),
        "); expand a tensor shared by the whole batch (a view, no copy) or "
        "keep it in the module");
  }
}

/// The batch of each micro-batch: per micro-batch, one slice of every
/// tensor (tensor_split, so every tensor is cut at the same rows).
inline std::vector<Bundle> scatter_bundle(const Bundle& tensors, int64_t m) {
  std::vector<Bundle> pieces(static_cast<size_t>(m));
  for (const auto& t : tensors) {
    auto slices = torch::tensor_split(t, m, /*dim=*/0);
    for (size_t i = 0; i < pieces.size(); ++i) {
      pieces[i].push_back(std::move(slices[i]));
    }
  }
  return pieces;
}

/// Per tensor index, the micro-batch outputs concatenated in order.
inline Bundle gather_bundle(const std::vector<Bundle>& outputs) {
  Bundle gathered;
  const size_t width = outputs.front().size();
  for (size_t i = 0; i < outputs.size(); ++i) {
    TORCH_CHECK(
        outputs[i].size() == width,
        "gpipe: micro-batch ",
        i,
        " returned ",
        outputs[i].size(),
        " tensors, but micro-batch 0 returned ",
        width,
        "; a pipe gathers the outputs tensor by tensor");
  }
  for (size_t k = 0; k < width; ++k) {
    std::vector<torch::Tensor> column;
    column.reserve(outputs.size());
    for (const auto& bundle : outputs) {
      column.push_back(bundle[k]);
    }
    gathered.push_back(
        column.size() == 1 ? column.front() : torch::cat(column, /*dim=*/0));
  }
  return gathered;
}

/// Shapes of a bundle, for messages: "[2, 3], [2]".
inline std::string shapes_of(const Bundle& tensors) {
  std::vector<std::string> shapes;
  for (const auto& t : tensors) {
    shapes.push_back(
        t.defined() ? c10::str(t.sizes()) : std::string("undefined"));
  }
  return c10::Join(", ", shapes);
}

} // namespace gpipe::detail
