// Choosing `balance` (layers per partition) from measured costs.
//
// Why: a pipeline runs at the speed of its slowest stage and fails on its
// fullest device, and an even split by layer count is wrong for nearly every
// real model (a wide first layer, convolutions at falling resolutions, a big
// head). This header profiles each layer on a sample micro-batch, by time
// (forward + backward) or by the memory the pipe will actually keep, and
// picks the contiguous split that minimizes the largest partition cost
// exactly (dynamic programming, not torchgpipe's block-partition heuristic),
// optionally under a per-partition memory budget. Profiling leaves the model
// as it found it: parameters, gradients, buffers and RNG state bit-identical.
//
// Opt-in (not in <gpipe/gpipe.h>): memory profiling uses the memory meter,
// whose CPU counter installs a process-wide allocator on first use
// (<gpipe/memory.h>), and a library user who never balances should not pull
// that in. Include <gpipe/balance.h> next to <gpipe/gpipe.h>.
//
//   auto sample = x.slice(0, 0, x.size(0) / 8);          // one micro-batch
//   auto balance = gpipe::balance_by_time(seq, sample, 4);
//   gpipe::GPipe<torch::nn::Sequential> pipe(
//       seq, gpipe::GPipeOptions(4).balance(balance).microbatches(8));
//   std::cout << gpipe::balance_report(gpipe::profile_times(seq, sample),
//                                      balance);
#pragma once

#include <gpipe/detail/microbatch.h>
#include <gpipe/detail/observer.h>
#include <gpipe/detail/partition.h>
#include <gpipe/memory.h>
#include <gpipe/options.h>
#include <gpipe/schedule.h>

#include <c10/util/Exception.h>
#include <torch/arg.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/cuda.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/types.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <iomanip>
#include <limits>
#include <optional>
#include <ostream>
#include <sstream>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

namespace gpipe {

/// How `profile_times` and `balance_by_time` measure.
struct TimeOptions {
  /// Passes over all layers before measuring (allocator, kernels, caches).
  TORCH_ARG(int64_t, warmup) = 2;
  /// Measured passes; each layer's time is the median over them.
  TORCH_ARG(int64_t, repeats) = 5;
};

/// What one layer costs in memory on its device, for one micro-batch (the
/// sample), as `profile_memory` measures it.
struct LayerMemory {
  /// Parameters owned by this layer (a parameter shared with an earlier
  /// layer is counted there only).
  int64_t parameter_bytes = 0;
  /// Of those, the parameters that require grad: each gets a `.grad`.
  int64_t gradient_bytes = 0;
  /// Buffers (BatchNorm running statistics, ...).
  int64_t buffer_bytes = 0;
  /// The layer's input tensor (what a partition starting here keeps per
  /// micro-batch).
  int64_t input_bytes = 0;
  /// The layer's output tensor (what a checkpointed partition ending here
  /// keeps per micro-batch).
  int64_t output_bytes = 0;
  /// What the layer adds to what a forward with autograd holds: its output
  /// and the tensors it saves for backward, less its input when nothing
  /// keeps that (so it can be negative); Note [What a layer keeps].
  int64_t activation_bytes = 0;
  /// The peak rise over the layer's backward on its own: the gradient that
  /// arrives, the gradients it computes and its workspace.
  int64_t backward_bytes = 0;
};

/// How the pipe will hold memory, beyond the checkpoint mode and micro-batch
/// count that `balance_by_memory` takes as arguments.
struct MemoryOptions {
  /// The schedule `step` will run: with 1F1B partition j keeps at most
  /// min(microbatches, partitions - j) micro-batches in flight.
  TORCH_ARG(Schedule, schedule) = Schedule::FillDrain;
  /// Optimizer state per gradient byte: 0 for plain SGD, 1 for SGD with
  /// momentum, 2 for Adam.
  TORCH_ARG(double, optimizer_factor) = 0;
  /// Bytes one partition may use (its device's budget); none: unlimited.
  TORCH_ARG(std::optional<int64_t>, budget) = std::nullopt;
};

namespace detail {

inline void check_partitions(int64_t layers, int64_t partitions) {
  TORCH_CHECK(
      layers >= 1,
      "gpipe: cannot balance an empty Sequential (layers: ",
      layers,
      ")");
  TORCH_CHECK(
      partitions >= 1,
      "gpipe: partitions must be at least 1 (partitions: ",
      partitions,
      ")");
  TORCH_CHECK(
      partitions <= layers,
      "gpipe: more partitions than layers (partitions: ",
      partitions,
      ", layers: ",
      layers,
      ")");
}

inline void check_costs(const std::vector<double>& costs) {
  for (size_t l = 0; l < costs.size(); ++l) {
    TORCH_CHECK(
        std::isfinite(costs[l]) && costs[l] >= 0,
        "gpipe: layer costs must be finite and non-negative (cost[",
        l,
        "]: ",
        costs[l],
        ")");
  }
}

inline void check_memory_options(
    int64_t microbatches,
    const MemoryOptions& options) {
  check_microbatches(microbatches);
  TORCH_CHECK(
      std::isfinite(options.optimizer_factor()) &&
          options.optimizer_factor() >= 0,
      "gpipe: optimizer_factor must be finite and non-negative (optimizer_factor: ",
      options.optimizer_factor(),
      ")");
  TORCH_CHECK(
      !options.budget() || *options.budget() >= 1,
      "gpipe: a memory budget must be at least 1 byte (budget: ",
      options.budget().value_or(0),
      ")");
}

/// Note [The exact split]
/// Layers 0..L-1 go to partitions 0..K-1 in order, each partition a
/// non-empty run [begin, end). `cost(j, begin, end)` is what partition j costs
/// holding that run, `fits(j, begin, end)` whether it may hold it at all. The
/// split minimizes the largest partition cost over all splits that fit:
///   best[j][b] = min over e of max(cost(j, b, e), best[j + 1][e]),
/// the lowest bottleneck of partitions j..K-1 holding layers b..L-1, with
/// best[K][L] the empty pipe. O(K L^2) evaluations of `cost`; a cost may
/// depend on the partition (1F1B keeps more micro-batches early) and on its
/// ends (a partition keeps its first layer's input), which is why this is not
/// a binary search over prefix sums. Ties are broken the same way every time:
/// among the splits with the optimal bottleneck T, the most even one (the
/// least sum of squared partition costs, a second DP over the splits whose
/// partitions all stay within T), so a noisy measurement does not leave a
/// second partition right at the bottleneck; then the lexicographically
/// smallest (each partition, from the first, as short as it can be). Returns
/// nothing when no split fits.
inline std::optional<std::vector<int64_t>> solve_split(
    int64_t layers,
    int64_t partitions,
    const std::function<double(int64_t, int64_t, int64_t)>& cost,
    const std::function<bool(int64_t, int64_t, int64_t)>& fits) {
  check_partitions(layers, partitions);
  constexpr double kNone = std::numeric_limits<double>::infinity();
  const auto L = static_cast<size_t>(layers);
  const auto K = static_cast<size_t>(partitions);
  std::vector<std::vector<double>> best(
      K + 1, std::vector<double>(L + 1, kNone));
  best[K][L] = -kNone;
  // Partition j holds layers [b, e) with j <= b and enough layers left over
  // for the partitions after it.
  auto candidate = [&](size_t j, size_t b, size_t e) {
    const double next = best[j + 1][e];
    if (next == kNone ||
        !fits(
            static_cast<int64_t>(j),
            static_cast<int64_t>(b),
            static_cast<int64_t>(e))) {
      return kNone;
    }
    return std::max(
        cost(
            static_cast<int64_t>(j),
            static_cast<int64_t>(b),
            static_cast<int64_t>(e)),
        next);
  };
  for (size_t j = K; j-- > 0;) {
    for (size_t b = j; b + (K - j) <= L; ++b) {
      double lowest = kNone;
      for (size_t e = b + 1; e + (K - j - 1) <= L; ++e) {
        lowest = std::min(lowest, candidate(j, b, e));
      }
      best[j][b] = lowest;
    }
  }
  if (best[0][0] == kNone) {
    return std::nullopt;
  }
  // Among the splits within the bottleneck, the least sum of squares:
  // spread[j][b] for partitions j..K-1 holding layers b..L-1.
  const double bound = best[0][0];
  std::vector<std::vector<double>> spread(
      K + 1, std::vector<double>(L + 1, kNone));
  spread[K][L] = 0;
  auto squares = [&](size_t j, size_t b, size_t e) {
    const double next = spread[j + 1][e];
    if (next == kNone ||
        !fits(
            static_cast<int64_t>(j),
            static_cast<int64_t>(b),
            static_cast<int64_t>(e))) {
      return kNone;
    }
    const double own = cost(
        static_cast<int64_t>(j),
        static_cast<int64_t>(b),
        static_cast<int64_t>(e));
    return own <= bound ? own * own + next : kNone;
  };
  for (size_t j = K; j-- > 0;) {
    for (size_t b = j; b + (K - j) <= L; ++b) {
      double lowest = kNone;
      for (size_t e = b + 1; e + (K - j - 1) <= L; ++e) {
        lowest = std::min(lowest, squares(j, b, e));
      }
      spread[j][b] = lowest;
    }
  }
  // Each partition as short as the most even split allows: the first e that
  // reaches spread[j][b] (the same expression, so equality is exact).
  std::vector<int64_t> balance;
  size_t b = 0;
  for (size_t j = 0; j < K; ++j) {
    for (size_t e = b + 1; e + (K - j - 1) <= L; ++e) {
      if (squares(j, b, e) == spread[j][b]) {
        balance.push_back(static_cast<int64_t>(e - b));
        b = e;
        break;
      }
    }
  }
  TORCH_INTERNAL_ASSERT(
      balance.size() == K && b == L, "gpipe: the split lost its way");
  return balance;
}

/// Prefix sums of `costs`: the sum of layers [b, e) is sums[e] - sums[b].
inline std::vector<double> prefix_sums(const std::vector<double>& costs) {
  std::vector<double> sums(costs.size() + 1, 0.0);
  for (size_t l = 0; l < costs.size(); ++l) {
    sums[l + 1] = sums[l] + costs[l];
  }
  return sums;
}

/// Note [What a partition keeps]
/// The bytes partition j of K holds on its device when it holds layers
/// [b, e), for micro-batches of the sample's size, as `step` keeps them:
///   * parameters and buffers; a gradient per trainable parameter; optimizer
///     state of `optimizer_factor` bytes per gradient byte;
///   * its input for every micro-batch in flight (a_j of them: all m on
///     fill-drain, min(m, K - j) on 1F1B), kept until that micro-batch's
///     backward on this partition;
///   * without checkpointing, every in-flight micro-batch's whole graph (the
///     activation bytes of its layers: saved tensors and output, Note [What
///     a layer keeps]);
///   * with checkpointing, each checkpointed micro-batch's output, and one
///     graph at a time while it is recomputed. ExceptLast keeps the last
///     micro-batch's graph from forward: on fill-drain its backward runs
///     first, so still one graph at a time; on 1F1B it can be alive while
///     another micro-batch recomputes, so two;
///   * the backward of one layer at a time: the largest backward_bytes of
///     its layers (without it the model predicted 0.8x what a checkpointed
///     step measured).
/// Partitions are assumed to have a device each (partitions sharing a device
/// add up). Allocator rounding, forward workspaces and the loss are not
/// counted.
class MemoryModel {
 public:
  MemoryModel(
      std::vector<LayerMemory> layers,
      int64_t partitions,
      Checkpoint checkpoint,
      int64_t microbatches,
      const MemoryOptions& options)
      : layers_(std::move(layers)),
        partitions_(partitions),
        checkpoint_(checkpoint),
        microbatches_(microbatches),
        options_(options) {
    check_memory_options(microbatches_, options_);
    std::vector<double> fixed;
    std::vector<double> graph;
    for (const auto& layer : layers_) {
      fixed.push_back(
          static_cast<double>(layer.parameter_bytes + layer.buffer_bytes) +
          static_cast<double>(layer.gradient_bytes) *
              (1.0 + options_.optimizer_factor()));
      graph.push_back(static_cast<double>(layer.activation_bytes));
    }
    fixed_ = prefix_sums(fixed);
    graph_ = prefix_sums(graph);
    // A sparse table for the largest backward_bytes of a run of layers:
    // most_[p][l] covers layers [l, l + 2^p).
    most_.emplace_back();
    for (const auto& layer : layers_) {
      most_[0].push_back(static_cast<double>(layer.backward_bytes));
    }
    for (size_t p = 1; (size_t{1} << p) <= layers_.size(); ++p) {
      const size_t half = size_t{1} << (p - 1);
      std::vector<double> row;
      for (size_t l = 0; l + 2 * half <= layers_.size(); ++l) {
        row.push_back(std::max(most_[p - 1][l], most_[p - 1][l + half]));
      }
      most_.push_back(std::move(row));
    }
  }

  /// The largest backward_bytes of layers [b, e).
  double largest_backward(int64_t b, int64_t e) const {
    size_t p = 0;
    while ((size_t{2} << p) <= static_cast<size_t>(e - b)) {
      ++p;
    }
    return std::max(
        most_[p][static_cast<size_t>(b)],
        most_[p][static_cast<size_t>(e) - (size_t{1} << p)]);
  }

  /// Micro-batches in flight on partition j.
  int64_t in_flight(int64_t j) const {
    return options_.schedule() == Schedule::FillDrain
        ? microbatches_
        : std::min(microbatches_, partitions_ - j);
  }

  /// The layer's own bytes: fixed, plus one micro-batch's graph.
  double layer_bytes(int64_t l) const {
    const auto i = static_cast<size_t>(l);
    return (fixed_[i + 1] - fixed_[i]) + (graph_[i + 1] - graph_[i]);
  }

  /// Note [What a partition keeps].
  double partition_bytes(int64_t j, int64_t b, int64_t e) const {
    const int64_t a = in_flight(j);
    int64_t graphs = 0;
    int64_t kept_outputs = 0;
    switch (checkpoint_) {
      case Checkpoint::Never:
        graphs = a;
        break;
      case Checkpoint::Always:
        graphs = 1;
        kept_outputs = a;
        break;
      case Checkpoint::ExceptLast:
        graphs = (options_.schedule() == Schedule::FillDrain || a == 1 ||
                  microbatches_ == 1)
            ? 1
            : 2;
        kept_outputs = a - 1;
        break;
    }
    const auto& first = layers_[static_cast<size_t>(b)];
    const auto& last = layers_[static_cast<size_t>(e - 1)];
    return (fixed_[static_cast<size_t>(e)] - fixed_[static_cast<size_t>(b)]) +
        static_cast<double>(a) * static_cast<double>(first.input_bytes) +
        static_cast<double>(kept_outputs) *
        static_cast<double>(last.output_bytes) +
        static_cast<double>(graphs) *
        (graph_[static_cast<size_t>(e)] - graph_[static_cast<size_t>(b)]) +
        largest_backward(b, e);
  }

  int64_t layers() const {
    return static_cast<int64_t>(layers_.size());
  }

  const MemoryOptions& options() const {
    return options_;
  }

  /// The lowest bottleneck in bytes over all splits: the smallest budget
  /// that some split fits.
  int64_t smallest_budget() const {
    const auto split = solve_split(
        layers(),
        partitions_,
        [this](int64_t j, int64_t b, int64_t e) {
          return partition_bytes(j, b, e);
        },
        [](int64_t, int64_t, int64_t) { return true; });
    int64_t most = 0;
    int64_t b = 0;
    for (size_t j = 0; j < split->size(); ++j) {
      const int64_t e = b + (*split)[j];
      most = std::max(
          most,
          static_cast<int64_t>(
              std::ceil(partition_bytes(static_cast<int64_t>(j), b, e))));
      b = e;
    }
    return most;
  }

  /// Whether partition j may hold [b, e) under the budget.
  bool fits(int64_t j, int64_t b, int64_t e) const {
    return !options_.budget() ||
        partition_bytes(j, b, e) <= static_cast<double>(*options_.budget());
  }

  /// Fails, naming the smallest budget that would fit, when none does.
  [[noreturn]] void reject_budget() const {
    TORCH_CHECK(
        false,
        "gpipe: no balance fits the memory budget (budget: ",
        *options_.budget(),
        " bytes, smallest feasible budget: ",
        smallest_budget(),
        " bytes, partitions: ",
        partitions_,
        ", checkpoint: ",
        checkpoint_,
        ", microbatches: ",
        microbatches_,
        ")");
  }

 private:
  std::vector<LayerMemory> layers_;
  int64_t partitions_;
  Checkpoint checkpoint_;
  int64_t microbatches_;
  MemoryOptions options_;
  std::vector<double> fixed_; // prefix sums
  std::vector<double> graph_; // prefix sums
  std::vector<std::vector<double>> most_; // sparse table of backward_bytes
};

/// Checks the Sequential and the sample, and that every layer's parameters
/// and buffers are on the sample's device (profiling runs there).
inline void check_profile_arguments(
    const torch::nn::Sequential& seq,
    const torch::Tensor& sample) {
  TORCH_CHECK(
      !seq.is_empty(),
      "gpipe: balancing needs a Sequential, got an empty holder");
  TORCH_CHECK(
      seq->size() >= 1,
      "gpipe: cannot balance an empty Sequential (layers: 0)");
  check_batch(sample, "sample");
  TORCH_CHECK(
      sample.numel() >= 1,
      "gpipe: sample is empty (sample shape: ",
      sample.sizes(),
      ")");
  const auto device = sample.device();
  size_t l = 0;
  for (const auto& layer : *seq) {
    for (const auto& tensor : layer.ptr()->parameters()) {
      TORCH_CHECK(
          tensor.device() == device,
          "gpipe: layer ",
          l,
          " has a parameter on ",
          tensor.device(),
          " but the sample is on ",
          device,
          " (profiling runs on the sample's device: move the Sequential there first)");
    }
    for (const auto& tensor : layer.ptr()->buffers()) {
      TORCH_CHECK(
          tensor.device() == device,
          "gpipe: layer ",
          l,
          " has a buffer on ",
          tensor.device(),
          " but the sample is on ",
          device,
          " (profiling runs on the sample's device: move the Sequential there first)");
    }
    ++l;
  }
}

/// Waits for the device's queued work (CUDA); a no-op on the CPU.
inline void synchronize(const torch::Device& device) {
  if (device.is_cuda()) {
    torch::cuda::synchronize(device.has_index() ? device.index() : -1);
  }
}

/// Note [Profiling leaves the model as it found it]
/// Saves, on construction, a copy of every parameter, buffer and `.grad` of
/// the Sequential (on the CPU, so a device's memory is not doubled) and the
/// CPU generator's and the sample device's generator's states; restores them
/// on destruction. Buffers are always written back: BatchNorm's kernel
/// updates its running statistics without moving their version counter. A
/// parameter or `.grad` is written back only if its version counter moved
/// (every in-place write through the dispatcher moves it), so untouched
/// parameters keep their version and any graph that saved them stays valid.
/// A `.grad` that was replaced or dropped is put back as the very tensor it
/// was. Costs one host copy of the model while profiling.
class ModelStateGuard {
 public:
  ModelStateGuard(const torch::nn::Sequential& seq, const torch::Device& device)
      : rng_(GeneratorStates::capture(device)), device_(device) {
    for (const auto& parameter : seq->parameters()) {
      save(parameter, /*always=*/false);
      grads_.push_back(
          {parameter,
           parameter.grad(),
           parameter.grad().defined() ? host_copy(parameter.grad())
                                      : torch::Tensor(),
           parameter.grad().defined() ? parameter.grad()._version() : 0});
    }
    for (const auto& buffer : seq->buffers()) {
      save(buffer, /*always=*/true);
    }
  }

  ~ModelStateGuard() {
    try {
      restore();
    } catch (...) {
      // A destructor must not throw; restore() only copies tensors that
      // already fit, so this is not expected.
    }
  }

  ModelStateGuard(const ModelStateGuard&) = delete;
  ModelStateGuard& operator=(const ModelStateGuard&) = delete;

 private:
  struct Saved {
    torch::Tensor tensor;
    torch::Tensor copy;
    int64_t version;
    bool always; // write back even if the version did not move
  };
  struct SavedGrad {
    torch::Tensor parameter;
    torch::Tensor grad; // the very tensor, or undefined
    torch::Tensor copy;
    int64_t version;
  };

  static torch::Tensor host_copy(const torch::Tensor& tensor) {
    return tensor.detach().to(
        torch::kCPU, /*non_blocking=*/false, /*copy=*/true);
  }

  void save(const torch::Tensor& tensor, bool always) {
    tensors_.push_back({tensor, host_copy(tensor), tensor._version(), always});
  }

  void restore() {
    torch::NoGradGuard no_grad;
    for (auto& saved : tensors_) {
      if (saved.always || saved.tensor._version() != saved.version) {
        saved.tensor.detach().copy_(saved.copy);
      }
    }
    for (auto& saved : grads_) {
      auto& grad = saved.parameter.mutable_grad();
      if (!saved.grad.defined()) {
        grad.reset();
        continue;
      }
      if (!grad.is_same(saved.grad)) {
        grad = saved.grad;
      }
      if (grad._version() != saved.version) {
        grad.detach().copy_(saved.copy);
      }
    }
    rng_.restore(device_);
  }

  GeneratorStates rng_;
  torch::Device device_;
  std::vector<Saved> tensors_;
  std::vector<SavedGrad> grads_;
};

/// A fresh leaf for one layer's input: requires grad when it can, as a
/// partition's input does.
inline torch::Tensor profile_input(const torch::Tensor& x) {
  auto leaf = x.detach();
  if (leaf.is_floating_point() || leaf.is_complex()) {
    leaf.requires_grad_(true);
  }
  return leaf;
}

/// What backward differentiates for one layer: its input, if it requires
/// grad, and its parameters that do.
inline std::vector<torch::Tensor> backward_targets(
    const torch::nn::Sequential& layer,
    const torch::Tensor& input) {
  std::vector<torch::Tensor> targets;
  if (input.requires_grad()) {
    targets.push_back(input);
  }
  for (const auto& parameter : layer->parameters()) {
    if (parameter.requires_grad()) {
      targets.push_back(parameter);
    }
  }
  return targets;
}

inline double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  return n % 2 == 1 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

/// "12.3 ms", "4.50 MB": a cost in a readable unit ("s" or "B").
inline std::string format_cost(double value, const std::string& unit) {
  std::ostringstream out;
  out << std::fixed;
  if (unit == "s") {
    if (value >= 1.0) {
      out << std::setprecision(3) << value << " s";
    } else if (value >= 1e-3) {
      out << std::setprecision(3) << value * 1e3 << " ms";
    } else {
      out << std::setprecision(1) << value * 1e6 << " us";
    }
  } else if (unit == "B") {
    if (value >= 1e9) {
      out << std::setprecision(2) << value / 1e9 << " GB";
    } else if (value >= 1e6) {
      out << std::setprecision(2) << value / 1e6 << " MB";
    } else if (value >= 1e3) {
      out << std::setprecision(1) << value / 1e3 << " kB";
    } else {
      out << std::setprecision(0) << value << " B";
    }
  } else {
    out << std::setprecision(4) << value;
    if (!unit.empty()) {
      out << " " << unit;
    }
  }
  return out.str();
}

} // namespace detail

/// Each layer's forward + backward time in seconds on `sample` (one
/// micro-batch, on the device where the Sequential is): every layer runs on
/// the previous layer's output, detached, so its time is its own; backward
/// differentiates its input and parameters with `torch::autograd::grad`, so
/// `.grad` is never written. After `warmup` passes, the median of `repeats`
/// passes; on CUDA the device is synchronized around every measured region.
/// Runs in the layers' current mode (call `train()` first to profile
/// training). Leaves parameters, gradients, buffers and the generators as it
/// found them (Note [Profiling leaves the model as it found it]).
inline std::vector<double> profile_times(
    const torch::nn::Sequential& seq,
    const torch::Tensor& sample,
    const TimeOptions& options = {}) {
  detail::check_profile_arguments(seq, sample);
  TORCH_CHECK(
      options.warmup() >= 0,
      "gpipe: warmup must be at least 0 (warmup: ",
      options.warmup(),
      ")");
  TORCH_CHECK(
      options.repeats() >= 1,
      "gpipe: repeats must be at least 1 (repeats: ",
      options.repeats(),
      ")");
  using Clock = std::chrono::steady_clock;
  const auto device = sample.device();
  const auto layers =
      detail::split_sequential(seq, std::vector<int64_t>(seq->size(), 1));
  detail::ModelStateGuard guard(seq, device);
  torch::AutoGradMode enable_grad(true);
  std::vector<std::vector<double>> times(layers.size());
  for (int64_t pass = 0; pass < options.warmup() + options.repeats(); ++pass) {
    torch::Tensor x = sample;
    for (size_t l = 0; l < layers.size(); ++l) {
      auto layer = layers[l];
      const auto input = detail::profile_input(x);
      detail::synchronize(device);
      auto start = Clock::now();
      torch::Tensor output = layer->forward(input);
      detail::synchronize(device);
      double seconds =
          std::chrono::duration<double>(Clock::now() - start).count();
      const auto targets = detail::backward_targets(layer, input);
      if (output.requires_grad() && !targets.empty()) {
        auto grad_output = torch::ones_like(output);
        detail::synchronize(device);
        start = Clock::now();
        (void)torch::autograd::grad(
            {output},
            targets,
            {grad_output},
            /*retain_graph=*/false,
            /*create_graph=*/false,
            /*allow_unused=*/true);
        detail::synchronize(device);
        seconds += std::chrono::duration<double>(Clock::now() - start).count();
      }
      if (pass >= options.warmup()) {
        times[l].push_back(seconds);
      }
      x = output.detach();
    }
  }
  std::vector<double> medians;
  medians.reserve(times.size());
  for (auto& runs : times) {
    medians.push_back(detail::median(std::move(runs)));
  }
  return medians;
}

/// Note [What a layer keeps]
/// A graph keeps what its nodes save, not every output: Linear saves its
/// input, Tanh its output, so of Linear -> Tanh only the Tanh's output
/// stays (and the Linear's input). Measuring each layer alone, holding its
/// output, would count the Linear's output too (the first version did, and
/// predicted 1.7x what a step kept without checkpointing). So the whole
/// Sequential runs forward once on the sample with autograd, keeping only
/// the latest output and the graph, and a layer's activation bytes are the
/// rise of the device's allocated bytes over its forward: its output and
/// what it saves, less its input where nothing keeps that. Summed over a
/// partition [b, e) this is the partition's graph and output less its input,
/// which Note [What a partition keeps] counts apart. The whole graph of one
/// micro-batch must fit on the device.
///
/// Each layer's memory on `sample` (one micro-batch, on the device where the
/// Sequential is): parameter, gradient and buffer bytes by counting, input
/// and output bytes by size, activation bytes with the memory meter (the
/// counting CPU allocator, installed on first use, see <gpipe/memory.h>, or
/// the caching allocator's statistics on CUDA). Runs in the layers' current
/// mode. Then each layer's backward on its own, for its peak. Leaves the
/// model as it found it (Note [Profiling leaves the model as it found it]).
/// Resets the device's peak statistics (as a MemoryMeter does); other
/// threads allocating on the device meanwhile distort the measurement.
inline std::vector<LayerMemory> profile_memory(
    const torch::nn::Sequential& seq,
    const torch::Tensor& sample) {
  detail::check_profile_arguments(seq, sample);
  const auto device = sample.device();
  if (device.is_cpu()) {
    track_cpu_memory();
  }
  const auto layers =
      detail::split_sequential(seq, std::vector<int64_t>(seq->size(), 1));
  detail::ModelStateGuard guard(seq, device);
  std::vector<LayerMemory> memory(layers.size());
  std::unordered_set<const void*> seen; // shared parameters count once
  for (size_t l = 0; l < layers.size(); ++l) {
    for (const auto& parameter : layers[l]->parameters()) {
      if (seen.insert(parameter.unsafeGetTensorImpl()).second) {
        memory[l].parameter_bytes += static_cast<int64_t>(parameter.nbytes());
        if (parameter.requires_grad()) {
          memory[l].gradient_bytes += static_cast<int64_t>(parameter.nbytes());
        }
      }
    }
    for (const auto& buffer : layers[l]->buffers()) {
      if (seen.insert(buffer.unsafeGetTensorImpl()).second) {
        memory[l].buffer_bytes += static_cast<int64_t>(buffer.nbytes());
      }
    }
  }
  // One forward of the whole Sequential with autograd, as a partition runs
  // it: after each layer only its output and the graph so far are
  // referenced, so what the graph does not save is freed (Note [What a
  // layer keeps]).
  torch::AutoGradMode enable_grad(true);
  torch::Tensor x = detail::profile_input(sample);
  detail::synchronize(device);
  int64_t held = memory_stats(device).current_bytes;
  for (size_t l = 0; l < layers.size(); ++l) {
    auto layer = layers[l]; // forward() is non-const
    memory[l].input_bytes = static_cast<int64_t>(x.nbytes());
    x = layer->forward(x);
    detail::synchronize(device);
    const int64_t now = memory_stats(device).current_bytes;
    memory[l].output_bytes = static_cast<int64_t>(x.nbytes());
    memory[l].activation_bytes = now - held;
    held = now;
  }
  x = torch::Tensor(); // frees the graph
  // Each layer's backward on its own, on its input from the same forward.
  torch::Tensor input = sample;
  for (size_t l = 0; l < layers.size(); ++l) {
    auto layer = layers[l];
    const auto leaf = detail::profile_input(input);
    torch::Tensor output = layer->forward(leaf);
    const auto targets = detail::backward_targets(layer, leaf);
    if (output.requires_grad() && !targets.empty()) {
      detail::synchronize(device);
      const int64_t before = memory_stats(device).current_bytes;
      reset_peak_memory(device);
      auto grad_output = torch::ones_like(output);
      (void)torch::autograd::grad(
          {output},
          targets,
          {grad_output},
          /*retain_graph=*/false,
          /*create_graph=*/false,
          /*allow_unused=*/true);
      detail::synchronize(device);
      memory[l].backward_bytes = memory_stats(device).peak_bytes - before;
    }
    input = output.detach();
  }
  return memory;
}

/// Bytes per partition of `balance` under the memory model of Note [What a
/// partition keeps].
inline std::vector<int64_t> partition_memory(
    const std::vector<LayerMemory>& layers,
    const std::vector<int64_t>& balance,
    Checkpoint checkpoint,
    int64_t microbatches,
    const MemoryOptions& options = {}) {
  const auto resolved = detail::resolve_balance(
      static_cast<int64_t>(layers.size()),
      static_cast<int64_t>(balance.size()),
      balance);
  const detail::MemoryModel model(
      layers,
      static_cast<int64_t>(balance.size()),
      checkpoint,
      microbatches,
      options);
  std::vector<int64_t> bytes;
  int64_t b = 0;
  for (size_t j = 0; j < resolved.size(); ++j) {
    const int64_t e = b + resolved[j];
    bytes.push_back(static_cast<int64_t>(
        std::ceil(model.partition_bytes(static_cast<int64_t>(j), b, e))));
    b = e;
  }
  return bytes;
}

/// The contiguous split of layers with costs `costs` into `partitions`
/// non-empty partitions that minimizes the largest partition sum, exactly;
/// ties go to the most even split, then the lexicographically smallest
/// balance (Note [The exact split]).
inline std::vector<int64_t> balance_cost(
    const std::vector<double>& costs,
    int64_t partitions) {
  detail::check_partitions(static_cast<int64_t>(costs.size()), partitions);
  detail::check_costs(costs);
  const auto sums = detail::prefix_sums(costs);
  return *detail::solve_split(
      static_cast<int64_t>(costs.size()),
      partitions,
      [&sums](int64_t, int64_t b, int64_t e) {
        return sums[static_cast<size_t>(e)] - sums[static_cast<size_t>(b)];
      },
      [](int64_t, int64_t, int64_t) { return true; });
}

/// As above, among the splits whose every partition fits
/// `memory_options.budget()` (required) under the memory model of Note [What
/// a partition keeps] for `memory` (from `profile_memory`); fails naming the
/// smallest feasible budget when none fits. For example, the fastest split
/// that fits 16 GB a device:
///
///   auto balance = gpipe::balance_cost(
///       gpipe::profile_times(seq, sample), 4, gpipe::profile_memory(seq,
///       sample), gpipe::Checkpoint::Always, 8,
///       gpipe::MemoryOptions().budget(16'000'000'000));
inline std::vector<int64_t> balance_cost(
    const std::vector<double>& costs,
    int64_t partitions,
    const std::vector<LayerMemory>& memory,
    Checkpoint checkpoint,
    int64_t microbatches,
    const MemoryOptions& memory_options) {
  detail::check_partitions(static_cast<int64_t>(costs.size()), partitions);
  detail::check_costs(costs);
  TORCH_CHECK(
      memory.size() == costs.size(),
      "gpipe: costs and memory have different lengths (costs: ",
      costs.size(),
      ", memory: ",
      memory.size(),
      ")");
  TORCH_CHECK(
      memory_options.budget().has_value(),
      "gpipe: balance_cost with a memory model needs a budget (MemoryOptions().budget(bytes))");
  const detail::MemoryModel model(
      memory, partitions, checkpoint, microbatches, memory_options);
  const auto sums = detail::prefix_sums(costs);
  auto split = detail::solve_split(
      static_cast<int64_t>(costs.size()),
      partitions,
      [&sums](int64_t, int64_t b, int64_t e) {
        return sums[static_cast<size_t>(e)] - sums[static_cast<size_t>(b)];
      },
      [&model](int64_t j, int64_t b, int64_t e) {
        return model.fits(j, b, e);
      });
  if (!split) {
    model.reject_budget();
  }
  return *split;
}

/// The balance whose slowest partition is fastest: `profile_times` then
/// `balance_cost`. `sample` is one micro-batch on the Sequential's device.
inline std::vector<int64_t> balance_by_time(
    const torch::nn::Sequential& seq,
    const torch::Tensor& sample,
    int64_t partitions,
    const TimeOptions& options = {}) {
  detail::check_profile_arguments(seq, sample);
  detail::check_partitions(static_cast<int64_t>(seq->size()), partitions);
  return balance_cost(profile_times(seq, sample, options), partitions);
}

/// The balance whose fullest partition is smallest, in the bytes the pipe
/// will keep with `checkpoint` and `microbatches` micro-batches of the
/// sample's size (Note [What a partition keeps]): `profile_memory` then the
/// exact split. With `options.budget()`, fails naming the smallest feasible
/// budget when the best split exceeds it.
inline std::vector<int64_t> balance_by_memory(
    const torch::nn::Sequential& seq,
    const torch::Tensor& sample,
    int64_t partitions,
    Checkpoint checkpoint,
    int64_t microbatches,
    const MemoryOptions& options = {}) {
  detail::check_profile_arguments(seq, sample);
  detail::check_partitions(static_cast<int64_t>(seq->size()), partitions);
  detail::check_memory_options(microbatches, options);
  const detail::MemoryModel model(
      profile_memory(seq, sample),
      partitions,
      checkpoint,
      microbatches,
      options);
  auto split = detail::solve_split(
      model.layers(),
      partitions,
      [&model](int64_t j, int64_t b, int64_t e) {
        return model.partition_bytes(j, b, e);
      },
      [&model](int64_t j, int64_t b, int64_t e) {
        return model.fits(j, b, e);
      });
  if (!split) {
    model.reject_budget();
  }
  return *split;
}

/// What a balance costs: per layer, per partition, and how uneven it is.
/// Print it with `<<`.
struct BalanceReport {
  /// "s" (seconds) or "B" (bytes); anything else prints as is.
  std::string unit;
  std::vector<double> layer_costs;
  std::vector<int64_t> balance;
  /// Each partition's cost (for memory, including what a partition keeps at
  /// its ends, so not always the sum of its layers').
  std::vector<double> partition_costs;
  /// A line printed under the table; empty: none.
  std::string note;

  double max_cost() const {
    return *std::max_element(partition_costs.begin(), partition_costs.end());
  }

  double mean_cost() const {
    double sum = 0;
    for (const double cost : partition_costs) {
      sum += cost;
    }
    return sum / static_cast<double>(partition_costs.size());
  }

  /// max / mean: 1 is perfectly even; a pipe runs at max, so 1.5 means a
  /// third of every step is spent waiting.
  double imbalance() const {
    const double mean = mean_cost();
    return mean > 0 ? max_cost() / mean : 1.0;
  }
};

inline std::ostream& operator<<(std::ostream& os, const BalanceReport& report) {
  os << "balance [";
  for (size_t j = 0; j < report.balance.size(); ++j) {
    os << (j ? ", " : "") << report.balance[j];
  }
  os << "] (" << report.layer_costs.size() << " layers, "
     << report.balance.size() << " partitions)\n";
  os << "  partition  layers        cost          layer costs\n";
  size_t l = 0;
  for (size_t j = 0; j < report.balance.size(); ++j) {
    const size_t begin = l;
    const size_t end = l + static_cast<size_t>(report.balance[j]);
    std::ostringstream layers;
    layers << begin << "-" << end - 1;
    // Eight layer costs a line, continued under the first.
    std::ostringstream costs;
    for (l = begin; l < end; ++l) {
      if (l > begin) {
        costs << ((l - begin) % 8 == 0 ? ",\n" + std::string(41, ' ') : ", ");
      }
      costs << detail::format_cost(report.layer_costs[l], report.unit);
    }
    os << "  " << std::setw(9) << j << "  " << std::left << std::setw(12)
       << layers.str() << "  " << std::setw(12)
       << detail::format_cost(report.partition_costs[j], report.unit)
       << std::right << "  " << costs.str() << "\n";
  }
  os << "  max " << detail::format_cost(report.max_cost(), report.unit)
     << ", mean " << detail::format_cost(report.mean_cost(), report.unit)
     << ", imbalance (max/mean) " << std::fixed << std::setprecision(2)
     << report.imbalance() << std::defaultfloat << "\n";
  if (!report.note.empty()) {
    os << "  " << report.note << "\n";
  }
  return os;
}

/// The report of `balance` for additive per-layer costs, e.g. the seconds of
/// `profile_times` (unit "s").
inline BalanceReport balance_report(
    const std::vector<double>& layer_costs,
    const std::vector<int64_t>& balance,
    std::string unit = "s") {
  detail::check_costs(layer_costs);
  BalanceReport report;
  report.unit = std::move(unit);
  report.layer_costs = layer_costs;
  report.balance = detail::resolve_balance(
      static_cast<int64_t>(layer_costs.size()),
      static_cast<int64_t>(balance.size()),
      balance);
  size_t l = 0;
  for (const int64_t size : report.balance) {
    double sum = 0;
    for (int64_t k = 0; k < size; ++k, ++l) {
      sum += layer_costs[l];
    }
    report.partition_costs.push_back(sum);
  }
  return report;
}

/// The report of `balance` in bytes for the memory of `profile_memory`:
/// each layer's own bytes (parameters, gradients, optimizer state, buffers
/// and one micro-batch's graph) and each partition's bytes as the pipe keeps
/// them (Note [What a partition keeps]).
inline BalanceReport balance_report(
    const std::vector<LayerMemory>& layers,
    const std::vector<int64_t>& balance,
    Checkpoint checkpoint,
    int64_t microbatches,
    const MemoryOptions& options = {}) {
  const detail::MemoryModel model(
      layers,
      static_cast<int64_t>(std::max<size_t>(balance.size(), 1)),
      checkpoint,
      microbatches,
      options);
  BalanceReport report;
  report.unit = "B";
  for (int64_t l = 0; l < model.layers(); ++l) {
    report.layer_costs.push_back(model.layer_bytes(l));
  }
  report.balance = balance;
  for (const int64_t bytes :
       partition_memory(layers, balance, checkpoint, microbatches, options)) {
    report.partition_costs.push_back(static_cast<double>(bytes));
  }
  std::ostringstream note;
  note << "partition bytes: checkpoint " << checkpoint << ", " << microbatches
       << " micro-batches, " << options.schedule() << ", optimizer factor "
       << options.optimizer_factor()
       << "; layer costs count one micro-batch's activations";
  report.note = note.str();
  return report;
}

/// The step time that per-partition costs predict for fill-drain with m
/// micro-batches, as gpipe runs it: clock ticks in lockstep (forward ticks,
/// then backward ticks), each as long as its slowest active partition.
/// With forward + backward costs from `profile_times` this is
///   sum over the m + n - 1 ticks k of max { cost[j] : 0 <= k - j < m },
/// exact when every partition's forward : backward ratio is the same.
inline double predicted_step_time(
    const std::vector<double>& partition_costs,
    int64_t microbatches) {
  detail::check_costs(partition_costs);
  const auto n = static_cast<int64_t>(partition_costs.size());
  TORCH_CHECK(
      n >= 1,
      "gpipe: predicted_step_time needs at least one partition (partitions: 0)");
  double total = 0;
  for (const auto& tick : clock_cycles(microbatches, n)) {
    double slowest = 0;
    for (const auto& cell : tick) {
      slowest =
          std::max(slowest, partition_costs[static_cast<size_t>(cell.second)]);
    }
    total += slowest;
  }
  return total;
}

} // namespace gpipe
