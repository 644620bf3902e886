// How a partition's layers run on one cell's bundle: the main inputs go to
// its first layer (one tensor or a list, as the previous partition returned
// them), the skips it pops wait in a skip frame for the layers that pop them,
// and the skips it stashes for later partitions follow its outputs.
#pragma once

#include <gpipe/detail/bundle.h>
#include <gpipe/detail/cell_context.h>
#include <gpipe/detail/pipe_call.h>
#include <gpipe/detail/skip_frame.h>
#include <gpipe/detail/skip_layout.h>

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/types.h>

#include <string>
#include <utility>
#include <vector>

namespace gpipe::detail {

/// "partition 2 on micro-batch 5".
inline std::string where_is(const CellIndex& cell) {
  return cell_name(cell.partition, cell.microbatch);
}

/// Moves the skips the partition stashed for later partitions from
/// `frame` to the end of `outputs`; every declared stash and pop must
/// have happened.
inline void take_outgoing_skips(
    SkipFrame& frame,
    Bundle& outputs,
    const PartitionSkips* skips,
    const std::string& where) {
  if (skips != nullptr) {
    for (const auto& name : skips->outgoing) {
      const auto found = frame.available.find(name);
      TORCH_CHECK(
          found != frame.available.end(),
          "gpipe: skip '",
          name,
          "' was not stashed in ",
          where,
          ", although a layer there declares it (a declared stash must ",
          "happen on every micro-batch)");
      outputs.push_back(std::move(found->second));
      frame.available.erase(found);
    }
  }
  if (!frame.available.empty()) {
    std::vector<std::string> left;
    for (const auto& entry : frame.available) {
      left.push_back("'" + entry.first + "'");
    }
    TORCH_CHECK(
        false,
        "gpipe: skip ",
        c10::Join(", ", left),
        " was not popped in ",
        where,
        ", although a layer there declares it (a declared pop must ",
        "happen on every micro-batch)");
  }
}

/// `partition`'s layers applied to `fed` (main inputs, then incoming
/// skips); returns its outputs (main, then outgoing skips).
inline Bundle run_layers(
    torch::nn::SequentialImpl& partition,
    const Bundle& fed,
    bool input_is_list,
    const PartitionSkips* skips,
    const CellIndex& cell,
    PipeCall& call) {
  const std::string where = where_is(cell);
  const size_t incoming = skips == nullptr ? 0 : skips->incoming.size();
  TORCH_INTERNAL_ASSERT(
      fed.size() > incoming,
      "gpipe: ",
      where,
      " has no input besides its skips");
  const size_t main = fed.size() - incoming;
  SkipFrame frame;
  frame.partition = cell.partition;
  frame.microbatch = cell.microbatch;
  for (size_t k = 0; k < incoming; ++k) {
    frame.available.emplace(skips->incoming[k], fed[main + k]);
    frame.versions.emplace(skips->incoming[k], fed[main + k]._version());
  }
  Value out;
  {
    SkipFrameGuard current(&frame);
    torch::nn::AnyValue value =
        any_value_of(Bundle(fed.begin(), fed.begin() + main), input_is_list);
    for (auto& layer : partition) {
      value = layer.any_forward(std::move(value));
    }
    out = value_of(std::move(value), where);
  }
  call.learn_output_kind(cell.partition, out.is_list, where);
  for (size_t k = 0; k < out.tensors.size(); ++k) {
    TORCH_CHECK(
        out.tensors[k].defined(),
        "gpipe: ",
        where,
        " returned an undefined tensor (output ",
        k,
        ")");
  }
  take_outgoing_skips(frame, out.tensors, skips, where);
  return std::move(out.tensors);
}

} // namespace gpipe::detail
