// How a cell runs again: a checkpointed cell keeps its inputs, forward's
// thread-local state and the random draws it made (observer.h), and its
// recompute replays them with every buffer put back afterwards, so the
// recomputed graph is the one forward would have built.
#pragma once

#include <gpipe/detail/observer.h>
#include <gpipe/recompute.h>

#include <ATen/ThreadLocalState.h>
#include <ATen/record_function.h>
#include <torch/nn/module.h>
#include <torch/types.h>

#include <optional>
#include <vector>

namespace gpipe::detail {

/// Every buffer of a module tree as it is now, put back when the guard
/// ends: a recompute must not update running statistics a second time.
/// Written back through `variable_data()`, an alias with its own version
/// counter: the graphs of other micro-batches saved these buffers (BatchNorm
/// saves its running statistics), and plain training never bumps them
/// behind their back either (BatchNorm's kernels update them untracked).
class BufferGuard {
 public:
  explicit BufferGuard(const torch::nn::Module& module) {
    torch::NoGradGuard no_grad;
    for (const auto& buffer : module.buffers()) {
      if (buffer.defined()) {
        saved_.push_back({buffer, buffer.clone()});
      }
    }
  }

  ~BufferGuard() {
    torch::NoGradGuard no_grad;
    for (auto& saved : saved_) {
      saved.buffer.variable_data().copy_(saved.copy);
    }
  }

  BufferGuard(const BufferGuard&) = delete;
  BufferGuard& operator=(const BufferGuard&) = delete;

 private:
  struct Saved {
    torch::Tensor buffer;
    torch::Tensor copy;
  };
  std::vector<Saved> saved_;
};

/// What a checkpointed forward records for its recompute, besides inputs.
struct ForwardRecord {
  /// Autocast and every other thread-local setting, taken before the
  /// observer joins the thread.
  std::optional<at::ThreadLocalState> state;
  RandomDraws draws;

  void clear() {
    state.reset();
    draws.before.clear();
  }
};

/// While it lives, the thread runs as `record`'s forward did: its
/// thread-local state (with the profiler callbacks of now: forward's may be
/// gone), its random draws replayed, the recompute flag up; the partition's
/// buffers are put back when it ends.
class ReplayingForward {
 public:
  ReplayingForward(
      ForwardRecord& record,
      const torch::nn::Module& partition,
      const torch::Device& device,
      bool lock_draws)
      : callbacks_(at::get_record_function_tls_()),
        forward_tls_(*record.state),
        buffers_(partition) {
    at::set_record_function_tls_(callbacks_);
    observer_.mode = CellObserver::Draws::Replay;
    observer_.device = device;
    observer_.lock_draws = lock_draws;
    observer_.draws = &record.draws;
    observing_.emplace(observer_);
  }

  /// Whether the recompute drew exactly what forward drew.
  bool finished_replay() const {
    return observer_.finished_replay();
  }

  ReplayingForward(const ReplayingForward&) = delete;
  ReplayingForward& operator=(const ReplayingForward&) = delete;

 private:
  at::RecordFunctionTLS callbacks_;
  at::ThreadLocalStateGuard forward_tls_;
  BufferGuard buffers_;
  CellObserver observer_;
  std::optional<ObserverScope> observing_;
  RecomputeFlagGuard recomputing_{&RecomputeFlags::recomputing, true};
};

} // namespace gpipe::detail
