// The stages a pipe runs, as its cells see them: a pipe in one process hosts
// every stage, one rank of a pipe across processes only its own. Both pipes
// make a cell's state, run a cell without a graph and move tensors to a
// stage through this one class, so a change to what a cell is given (a tie,
// a new kind of stage) is made once for both.
#pragma once

#include <gpipe/detail/bundle.h>
#include <gpipe/detail/cell_context.h>
#include <gpipe/detail/observer.h>
#include <gpipe/detail/pipe_call.h>
#include <gpipe/detail/skip_layout.h>
#include <gpipe/detail/stage.h>
#include <gpipe/options.h>
#include <gpipe/schedule.h>
#include <gpipe/timeline.h>

#include <c10/util/Exception.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/types.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace gpipe::detail {

/// Whether `mode` re-materializes micro-batch i of m (in training).
inline bool checkpointed(Checkpoint mode, int64_t i, int64_t m) {
  switch (mode) {
    case Checkpoint::Never:
      return false;
    case Checkpoint::ExceptLast:
      return i < m - 1;
    case Checkpoint::Always:
      return true;
  }
  return false;
}

/// Options arrive from config files and casts: a value outside an enum is
/// an error naming the valid ones, never a silent choice of some default.
inline void check_modes(
    Checkpoint checkpoint,
    Schedule schedule,
    Reduction reduction) {
  const auto c = static_cast<int>(checkpoint);
  TORCH_CHECK(
      c >= static_cast<int>(Checkpoint::Never) &&
          c <= static_cast<int>(Checkpoint::Always),
      "gpipe: checkpoint is not a Checkpoint (value: ",
      c,
      "); use Checkpoint::Always, Checkpoint::ExceptLast or Checkpoint::Never");
  const auto s = static_cast<int>(schedule);
  TORCH_CHECK(
      s >= static_cast<int>(Schedule::FillDrain) &&
          s <= static_cast<int>(Schedule::Auto),
      "gpipe: schedule is not a Schedule (value: ",
      s,
      "); use Schedule::FillDrain, Schedule::OneFOneB, ",
      "Schedule::Interleaved1F1B, Schedule::ZeroBubbleH1, ",
      "Schedule::LoopedBFS, Schedule::InterleavedZeroBubble, ",
      "Schedule::ZeroBubbleV, Schedule::DualPipeV or Schedule::Auto");
  const auto r = static_cast<int>(reduction);
  TORCH_CHECK(
      r == static_cast<int>(Reduction::Mean) ||
          r == static_cast<int>(Reduction::Sum),
      "gpipe: loss_reduction is not a Reduction (value: ",
      r,
      "); use Reduction::Mean or Reduction::Sum");
}

/// Under micro-batching every tensor partition j hands on keeps the
/// batch in dimension 0; its last `skips` outputs travel per micro-batch
/// and need not.
inline void check_batch_kept(
    int64_t i,
    int64_t j,
    const Bundle& x,
    const Bundle& out,
    const PipeCall& call,
    size_t skips) {
  if (!call.split) {
    return;
  }
  const int64_t batch = x.front().size(0);
  for (size_t k = 0; k + skips < out.size(); ++k) {
    TORCH_CHECK(
        out[k].dim() >= 1 && out[k].size(0) == batch,
        "gpipe: partition ",
        j,
        " changed the batch dimension on micro-batch ",
        i,
        " (input shape: ",
        x.front().sizes(),
        ", output shape: ",
        out[k].sizes(),
        out.size() - skips > 1 ? ", output " + std::to_string(k) : "",
        "); under micro-batching every partition must keep the batch in "
        "dimension 0, so layers that reduce over the batch (sum(0), a mean "
        "of everything, statistics by hand) belong after the pipe, on its "
        "output");
  }
}

/// Per stage: its layers, device and lane; null layers where the stage
/// runs elsewhere (another rank's).
class StageHost {
 public:
  virtual ~StageHost() = default;

  std::vector<torch::nn::Sequential> partitions;
  std::vector<std::unique_ptr<PartitionTraits>> traits;
  std::vector<torch::Device> device_of;
  std::vector<size_t> lane_of;
  /// Skips between the stages; empty: none.
  SkipLayout skip_layout;
  /// Records every cell when set.
  std::shared_ptr<Timeline> timeline;

  int64_t stage_count() const {
    return static_cast<int64_t>(partitions.size());
  }

  /// Sets the stages' layers, devices and lanes (one per stage).
  void host(
      std::vector<torch::nn::Sequential> layers,
      std::vector<torch::Device> devices,
      std::vector<size_t> lanes) {
    partitions = std::move(layers);
    device_of = std::move(devices);
    lane_of = std::move(lanes);
    traits.clear();
    for (size_t j = 0; j < partitions.size(); ++j) {
      traits.push_back(std::make_unique<PartitionTraits>());
    }
  }

  /// The state of cell (i, j), checkpointed or not.
  c10::intrusive_ptr<StageState> make_state(
      int64_t i,
      int64_t j,
      bool checkpointed,
      const std::shared_ptr<PipeCall>& call) const {
    const auto jj = static_cast<size_t>(j);
    return c10::make_intrusive<StageState>(
        partitions[jj],
        CellIndex{i, j},
        device_of[jj],
        lane_of[jj],
        checkpointed,
        call,
        traits[jj].get(),
        timeline,
        call->input_of_is_list(j),
        skip_layout.empty() ? nullptr : &skip_layout.partitions[jj]);
  }

  /// Cell (i, j) when no gradient can flow through it: the layers alone.
  Bundle run_without_graph(
      int64_t i,
      int64_t j,
      const Bundle& x,
      const std::shared_ptr<PipeCall>& call) const {
    auto state = make_state(i, j, /*checkpointed=*/false, call);
    TimelineScope recording(
        timeline.get(),
        j,
        i,
        Phase::Forward,
        device_of[static_cast<size_t>(j)]);
    CellObserver observer;
    observer.batch_norm = call->batch_norm;
    std::optional<ObserverScope> observing;
    if (observer.batch_norm != nullptr) {
      observing.emplace(observer);
    }
    Bundle out = with_cell_context(
        {i, j}, "forward", [&] { return state->run_partition(x); });
    check_batch_kept(i, j, x, out, *call);
    return out;
  }

  void check_batch_kept(
      int64_t i,
      int64_t j,
      const Bundle& x,
      const Bundle& out,
      const PipeCall& call) const {
    const size_t skips = skip_layout.empty()
        ? 0
        : skip_layout.partitions[static_cast<size_t>(j)].outgoing.size();
    detail::check_batch_kept(i, j, x, out, call, skips);
  }

  /// `x` on stage j's device, for micro-batch i.
  virtual torch::Tensor receive(const torch::Tensor& x, int64_t i, int64_t j) {
    (void)i;
    const auto& device = device_of[static_cast<size_t>(j)];
    return x.device() == device ? x : x.to(device);
  }

  /// Every tensor of `x` on stage j's device (undefined ones stay so).
  Bundle receive_all(const Bundle& x, int64_t i, int64_t j) {
    Bundle moved;
    moved.reserve(x.size());
    for (const auto& t : x) {
      moved.push_back(t.defined() ? receive(t, i, j) : t);
    }
    return moved;
  }
};

} // namespace gpipe::detail
