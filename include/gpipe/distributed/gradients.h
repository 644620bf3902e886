// Whole-model gradient utilities for a pipe across processes: the global
// norm (and its clipping) and the fp16 loss scaler's found-inf flag,
// agreed over every rank, so that every stage clips by the same factor and
// skips, or takes, the same steps.
//
// Why: each rank holds only its stages' gradients. The norm of the model's
// gradient is the combination of every stage's partial norm, each tied
// parameter counted once (by its first owner) and each replica's identical
// gradients counted once (replica 0's are summed). A found-inf on one rank
// must stop the optimizer on all of them, or the stages drift apart.
#pragma once

#include <gpipe/distributed/pipe.h>
#include <gpipe/distributed/world.h>
#include <gpipe/grad_scaler.h>
#include <gpipe/gradients.h>

#include <c10/util/Exception.h>
#include <torch/types.h>

#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace gpipe::distributed {

namespace detail {

/// All-reduces `tensor` (CPU, float64) over every rank of `world`.
inline void allreduce_over_world(
    World& world,
    torch::Tensor& tensor,
    c10d::ReduceOp::RedOpType op,
    const char* what) {
  std::vector<torch::Tensor> tensors{tensor};
  c10d::AllreduceOptions reduce;
  reduce.reduceOp = op;
  reduce.timeout = world.timeout();
  try {
    world.group()->allreduce(tensors, reduce)->wait();
  } catch (const std::exception& e) {
    TORCH_CHECK(
        false,
        "gpipe: rank ",
        world.rank(),
        " could not agree ",
        what,
        " with every rank (one failed, exited or timed out, or not every "
        "rank called it): ",
        e.what());
  }
}

} // namespace detail

/// Clips the gradients of the whole pipe (every rank of every replica
/// calls it, after `step`) so that the model's gradient norm of order
/// `norm_type` is at most `max_norm`, and returns that norm before
/// clipping, on every rank, as LibTorch's `clip_grad_norm_` would return
/// for the plain model with each tied parameter counted once.
inline double clip_grad_norm(
    DistributedGPipeImpl& pipe,
    double max_norm,
    double norm_type = 2.0,
    bool error_if_nonfinite = false) {
  gpipe::detail::check_norm_type(norm_type);
  const auto mine = gpipe::detail::with_gradients(pipe.counted_parameters());
  auto partial = gpipe::detail::partial_norm(mine, norm_type);
  // Replicas hold the same averaged gradients: replica 0's parts alone.
  // [part, whether it is NaN]: Gloo's MAX keeps the first operand when the
  // other is NaN, so a NaN travels as a flag (MAX and SUM both keep it).
  auto value = torch::zeros({2}, torch::kFloat64);
  if (pipe.replica() == 0) {
    const bool nan = std::isnan(partial.value);
    value[0] = nan ? 0.0 : partial.value;
    value[1] = nan ? 1.0 : 0.0;
  }
  detail::allreduce_over_world(
      *pipe.world(),
      value,
      partial.is_max() ? c10d::ReduceOp::MAX : c10d::ReduceOp::SUM,
      "the gradient norm");
  partial.value = value[1].item<double>() > 0
      ? std::numeric_limits<double>::quiet_NaN()
      : value[0].item<double>();
  const double total = partial.total();
  gpipe::detail::check_finite_norm(total, norm_type, error_if_nonfinite);
  // Every copy of a tied parameter takes the same factor.
  gpipe::detail::clip_to(
      gpipe::detail::with_gradients(pipe.parameters()), max_norm, total);
  return total;
}

/// `clip_grad_norm` through the holder.
inline double clip_grad_norm(
    DistributedGPipe& pipe,
    double max_norm,
    double norm_type = 2.0,
    bool error_if_nonfinite = false) {
  return clip_grad_norm(*pipe, max_norm, norm_type, error_if_nonfinite);
}

/// A GradScaler whose found-inf flag is agreed over every rank of the
/// World: an inf or NaN gradient on one rank makes every rank skip the
/// step and back off the scale. Every rank calls unscale (or step) and
/// update each step.
class GradScaler : public gpipe::GradScaler {
 public:
  /// A scaler whose found-inf flag `world`'s ranks agree on.
  explicit GradScaler(
      std::shared_ptr<World> world,
      GradScalerOptions options = {})
      : gpipe::GradScaler(std::move(options)), world_(std::move(world)) {
    TORCH_CHECK(
        world_ != nullptr, "gpipe: distributed::GradScaler needs a World");
  }

 protected:
  void agree(torch::Tensor& found_inf) override {
    auto flag = found_inf.to(torch::kFloat64);
    detail::allreduce_over_world(
        *world_, flag, c10d::ReduceOp::MAX, "whether a gradient is inf");
    found_inf.copy_(flag);
  }

 private:
  std::shared_ptr<World> world_;
};

} // namespace gpipe::distributed
