// BatchNorm's running statistics under micro-batching.
//
// Note [Deferred BatchNorm]
// Under micro-batching each BatchNorm sees M small batches instead of one:
// training normalizes with each micro-batch's statistics (as GPipe does), but
// left alone the running mean and variance would take M momentum steps on
// micro-batch statistics, and num_batches_tracked would count M per step.
// With `GPipeOptions::deferred_batch_norm(true)` the pipe instead gathers
// every BatchNorm's input statistics over the whole mini-batch and commits
// them once per call, so that the running statistics equal what plain
// training of the whole batch computes from the same inputs: the mean, the
// unbiased variance (as BatchNorm itself stores), one momentum step (or the
// cumulative average when momentum is unset), num_batches_tracked + 1.
//
// BatchNorms are found among the partitions' modules, nested ones included,
// and their inputs are seen through the cell observer (observer.h) as the
// `aten::batch_norm` operator is called: in C++ a module's forward calls its
// members directly, so a BatchNorm cannot be swapped for another module the
// way torchgpipe does in Python. Statistics are combined in double precision
// with Chan's parallel formula, per micro-batch, whatever the order in which
// lanes deliver them. Recomputes are never observed.
#pragma once

#include <gpipe/detail/observer.h>

#include <c10/core/TensorImpl.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/types.h>

#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <vector>

namespace gpipe::detail {

/// The BatchNorm modules of `partitions` that track running statistics.
struct TrackedBatchNorm {
  torch::Tensor running_mean;
  torch::Tensor running_var;
  torch::Tensor num_batches_tracked;
  std::optional<double> momentum;
  torch::nn::Module* module = nullptr; // for is_training()
};

inline std::vector<TrackedBatchNorm> tracked_batch_norms(
    const std::vector<torch::nn::Sequential>& partitions) {
  std::vector<TrackedBatchNorm> found;
  auto add = [&](auto* bn) {
    if (bn == nullptr || !bn->options.track_running_stats() ||
        !bn->running_mean.defined()) {
      return false;
    }
    for (const auto& known : found) {
      if (known.running_mean.is_same(bn->running_mean)) {
        return true; // one module in several places
      }
    }
    found.push_back(
        {bn->running_mean,
         bn->running_var,
         bn->num_batches_tracked,
         bn->options.momentum(),
         bn});
    return true;
  };
  for (const auto& partition : partitions) {
    for (const auto& module : partition->modules(/*include_self=*/false)) {
      auto* raw = module.get();
      add(dynamic_cast<torch::nn::BatchNorm1dImpl*>(raw)) ||
          add(dynamic_cast<torch::nn::BatchNorm2dImpl*>(raw)) ||
          add(dynamic_cast<torch::nn::BatchNorm3dImpl*>(raw));
    }
  }
  return found;
}

/// Gathers whole-batch statistics of every tracked BatchNorm for one call
/// and commits them once (Note [Deferred BatchNorm]).
class DeferredBatchNorm : public BatchNormObserver {
 public:
  explicit DeferredBatchNorm(std::vector<TrackedBatchNorm> norms) {
    torch::NoGradGuard no_grad;
    entries_.reserve(norms.size());
    for (auto& norm : norms) {
      if (!norm.module->is_training()) {
        continue;
      }
      Entry entry;
      entry.norm = std::move(norm);
      entry.saved_mean = entry.norm.running_mean.clone();
      entry.saved_var = entry.norm.running_var.clone();
      if (entry.norm.num_batches_tracked.defined()) {
        entry.saved_count = entry.norm.num_batches_tracked.clone();
      }
      entries_.push_back(std::move(entry));
    }
    for (size_t k = 0; k < entries_.size(); ++k) {
      index_.emplace(entries_[k].norm.running_mean.unsafeGetTensorImpl(), k);
    }
  }

  bool empty() const {
    return entries_.empty();
  }

  void observe(c10::ArrayRef<const c10::IValue> inputs) override {
    if (!inputs[0].isTensor() || !inputs[3].isTensor() || !inputs[5].isBool() ||
        !inputs[5].toBool()) {
      return;
    }
    const auto found = index_.find(inputs[3].toTensor().unsafeGetTensorImpl());
    if (found == index_.end()) {
      return;
    }
    torch::NoGradGuard no_grad;
    const torch::Tensor x = inputs[0].toTensor().detach().to(torch::kDouble);
    std::vector<int64_t> dims{0};
    for (int64_t d = 2; d < x.dim(); ++d) {
      dims.push_back(d);
    }
    const double count = static_cast<double>(x.numel() / x.size(1));
    const torch::Tensor mean = x.mean(dims);
    std::vector<int64_t> shape(static_cast<size_t>(x.dim()), 1);
    shape[1] = x.size(1);
    const torch::Tensor m2 = (x - mean.view(shape)).pow(2).sum(dims);
    Entry& entry = entries_[found->second];
    std::lock_guard<std::mutex> lock(entry.mutex);
    if (entry.count == 0) {
      entry.mean = mean;
      entry.m2 = m2;
      entry.count = count;
      return;
    }
    // Chan et al.'s pairwise update of (count, mean, M2).
    const double total = entry.count + count;
    const torch::Tensor delta = mean - entry.mean;
    entry.mean = entry.mean + delta * (count / total);
    entry.m2 = entry.m2 + m2 + delta.pow(2) * (entry.count * count / total);
    entry.count = total;
  }

  /// Puts back the statistics from before the call, then takes one step on
  /// the whole batch's.
  void commit() {
    torch::NoGradGuard no_grad;
    for (auto& entry : entries_) {
      restore(entry);
      if (entry.count == 0) {
        continue;
      }
      auto& norm = entry.norm;
      double factor = norm.momentum.value_or(0.0);
      if (norm.num_batches_tracked.defined()) {
        norm.num_batches_tracked.variable_data().add_(1);
        if (!norm.momentum) {
          factor = 1.0 / norm.num_batches_tracked.item<double>();
        }
      }
      const auto dtype = norm.running_mean.scalar_type();
      const torch::Tensor variance = entry.count > 1
          ? entry.m2 / (entry.count - 1)
          : torch::full_like(
                entry.m2, std::numeric_limits<double>::quiet_NaN());
      norm.running_mean.variable_data()
          .mul_(1 - factor)
          .add_(entry.mean.to(norm.running_mean.device(), dtype), factor);
      norm.running_var.variable_data()
          .mul_(1 - factor)
          .add_(variance.to(norm.running_var.device(), dtype), factor);
    }
  }

  /// Leaves every running statistic as it was before the call.
  void rollback() {
    torch::NoGradGuard no_grad;
    for (auto& entry : entries_) {
      restore(entry);
    }
  }

 private:
  struct Entry {
    TrackedBatchNorm norm;
    torch::Tensor saved_mean;
    torch::Tensor saved_var;
    torch::Tensor saved_count;
    std::mutex mutex;
    double count = 0;
    torch::Tensor mean; // double, per channel
    torch::Tensor m2; // double, per channel: sum of squared deviations

    Entry() = default;
    Entry(Entry&& other) noexcept
        : norm(std::move(other.norm)),
          saved_mean(std::move(other.saved_mean)),
          saved_var(std::move(other.saved_var)),
          saved_count(std::move(other.saved_count)),
          count(other.count),
          mean(std::move(other.mean)),
          m2(std::move(other.m2)) {}
  };

  // Through variable_data(): the graphs of the micro-batches saved these
  // statistics, and BatchNorm's own kernels update them untracked too.
  static void restore(Entry& entry) {
    entry.norm.running_mean.variable_data().copy_(entry.saved_mean);
    entry.norm.running_var.variable_data().copy_(entry.saved_var);
    if (entry.saved_count.defined()) {
      entry.norm.num_batches_tracked.variable_data().copy_(entry.saved_count);
    }
  }

  std::vector<Entry> entries_;
  std::unordered_map<const c10::TensorImpl*, size_t> index_;
};

} // namespace gpipe::detail
