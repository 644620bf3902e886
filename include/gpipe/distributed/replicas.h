// The replicas of one stage in a pipe across processes: their gradients
// (in buckets that start as the drain ends: replica_buckets.h) and the
// step's loss are summed so that every replica holds plain training's
// gradient of the global batch.
//
// Note [Replicas average to the global batch]
// Under Reduction::Mean replica r computes the gradient of its own batch's
// mean, g_r, over n_r samples; plain training of the global batch of
// N = sum n_r samples has gradient sum_r (n_r / N) g_r. So each rank scales
// by n_r, the replicas sum, and every rank divides by N, which is summed
// alongside. Under Reduction::Sum the gradients add. Only this step's
// gradient is summed: `.grad` accumulated by earlier steps is set aside
// during the step and added back after.
#pragma once

#include <gpipe/distributed/failure.h>
#include <gpipe/distributed/options.h>
#include <gpipe/distributed/placement.h>
#include <gpipe/distributed/replica_buckets.h>
#include <gpipe/distributed/world.h>
#include <gpipe/options.h>

#include <c10/util/Exception.h>
#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace gpipe::distributed::detail {

class ReplicaGroup {
 public:
  /// `group` holds this stage's replicas; sums run on `on` (the device for
  /// NCCL, else the CPU); `who` names this rank in errors.
  ReplicaGroup(
      c10::intrusive_ptr<c10d::Backend> group,
      std::shared_ptr<World> world,
      FailureBoard& board,
      torch::Device on,
      std::string who,
      int64_t bucket_bytes)
      : group_(std::move(group)),
        world_(std::move(world)),
        board_(board),
        on_(on),
        who_(std::move(who)),
        buckets_(bucket_bytes, on, [this](torch::Tensor& flat) {
          return board_.start_sum(
              *group_,
              flat,
              world_->timeout(),
              failed_while("summing the gradients"));
        }) {}

  /// The group of this rank's stage across its pipeline's replicas (NCCL
  /// where the pipe's messages go over NCCL, else Gloo); null with one
  /// replica.
  static std::unique_ptr<ReplicaGroup> of_stage(
      const std::shared_ptr<World>& world,
      const RankPlacement& placement,
      const DistributedOptions& options,
      const std::string& prefix,
      FailureBoard& board) {
    if (placement.replicas == 1) {
      return nullptr;
    }
    std::vector<int64_t> peers;
    for (int64_t r = 0; r < placement.replicas; ++r) {
      peers.push_back(r * placement.stages + placement.position);
    }
    const std::string name =
        prefix + "data_" + std::to_string(placement.position);
    return std::make_unique<ReplicaGroup>(
        placement.nccl ? world->new_nccl_group(name, peers, options.device())
                       : world->new_group(name, peers),
        world,
        board,
        placement.nccl ? options.device() : torch::Device(torch::kCPU),
        placement.describe(world->rank()),
        options.replica_bucket_bytes());
  }

  /// Lays out this step's buckets over `parameters` (the step's) and
  /// returns what the runner tells of its last weight-gradient op (Note
  /// [Replica sums overlap the drain]); `after_drain(k)`: parameter k's
  /// gradient is final only after the drain.
  gpipe::detail::LastWeightsWatch& begin(
      const std::vector<torch::Tensor>& parameters,
      const std::function<bool(size_t)>& after_drain,
      int64_t batch,
      Reduction reduction) {
    buckets_.begin(
        parameters,
        after_drain,
        reduction == Reduction::Mean ? static_cast<double>(batch) : 1.0);
    return buckets_;
  }

  /// When the last step's sums started.
  const ReplicaSums& last_sums() const {
    return buckets_.report();
  }

  /// Note [Replicas average to the global batch].
  torch::Tensor reduce(
      const std::vector<torch::Tensor>& parameters,
      std::vector<torch::Tensor>& earlier,
      int64_t batch,
      const torch::Tensor& loss,
      Reduction reduction) {
    torch::NoGradGuard no_grad;
    buckets_.start_rest();
    const bool mean = reduction == Reduction::Mean;
    const double weight = mean ? static_cast<double>(batch) : 1.0;
    // [N, loss * weight, then per parameter: whether it has a gradient].
    auto meta = torch::zeros(
        {2 + static_cast<int64_t>(parameters.size())}, torch::kFloat64);
    auto* m = meta.data_ptr<double>();
    m[0] = static_cast<double>(batch);
    m[1] = loss.item<double>() * weight;
    for (size_t k = 0; k < parameters.size(); ++k) {
      m[2 + k] = parameters[k].grad().defined() ? 1.0 : 0.0;
    }
    meta = meta.to(on_);
    allreduce(meta, "the batch sizes and losses");
    meta = meta.to(torch::kCPU);
    m = meta.data_ptr<double>();
    const double total = m[0];
    buckets_.check_unchanged();
    for (auto& bucket : buckets_.buckets()) {
      board_.wait_for(bucket.work, failed_while("summing the gradients"));
      if (mean) {
        bucket.flat.div_(total);
      }
      int64_t at = 0;
      for (const size_t k : bucket.slots) {
        const auto& parameter = parameters[k];
        const int64_t numel = parameter.numel();
        auto grad = bucket.flat.narrow(0, at, numel)
                        .view(parameter.sizes())
                        .to(parameter.device());
        at += numel;
        const bool any = m[2 + k] > 0;
        auto& previous = earlier[k];
        auto& slot = parameter.mutable_grad();
        if (previous.defined()) {
          if (any) {
            previous.add_(grad);
          }
          slot = previous;
        } else {
          slot = any ? grad.clone() : torch::Tensor();
        }
      }
      bucket.flat = torch::Tensor();
      bucket.work.reset();
    }
    auto global = torch::empty({1}, torch::kFloat64);
    global[0] = mean ? m[1] / total : m[1];
    return global;
  }

 private:
  std::string failed_while(const char* what) const {
    return "a replica of " + who_ + " failed, exited or timed out while " +
        what + " across replicas";
  }

  void allreduce(torch::Tensor& tensor, const char* what) {
    board_.sum_over(
        *group_,
        tensor,
        world_->timeout(),
        failed_while((std::string("summing ") + what).c_str()));
  }

  c10::intrusive_ptr<c10d::Backend> group_;
  std::shared_ptr<World> world_;
  FailureBoard& board_;
  torch::Device on_;
  std::string who_;
  ReplicaBuckets buckets_;
};

} // namespace gpipe::distributed::detail
