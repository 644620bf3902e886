// Whole-model gradient utilities for a pipe: the global gradient norm and
// its clipping, over parameters that live on several devices, each counted
// once.
//
// Why: LibTorch's `torch::nn::utils::clip_grad_norm_` stacks the per-tensor
// norms, which fails when partitions sit on different devices, and it counts
// a shared (tied) parameter as often as `Module::parameters()` lists it,
// which is once per name. Here each tensor counts once, the per-device
// partial sums meet on the CPU, and the result is LibTorch's to rounding.
// The same partial sums are what a pipe across processes all-reduces over
// its ranks (gpipe/distributed/gradients.h).
#pragma once

#include <c10/util/Exception.h>
#include <torch/nn/module.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iterator>
#include <limits>
#include <unordered_set>
#include <utility>
#include <vector>

namespace gpipe {

/// Each tensor of `parameters` once, in first-seen order. A module used
/// twice (a tied embedding and head) is listed under each of its names by
/// `Module::parameters()`; an optimizer given both entries would step it
/// twice, so give it these.
inline std::vector<torch::Tensor> unique_parameters(
    const std::vector<torch::Tensor>& parameters) {
  std::unordered_set<const c10::TensorImpl*> seen;
  std::vector<torch::Tensor> unique;
  for (const auto& parameter : parameters) {
    if (seen.insert(parameter.unsafeGetTensorImpl()).second) {
      unique.push_back(parameter);
    }
  }
  return unique;
}

/// `unique_parameters(module.parameters())`.
inline std::vector<torch::Tensor> unique_parameters(
    const torch::nn::Module& module) {
  return unique_parameters(module.parameters());
}

namespace detail {

/// A norm's partial result over some gradients, to be combined with other
/// devices' or ranks': for a p-norm the sum of |g|^p, for the infinity norm
/// the largest |g|, for p = 0 the number of tensors (LibTorch's count).
struct PartialNorm {
  double norm_type = 2.0;
  double value = 0.0;

  bool is_max() const {
    return std::isinf(norm_type);
  }
  /// Adds another part.
  void combine(double other) {
    if (is_max()) {
      // std::max would drop a NaN; the norm must carry it.
      value = std::isnan(other) || other > value ? other : value;
    } else {
      value += other;
    }
  }
  /// The norm of everything combined.
  double total() const {
    if (is_max() || norm_type == 0) {
      return value;
    }
    return norm_type == 1 ? value : std::pow(value, 1.0 / norm_type);
  }
};

inline void check_norm_type(double norm_type) {
  TORCH_CHECK(
      norm_type >= 0 && !std::isnan(norm_type) &&
          !(std::isinf(norm_type) && norm_type < 0),
      "gpipe: clip_grad_norm needs a norm type >= 0 or infinity, got ",
      norm_type);
}

/// The tensors of `parameters` (each once) that have a gradient.
inline std::vector<torch::Tensor> with_gradients(
    const std::vector<torch::Tensor>& parameters) {
  std::vector<torch::Tensor> with;
  for (const auto& parameter : unique_parameters(parameters)) {
    if (parameter.grad().defined()) {
      with.push_back(parameter);
    }
  }
  return with;
}

/// The partial norm of the gradients of `parameters` (each counted once,
/// whatever their devices): one host sync per device.
inline PartialNorm partial_norm(
    const std::vector<torch::Tensor>& parameters,
    double norm_type) {
  check_norm_type(norm_type);
  PartialNorm partial{norm_type, 0.0};
  if (norm_type == 0) {
    partial.value = static_cast<double>(parameters.size());
    return partial;
  }
  torch::NoGradGuard no_grad;
  // Per device: the per-tensor norms, stacked and combined there (as
  // LibTorch does on one device), then moved to the host once.
  std::vector<std::pair<torch::Device, std::vector<torch::Tensor>>> by_device;
  for (const auto& parameter : parameters) {
    const auto grad = parameter.grad();
    auto norm = partial.is_max() ? grad.abs().max() : grad.norm(norm_type);
    auto found = std::find_if(
        by_device.begin(), by_device.end(), [&](const auto& entry) {
          return entry.first == grad.device();
        });
    if (found == by_device.end()) {
      by_device.emplace_back(grad.device(), std::vector<torch::Tensor>{});
      found = std::prev(by_device.end());
    }
    found->second.push_back(norm.to(torch::kFloat64));
  }
  for (const auto& entry : by_device) {
    const auto norms = torch::stack(entry.second);
    partial.combine(
        partial.is_max() ? norms.max().item<double>()
                         : norms.pow(norm_type).sum().item<double>());
  }
  return partial;
}

/// Multiplies every gradient by max_norm / (total + 1e-6), clamped to 1, as
/// LibTorch's clip_grad_norm_ does (a non-finite total makes them NaN
/// there too).
inline void clip_to(
    const std::vector<torch::Tensor>& parameters,
    double max_norm,
    double total) {
  torch::NoGradGuard no_grad;
  // std::min keeps a NaN first argument, as clamp keeps a NaN tensor.
  const double coefficient = std::min(max_norm / (total + 1e-6), 1.0);
  for (const auto& parameter : parameters) {
    parameter.grad().mul_(coefficient);
  }
}

inline void check_finite_norm(
    double total,
    double norm_type,
    bool error_if_nonfinite) {
  TORCH_CHECK(
      !error_if_nonfinite || std::isfinite(total),
      "gpipe: the total gradient norm of order ",
      norm_type,
      " is ",
      total,
      ", so it cannot be clipped; pass error_if_nonfinite = false to scale "
      "the gradients by it anyway");
}

/// A module whose `parameters()` hold tensors that a gradient norm counts
/// once (a pipe's declared ties, Note [Declared ties train as one tensor]).
class CountsParametersOnce {
 public:
  virtual ~CountsParametersOnce() = default;
  /// The parameters a gradient norm counts.
  virtual std::vector<torch::Tensor> counted_parameters() const = 0;
};

} // namespace detail

/// Clips the gradients of `parameters` (on any devices, each tensor counted
/// once) so that their global norm of order `norm_type` is at most
/// `max_norm`, and returns that norm before clipping, as LibTorch's
/// `torch::nn::utils::clip_grad_norm_` does for tensors on one device
/// (infinity, NaN and `error_if_nonfinite` included).
inline double clip_grad_norm(
    const std::vector<torch::Tensor>& parameters,
    double max_norm,
    double norm_type = 2.0,
    bool error_if_nonfinite = false) {
  detail::check_norm_type(norm_type);
  const auto with = detail::with_gradients(parameters);
  if (with.empty()) {
    return 0.0;
  }
  const double total = detail::partial_norm(with, norm_type).total();
  detail::check_finite_norm(total, norm_type, error_if_nonfinite);
  detail::clip_to(with, max_norm, total);
  return total;
}

/// `clip_grad_norm` of a module's parameters, a pipe's included: a pipe's
/// declared ties count once in the norm, and every copy is clipped.
inline double clip_grad_norm(
    const torch::nn::Module& module,
    double max_norm,
    double norm_type = 2.0,
    bool error_if_nonfinite = false) {
  const auto* counts =
      dynamic_cast<const detail::CountsParametersOnce*>(&module);
  if (counts == nullptr) {
    return clip_grad_norm(
        module.parameters(), max_norm, norm_type, error_if_nonfinite);
  }
  detail::check_norm_type(norm_type);
  const auto counted = detail::with_gradients(counts->counted_parameters());
  if (counted.empty()) {
    return 0.0;
  }
  const double total = detail::partial_norm(counted, norm_type).total();
  detail::check_finite_norm(total, norm_type, error_if_nonfinite);
  detail::clip_to(
      detail::with_gradients(unique_parameters(module)), max_norm, total);
  return total;
}

} // namespace gpipe
