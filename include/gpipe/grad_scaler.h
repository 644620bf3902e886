// Dynamic loss scaling for fp16 training through a pipe: LibTorch has no
// C++ GradScaler, so this is one, on the same ATen ops Python's uses
// (`_amp_foreach_non_finite_check_and_unscale_`, `_amp_update_scale_`).
//
// Why its own: in a pipe the loss is computed inside `step()`, on the last
// stage, and the gradients it scales live on every partition's device (or
// every rank). So the scale multiplies the loss function the pipe runs
// (`scaled(loss_fn)`), unscaling checks every device's gradients, and the
// found-inf flag is agreed before anyone steps: in one process over the
// devices, across processes over every rank (gpipe::distributed::GradScaler),
// so that all stages skip a step, or take it, together.
//
// A step:
//   auto loss = pipe->step(x, y, scaler.scaled(loss_fn));
//   scaler.unscale(optimizer);              // before clipping, if you clip
//   gpipe::clip_grad_norm(*pipe, 1.0);
//   scaler.step(optimizer);                 // skipped when a grad is inf/NaN
//   scaler.update();                        // backs off or grows the scale
#pragma once

#include <gpipe/gradients.h>

#include <ATen/ops/_amp_foreach_non_finite_check_and_unscale.h>
#include <ATen/ops/_amp_update_scale.h>
#include <c10/util/Exception.h>
#include <torch/arg.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/archive.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

namespace gpipe {

/// Options of a GradScaler: Python's `torch.amp.GradScaler` defaults.
struct GradScalerOptions {
  /// The first scale.
  TORCH_ARG(double, init_scale) = 65536.0;
  /// The scale is multiplied by this after `growth_interval` clean steps.
  TORCH_ARG(double, growth_factor) = 2.0;
  /// ... and by this after a step with an inf or NaN gradient.
  TORCH_ARG(double, backoff_factor) = 0.5;
  /// Clean steps between growths.
  TORCH_ARG(int64_t, growth_interval) = 2000;
  /// false: every call passes through (no scaling, every step taken).
  TORCH_ARG(bool, enabled) = true;
};

/// Dynamic loss scaling across a pipe's stages (see the file's comment).
class GradScaler {
 public:
  /// (output of a micro-batch, its target) -> scalar loss.
  using LossFunction =
      std::function<torch::Tensor(const torch::Tensor&, const torch::Tensor&)>;

  /// A scaler at `options.init_scale()`; bad options are `gpipe:` errors.
  explicit GradScaler(GradScalerOptions options = {})
      : options_(std::move(options)) {
    TORCH_CHECK(
        options_.init_scale() > 0 && std::isfinite(options_.init_scale()),
        "gpipe: GradScaler needs a finite init_scale > 0, got ",
        options_.init_scale());
    TORCH_CHECK(
        options_.growth_factor() > 1,
        "gpipe: GradScaler needs growth_factor > 1, got ",
        options_.growth_factor());
    TORCH_CHECK(
        options_.backoff_factor() > 0 && options_.backoff_factor() < 1,
        "gpipe: GradScaler needs 0 < backoff_factor < 1, got ",
        options_.backoff_factor());
    TORCH_CHECK(
        options_.growth_interval() > 0,
        "gpipe: GradScaler needs growth_interval > 0, got ",
        options_.growth_interval());
    scale_ = torch::full({1}, options_.init_scale(), torch::kFloat32);
    growth_tracker_ = torch::zeros({1}, torch::kInt32);
  }
  // Its loss functions hold its scale: a copy would share it, so none.
  GradScaler(const GradScaler&) = delete;
  GradScaler& operator=(const GradScaler&) = delete;
  virtual ~GradScaler() = default;

  /// `loss_fn` times the scale: the loss function to give `step`.
  LossFunction scaled(LossFunction loss_fn) const {
    TORCH_CHECK(
        static_cast<bool>(loss_fn),
        "gpipe: GradScaler::scaled needs a loss function, got an empty one");
    if (!options_.enabled()) {
      return loss_fn;
    }
    // The scale's own tensor, updated in place by update() and load(): a
    // loss function kept across steps multiplies by the current scale.
    return [loss_fn = std::move(loss_fn), scale = scale_](
               const torch::Tensor& out, const torch::Tensor& target) {
      return loss_fn(out, target) * scale.item<double>();
    };
  }

  /// A loss `step` returned for a `scaled` loss function, divided by the
  /// scale it was computed with (call before `update`).
  torch::Tensor unscaled(const torch::Tensor& loss) const {
    return options_.enabled() ? loss / scale() : loss;
  }

  /// Divides the gradients of `parameters` (on any devices, each once) by
  /// the scale in place and records whether any is inf or NaN, agreed
  /// with every other part of the pipe; once per step. Returns that flag.
  bool unscale(const std::vector<torch::Tensor>& parameters) {
    if (!options_.enabled()) {
      return false;
    }
    TORCH_CHECK(
        !unscaled_,
        "gpipe: GradScaler::unscale ran twice in one step; call update() "
        "after each step");
    torch::NoGradGuard no_grad;
    const auto inverse = scale_.reciprocal();
    auto found = torch::zeros({1}, torch::kFloat32);
    // One call per device and dtype: the op wants its tensors alike.
    std::vector<std::vector<torch::Tensor>> groups;
    for (const auto& parameter : detail::with_gradients(parameters)) {
      const auto& grad = parameter.grad();
      auto group = std::find_if(groups.begin(), groups.end(), [&](auto& g) {
        return g.front().device() == grad.device() &&
            g.front().scalar_type() == grad.scalar_type();
      });
      if (group == groups.end()) {
        groups.push_back({grad});
      } else {
        group->push_back(grad);
      }
    }
    for (auto& group : groups) {
      const auto device = group.front().device();
      auto found_here = torch::zeros({1}, scale_.options().device(device));
      at::_amp_foreach_non_finite_check_and_unscale_(
          group, found_here, inverse.to(device));
      found.add_(found_here.to(torch::kCPU));
    }
    found.clamp_max_(1);
    agree(found);
    found_inf_ = found;
    unscaled_ = true;
    return found_inf();
  }

  /// `unscale` of every parameter `optimizer` steps.
  bool unscale(torch::optim::Optimizer& optimizer) {
    return unscale(parameters_of(optimizer));
  }

  /// Steps `optimizer` unless a gradient was inf or NaN (unscaling its
  /// parameters first if `unscale` has not run this step); returns whether
  /// it stepped.
  bool step(torch::optim::Optimizer& optimizer) {
    if (!options_.enabled()) {
      optimizer.step();
      return true;
    }
    if (!unscaled_) {
      unscale(optimizer);
    }
    if (found_inf()) {
      return false;
    }
    optimizer.step();
    return true;
  }

  /// Ends the step: the scale backs off after an inf or NaN gradient, and
  /// grows after `growth_interval` clean steps in a row.
  void update() {
    if (!options_.enabled()) {
      return;
    }
    TORCH_CHECK(
        unscaled_,
        "gpipe: GradScaler::update ran before unscale() or step() this "
        "step; there is no inf check to update from");
    at::_amp_update_scale_(
        scale_,
        growth_tracker_,
        found_inf_,
        options_.growth_factor(),
        options_.backoff_factor(),
        options_.growth_interval());
    unscaled_ = false;
  }

  /// The current scale.
  double scale() const {
    return options_.enabled() ? scale_.item<double>() : 1.0;
  }
  /// Clean steps since the scale last changed.
  int64_t growth_tracker() const {
    return growth_tracker_.item<int64_t>();
  }
  /// Whether this step's gradients held an inf or NaN (after `unscale`).
  bool found_inf() const {
    return found_inf_.defined() && found_inf_.item<double>() > 0;
  }
  /// The options as built.
  const GradScalerOptions& options() const {
    return options_;
  }

  /// Saves the scale and the growth tracker, to resume where this left.
  void save(torch::serialize::OutputArchive& archive) const {
    archive.write("scale", scale_, /*is_buffer=*/true);
    archive.write("growth_tracker", growth_tracker_, /*is_buffer=*/true);
  }
  /// Restores what `save` wrote.
  void load(torch::serialize::InputArchive& archive) {
    torch::Tensor scale;
    torch::Tensor tracker;
    archive.read("scale", scale, /*is_buffer=*/true);
    archive.read("growth_tracker", tracker, /*is_buffer=*/true);
    TORCH_CHECK(
        scale.numel() == 1 && tracker.numel() == 1,
        "gpipe: a GradScaler archive holds a scale and a growth tracker of "
        "one element each, got ",
        scale.numel(),
        " and ",
        tracker.numel());
    // In place: loss functions made by scaled() hold scale_.
    scale_.copy_(scale.reshape({1}));
    growth_tracker_.copy_(tracker.reshape({1}));
    unscaled_ = false;
  }

 protected:
  /// Makes `found_inf` (a CPU float, 0 or 1) every stage's: here the
  /// devices' flags are already summed; across processes, override to
  /// reduce it over the ranks.
  virtual void agree(torch::Tensor& found_inf) {
    (void)found_inf;
  }

 private:
  static std::vector<torch::Tensor> parameters_of(
      torch::optim::Optimizer& optimizer) {
    std::vector<torch::Tensor> parameters;
    for (auto& group : optimizer.param_groups()) {
      for (auto& parameter : group.params()) {
        parameters.push_back(parameter);
      }
    }
    return parameters;
  }

  GradScalerOptions options_;
  torch::Tensor scale_; // float32, CPU
  torch::Tensor growth_tracker_; // int32, CPU
  torch::Tensor found_inf_; // this step's, float32, CPU
  bool unscaled_ = false;
};

/// `torch::save(scaler, path)`.
inline torch::serialize::OutputArchive& operator<<(
    torch::serialize::OutputArchive& archive,
    const GradScaler& scaler) {
  scaler.save(archive);
  return archive;
}

/// `torch::load(scaler, path)`.
inline torch::serialize::InputArchive& operator>>(
    torch::serialize::InputArchive& archive,
    GradScaler& scaler) {
  scaler.load(archive);
  return archive;
}

} // namespace gpipe
