// ZeRO-1 for a pipe across processes: the optimizer state of each stage is
// sharded over that stage's data-parallel replicas.
//
// Why: with D replicas every replica of a stage holds the same parameters,
// the same (averaged) gradients and, with a plain optimizer, the same
// optimizer state: Adam's two moments cost twice the parameters, D times
// over. Here each replica keeps the state of only its shard (about 1/D of
// the stage's parameter bytes), steps only that shard with any LibTorch
// optimizer, and then every parameter is broadcast from the replica that
// stepped it, so all replicas again hold identical parameters: the same
// numbers as the unsharded optimizer, with 1/D of its state.
//
// Note [Shards balance bytes, the same on every replica]
// The stage's parameters (each once, in the pipe's order) go to shards
// largest first, each to the shard with the fewest bytes so far (the lower
// replica on a tie). Every replica of a stage has the same parameters, so
// every replica computes the same shards without talking.
#pragma once

#include <gpipe/distributed/pipe.h>
#include <gpipe/distributed/world.h>
#include <gpipe/gradients.h>

#include <c10/util/Exception.h>
#include <torch/optim/adagrad.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/optimizer.h>
#include <torch/optim/rmsprop.h>
#include <torch/optim/sgd.h>
#include <torch/serialize/archive.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <numeric>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace gpipe::distributed {

namespace detail {

/// Note [Shards balance bytes, the same on every replica]: the shard (in
/// [0, shards)) of each of `parameters`.
inline std::vector<int64_t> shard_of_parameters(
    const std::vector<torch::Tensor>& parameters,
    int64_t shards) {
  std::vector<size_t> order(parameters.size());
  std::iota(order.begin(), order.end(), size_t{0});
  const auto bytes = [&](size_t k) {
    return parameters[k].numel() *
        static_cast<int64_t>(parameters[k].element_size());
  };
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return bytes(a) > bytes(b);
  });
  std::vector<int64_t> load(static_cast<size_t>(shards), 0);
  std::vector<int64_t> shard(parameters.size(), 0);
  for (const size_t k : order) {
    const auto lightest = std::min_element(load.begin(), load.end());
    shard[k] = lightest - load.begin();
    *lightest += bytes(k);
  }
  return shard;
}

/// The bytes of the tensors `state` holds (LibTorch's SGD, Adam, AdamW,
/// Adagrad and RMSprop states; another optimizer's counts what its state
/// writes to an archive).
inline int64_t state_bytes(const torch::optim::OptimizerParamState& state) {
  int64_t total = 0;
  const auto add = [&](const torch::Tensor& tensor) {
    if (tensor.defined()) {
      total += tensor.numel() * static_cast<int64_t>(tensor.element_size());
    }
  };
  if (const auto* sgd =
          dynamic_cast<const torch::optim::SGDParamState*>(&state)) {
    add(sgd->momentum_buffer());
  } else if (
      const auto* adam =
          dynamic_cast<const torch::optim::AdamParamState*>(&state)) {
    add(adam->exp_avg());
    add(adam->exp_avg_sq());
    add(adam->max_exp_avg_sq());
  } else if (
      const auto* adamw =
          dynamic_cast<const torch::optim::AdamWParamState*>(&state)) {
    add(adamw->exp_avg());
    add(adamw->exp_avg_sq());
    add(adamw->max_exp_avg_sq());
  } else if (
      const auto* adagrad =
          dynamic_cast<const torch::optim::AdagradParamState*>(&state)) {
    add(adagrad->sum());
  } else if (
      const auto* rms =
          dynamic_cast<const torch::optim::RMSpropParamState*>(&state)) {
    add(rms->square_avg());
    add(rms->momentum_buffer());
    add(rms->grad_avg());
  } else {
    std::ostringstream bytes;
    torch::serialize::OutputArchive archive;
    state.serialize(archive);
    archive.save_to(bytes);
    total += static_cast<int64_t>(bytes.str().size());
  }
  return total;
}

} // namespace detail

/// Bytes of optimizer state `optimizer` holds now (its tensors').
inline int64_t optimizer_state_bytes(const torch::optim::Optimizer& optimizer) {
  int64_t total = 0;
  for (const auto& entry : optimizer.state()) {
    total += detail::state_bytes(*entry.second);
  }
  return total;
}

/// ZeRO-1 over the replicas of each stage (see the file's comment): an
/// Optimizer over all of this rank's parameters whose state covers only
/// its shard. Every rank of the pipe builds it, in the same order as its
/// pipes, and steps it together.
class ShardedOptimizer : public torch::optim::Optimizer {
 public:
  /// Makes the optimizer that steps a shard, from the shard's parameters.
  using Factory = std::function<std::unique_ptr<torch::optim::Optimizer>(
      std::vector<torch::Tensor>)>;

  /// Shards `pipe`'s parameters over its stage's replicas and has `make`
  /// build the optimizer of this replica's shard; collective over the
  /// stage's replicas (a Gloo group of them).
  ShardedOptimizer(DistributedGPipeImpl& pipe, const Factory& make)
      : ShardedOptimizer(pipe, shard_of_pipe(pipe, make)) {}

  /// Steps this rank's shard, then gives every replica every parameter
  /// from the replica that stepped it.
  torch::Tensor step(LossClosure closure = nullptr) override {
    TORCH_CHECK(!closure, "gpipe: ShardedOptimizer::step takes no closure");
    const double lr = param_groups()[0].options().get_lr();
    for (auto& group : shard_->optimizer->param_groups()) {
      group.options().set_lr(lr);
    }
    if (!shard_->parameters.empty()) {
      shard_->optimizer->step();
    }
    if (group_) {
      gather();
    }
    return {};
  }

  /// The optimizer that steps this rank's shard.
  torch::optim::Optimizer& shard_optimizer() {
    return *shard_->optimizer;
  }
  /// The parameters this rank steps (and holds state for).
  const std::vector<torch::Tensor>& shard() const {
    return shard_->parameters;
  }

  /// Saves this rank's shard's state (each rank saves its own).
  void save(torch::serialize::OutputArchive& archive) const override {
    shard_->optimizer->save(archive);
  }
  /// Loads what `save` wrote on this rank.
  void load(torch::serialize::InputArchive& archive) override {
    shard_->optimizer->load(archive);
  }

 private:
  struct ShardState {
    std::vector<torch::Tensor> all; // the rank's, each once, the pipe's order
    std::vector<int64_t> shard_of; // per tensor of `all`
    std::vector<torch::Tensor> parameters; // this replica's shard
    std::unique_ptr<torch::optim::Optimizer> optimizer; // steps the shard
  };

  static std::unique_ptr<ShardState> shard_of_pipe(
      DistributedGPipeImpl& pipe,
      const Factory& make) {
    TORCH_CHECK(
        static_cast<bool>(make),
        "gpipe: ShardedOptimizer needs a factory, got an empty one");
    auto state = std::make_unique<ShardState>();
    state->all = gpipe::unique_parameters(pipe.parameters());
    state->shard_of = detail::shard_of_parameters(state->all, pipe.replicas());
    for (size_t k = 0; k < state->all.size(); ++k) {
      if (state->shard_of[k] == pipe.replica()) {
        state->parameters.push_back(state->all[k]);
      }
    }
    state->optimizer = make(state->parameters);
    TORCH_CHECK(
        state->optimizer != nullptr,
        "gpipe: ShardedOptimizer's factory returned no optimizer");
    return state;
  }

  // The outer group's options are the shard optimizer's, so that a
  // learning-rate schedule set on this optimizer reaches the shard.
  ShardedOptimizer(
      DistributedGPipeImpl& pipe,
      std::unique_ptr<ShardState> shard)
      : Optimizer(shard->all, shard->optimizer->defaults().clone()),
        world_(pipe.world()),
        parameters_(shard->all),
        shard_of_(shard->shard_of),
        replicas_(pipe.replicas()),
        replica_(pipe.replica()),
        shard_(std::move(shard)) {
    if (replicas_ > 1) {
      std::vector<int64_t> peers;
      for (int64_t r = 0; r < replicas_; ++r) {
        peers.push_back(r * pipe.stages() + pipe.position());
      }
      group_ = world_->new_group(
          world_->next_pipe_prefix() + "zero_" +
              std::to_string(pipe.position()),
          peers);
    }
  }

  /// One broadcast per shard and dtype, from the replica that owns it.
  void gather() {
    torch::NoGradGuard no_grad;
    std::map<std::pair<int64_t, c10::ScalarType>, std::vector<size_t>> buckets;
    for (size_t k = 0; k < parameters_.size(); ++k) {
      buckets[{shard_of_[k], parameters_[k].scalar_type()}].push_back(k);
    }
    for (const auto& [key, members] : buckets) {
      std::vector<torch::Tensor> flat;
      for (const size_t k : members) {
        flat.push_back(parameters_[k].detach().reshape({-1}).to(torch::kCPU));
      }
      std::vector<torch::Tensor> bucket{torch::cat(flat)};
      c10d::BroadcastOptions options;
      options.rootRank = key.first;
      options.timeout = world_->timeout();
      try {
        group_->broadcast(bucket, options)->wait();
      } catch (const std::exception& e) {
        TORCH_CHECK(
            false,
            "gpipe: rank ",
            world_->rank(),
            " could not gather the parameters replica ",
            key.first,
            " stepped (a replica failed, exited or timed out, or did not ",
            "step): ",
            e.what());
      }
      if (key.first == replica_) {
        continue;
      }
      int64_t at = 0;
      for (const size_t k : members) {
        auto& parameter = parameters_[k];
        parameter.copy_(bucket.front()
                            .narrow(0, at, parameter.numel())
                            .view(parameter.sizes()));
        at += parameter.numel();
      }
    }
  }

  std::shared_ptr<World> world_;
  std::vector<torch::Tensor> parameters_; // each once, the pipe's order
  std::vector<int64_t> shard_of_;
  int64_t replicas_ = 1;
  int64_t replica_ = 0;
  std::unique_ptr<ShardState> shard_;
  c10::intrusive_ptr<c10d::Backend> group_; // this stage's replicas
};

} // namespace gpipe::distributed
