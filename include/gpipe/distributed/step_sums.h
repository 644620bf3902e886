// What a step across processes sums as its drain ends, in order: the tied
// copies' gradients over their owners (ties.h; their check starts with the
// step and ends before the loss goes out), then every gradient, and
// the loss, over the stage's replicas (replicas.h; their buckets start
// during the rank's last backward: replica_buckets.h). Both sum this step's
// gradient alone: `.grad` that earlier steps accumulated (already summed
// then) is set aside while the step runs and added back after.
#pragma once

#include <gpipe/detail/pipe_call.h>
#include <gpipe/distributed/replicas.h>
#include <gpipe/distributed/ties.h>
#include <gpipe/options.h>

#include <torch/types.h>

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

namespace gpipe::distributed::detail {

class StepSums {
 public:
  /// `replicas` null: one replica.
  StepSums(std::unique_ptr<ReplicaGroup> replicas, std::unique_ptr<Ties> ties)
      : replicas_(std::move(replicas)), ties_(std::move(ties)) {}

  /// The pipeline's ties.
  const Ties& ties() const {
    return *ties_;
  }

  /// Starts the ties' check, sets the earlier steps' `.grad` of the call's
  /// parameters aside, where there is something to sum, and lays out the
  /// replicas' buckets; returns
  /// what the runner tells of its last weight-gradient op (Note [Replica
  /// sums overlap the drain]), or null without replicas.
  gpipe::detail::LastWeightsWatch* begin(
      const gpipe::detail::PipeCall& call,
      int64_t batch,
      Reduction reduction) {
    earlier_.clear();
    ties_->start_check();
    if (!replicas_ && !ties_->any_here()) {
      return nullptr;
    }
    const auto& parameters = call.parameters;
    for (const auto& parameter : parameters) {
      earlier_.push_back(parameter.grad());
      parameter.mutable_grad().reset();
    }
    if (!replicas_) {
      return nullptr;
    }
    return &replicas_->begin(
        parameters,
        [&](size_t k) {
          return call.hooked[k] != 0 || ties_->holds(parameters[k]);
        },
        batch,
        reduction);
  }

  /// When the last step's replica sums started (all zero without
  /// replicas).
  ReplicaSums replica_sums() const {
    return replicas_ ? replicas_->last_sums() : ReplicaSums();
  }

  /// Throws where the owners' copies of a tie differ: before the loss goes
  /// out, so that the ranks that wait for it fail in the same step (Note
  /// [Ties are found, and watched]).
  void check_ties() {
    ties_->finish_check();
  }

  /// Sums the tied copies' gradients: after the loss goes out, so that only
  /// the owners wait for the last of them to drain.
  void sum_ties() {
    ties_->reduce();
  }

  /// Sums across replicas (Note [Replicas average to the global batch])
  /// and adds the earlier gradients back; returns the global batch's loss.
  torch::Tensor finish(
      const std::vector<torch::Tensor>& parameters,
      int64_t batch,
      const torch::Tensor& loss,
      Reduction reduction) {
    if (replicas_) {
      return replicas_->reduce(parameters, earlier_, batch, loss, reduction);
    }
    if (!earlier_.empty()) {
      add_back(parameters);
    }
    return loss;
  }

 private:
  void add_back(const std::vector<torch::Tensor>& parameters) {
    torch::NoGradGuard no_grad;
    for (size_t k = 0; k < parameters.size(); ++k) {
      auto& previous = earlier_[k];
      if (!previous.defined()) {
        continue;
      }
      auto& slot = parameters[k].mutable_grad();
      if (slot.defined()) {
        previous.add_(slot);
      }
      slot = previous;
    }
  }

  std::unique_ptr<ReplicaGroup> replicas_;
  std::unique_ptr<Ties> ties_;
  std::vector<torch::Tensor> earlier_;
};

} // namespace gpipe::distributed::detail
