// The stages of a pipe in one process: every stage is here, tensors move
// between devices on side streams (transport.h), timed as copies when a
// timeline records, and a cell under `forward()` is one autograd node of
// the caller's graph (stage_function.h).
#pragma once

#include <gpipe/detail/bundle.h>
#include <gpipe/detail/cell_context.h>
#include <gpipe/detail/executor.h>
#include <gpipe/detail/pipe_call.h>
#include <gpipe/detail/skip_layout.h>
#include <gpipe/detail/stage_function.h>
#include <gpipe/detail/stage_host.h>
#include <gpipe/detail/transport.h>
#include <gpipe/timeline.h>

#include <torch/types.h>

#include <cstdint>
#include <memory>

namespace gpipe::detail {

/// The executor's channels for the routes of `layout`, one per route.
inline SkipChannels skip_channels(const SkipLayout& layout) {
  SkipChannels channels;
  if (layout.empty()) {
    return channels;
  }
  channels.incoming.resize(layout.partitions.size());
  channels.outgoing.resize(layout.partitions.size());
  for (size_t r = 0; r < layout.routes.size(); ++r) {
    const auto& route = layout.routes[r];
    const auto channel = static_cast<int64_t>(r + 1);
    channels.outgoing[static_cast<size_t>(route.from)].push_back(
        {channel, route.to, route.name});
    channels.incoming[static_cast<size_t>(route.to)].push_back(
        {channel, route.from, route.name});
  }
  return channels;
}

class LocalStages final : public StageHost {
 public:
  /// `x` moved to stage j's device for micro-batch i (a recorded copy when
  /// it has to travel).
  torch::Tensor receive(const torch::Tensor& x, int64_t i, int64_t j) override {
    const auto& device = device_of[static_cast<size_t>(j)];
    if (x.device() == device) {
      return x;
    }
    return with_cell_context({i, j}, "copy", [&] {
      if (!timeline) {
        return transport_.send(x, device);
      }
      // Timed on the copy stream, where the copy runs.
      size_t token = 0;
      Timeline* recorder = timeline.get();
      const CopyHooks hooks{
          [&] { token = recorder->begin(j, i, Phase::Copy, device); },
          [&] { recorder->end(token); }};
      return transport_.send(x, device, &hooks);
    });
  }

  /// Cell (i, j) as one autograd node (Note [A cell is one autograd
  /// node]), or plainly when no gradient can flow through it.
  Bundle run_cell(
      int64_t i,
      int64_t j,
      bool checkpointed,
      const Bundle& x,
      const std::shared_ptr<PipeCall>& call,
      bool needs_graph) const {
    if (!needs_graph) {
      return run_without_graph(i, j, x, call);
    }
    auto state = make_state(i, j, checkpointed, call);
    Bundle out = with_cell_context({i, j}, "forward", [&] {
      // As TensorLists: apply() finds the tensors that require grad among
      // arguments of that type only, not in a std::vector.
      return StageFunction::apply(
          state, at::TensorList(x), at::TensorList(call->parameters));
    });
    check_batch_kept(i, j, x, out, *call);
    return out;
  }

 private:
  LocalTransport transport_;
};

} // namespace gpipe::detail
