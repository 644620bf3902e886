// One call of a pipe in one process, `forward()` or `step()`: what its
// cells share (pipe_call.h), whether it builds a graph, and its Deferred
// BatchNorm, whose statistics are rolled back unless the call commits.
#pragma once

#include <gpipe/detail/batch_norm.h>
#include <gpipe/detail/bundle.h>
#include <gpipe/detail/pipe_call.h>
#include <gpipe/detail/stage_host.h>
#include <gpipe/options.h>

#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <unordered_map>
#include <vector>

namespace gpipe::detail {

class CallScope {
 public:
  /// A call of m micro-batches on `stages` running on `lanes` lanes;
  /// `checkpoint` is Checkpoint::Never outside training, and Deferred
  /// BatchNorm collects only when `deferred_batch_norm`.
  CallScope(
      const StageHost& stages,
      const std::vector<torch::Tensor>& parameters,
      const std::unordered_map<const c10::TensorImpl*, int64_t>& owner_lane,
      size_t lanes,
      int64_t m,
      Checkpoint checkpoint,
      bool deferred_batch_norm,
      bool input_is_list,
      const Bundle& input) {
    call = make_pipe_call(
        parameters,
        stages.partitions.size(),
        m,
        [&](const c10::TensorImpl* key) -> int64_t {
          const auto found = owner_lane.find(key);
          return found == owner_lane.end() ? -1 : found->second;
        });
    call->input_is_list = input_is_list;
    const bool input_requires_grad =
        std::any_of(input.begin(), input.end(), [](const auto& t) {
          return t.defined() && t.requires_grad();
        });
    // forward() builds a graph only under grad mode; step() requires it.
    needs_graph = torch::GradMode::is_enabled() &&
        (input_requires_grad || !call->parameters.empty());
    call->lock_random_draws =
        needs_graph && lanes > 1 && checkpointed(checkpoint, 0, m);
    if (deferred_batch_norm) {
      batch_norm_ = std::make_unique<DeferredBatchNorm>(
          tracked_batch_norms(stages.partitions));
      if (!batch_norm_->empty()) {
        call->batch_norm = batch_norm_.get();
      }
    }
  }

  ~CallScope() {
    call->batch_norm = nullptr;
    call->lane_gradients = nullptr;
    if (batch_norm_ && !committed_) {
      batch_norm_->rollback();
    }
  }

  /// The call succeeded: Deferred BatchNorm takes its step.
  void commit() {
    if (batch_norm_) {
      batch_norm_->commit();
    }
    committed_ = true;
  }

  CallScope(const CallScope&) = delete;
  CallScope& operator=(const CallScope&) = delete;

  std::shared_ptr<PipeCall> call;
  bool needs_graph = false;

 private:
  std::unique_ptr<DeferredBatchNorm> batch_norm_;
  bool committed_ = false;
};

} // namespace gpipe::detail
