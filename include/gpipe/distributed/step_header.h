// What the first stage of a pipe across processes tells the rest of its
// pipeline before a step: the batch, the micro-batch count, whether the
// input is a list, and the step's signature (Note [Shapes are agreed once
// per batch shape]), as one int64 message.
#pragma once

#include <gpipe/detail/bundle.h>
#include <gpipe/detail/microbatch.h>
#include <gpipe/distributed/placement.h>
#include <gpipe/distributed/transport.h>

#include <c10/util/Exception.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

namespace gpipe::distributed::detail {

struct StepHeader {
  int64_t batch = 0;
  int64_t microbatches = 0;
  bool input_is_list = false;
  /// Equal for two steps whose inputs have the same dtypes, shapes and
  /// requires_grad, cut alike.
  int64_t signature = 0;

  /// The header of a step whose `input` is cut into `microbatches`.
  static StepHeader of(
      const gpipe::detail::Bundle& input,
      size_t microbatches,
      bool is_list) {
    StepHeader header;
    header.batch = input.front().size(0);
    header.microbatches = static_cast<int64_t>(microbatches);
    header.input_is_list = is_list;
    std::ostringstream signature;
    signature << header.batch << " " << microbatches << " " << is_list;
    for (const auto& tensor : input) {
      signature << " " << tensor.scalar_type() << tensor.sizes()
                << tensor.requires_grad();
    }
    header.signature =
        static_cast<int64_t>(std::hash<std::string>{}(signature.str()));
    return header;
  }

  /// [batch, micro-batches, input is a list, signature].
  torch::Tensor message() const {
    return torch::tensor(
        {batch, microbatches, static_cast<int64_t>(input_is_list), signature},
        torch::kInt64);
  }

  static StepHeader from(const torch::Tensor& message) {
    const auto* values = message.data_ptr<int64_t>();
    StepHeader header;
    header.batch = values[0];
    header.microbatches = values[1];
    header.input_is_list = values[2] == 1;
    header.signature = values[3];
    return header;
  }

  /// The last stage's target, checked against the header and split into
  /// its micro-batches; `input_rank` and `target_rank` name the ranks.
  std::vector<torch::Tensor> split_target(
      const torch::Tensor& target,
      const std::string& input_rank,
      const std::string& target_rank) const {
    gpipe::detail::check_batch(target, "target");
    TORCH_CHECK(
        target.size(0) == batch,
        "gpipe: target and input have different batch sizes (input on ",
        input_rank,
        ": ",
        batch,
        ", target on ",
        target_rank,
        ": ",
        target.size(0),
        ")");
    return torch::tensor_split(target, microbatches, /*dim=*/0);
  }
};

/// This step's header, as the first stage's rank makes it from the batch
/// (cutting `input` into at most `microbatches` `inputs`) and tells the
/// rest of the pipeline under control message `kind`.
inline StepHeader agree_step_header(
    ProcessGroupTransport& transport,
    const RankPlacement& placement,
    const gpipe::detail::Bundle& input,
    bool is_list,
    int64_t microbatches,
    std::vector<gpipe::detail::Bundle>& inputs,
    int64_t kind) {
  if (placement.my_stages.front() == 0) {
    gpipe::detail::check_bundle(input, "input");
    inputs = gpipe::detail::scatter_bundle(
        input, std::min(microbatches, input.front().size(0)));
    auto header = StepHeader::of(input, inputs.size(), is_list);
    tell_the_pipeline(transport, placement, header.message(), kind);
    return header;
  }
  auto message = StepHeader().message();
  transport.messages().recv_control(
      message,
      placement.rank_of_stage.front(),
      kind,
      "the batch size of this step");
  return StepHeader::from(message);
}

} // namespace gpipe::distributed::detail
