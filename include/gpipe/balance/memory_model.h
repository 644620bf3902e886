// What a partition keeps in memory, predicted from per-layer measurements.
//
// Why a model and not a measurement per candidate split: balancing by memory
// compares thousands of splits, and the bytes a partition holds depend on
// the schedule, the checkpoint mode, the micro-batch count and where the
// partition begins and ends, none of which profiling one micro-batch layer
// by layer can see directly. The model combines the layers' bytes
// (LayerMemory, from `profile_memory`) the way `step` holds them (Note [What
// a partition keeps]); the memory tests check it against measured steps.
#pragma once

#include <gpipe/balance/split.h>
#include <gpipe/detail/microbatch.h>
#include <gpipe/detail/partition.h>
#include <gpipe/options.h>
#include <gpipe/schedule.h>

#include <c10/util/Exception.h>
#include <torch/arg.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

namespace gpipe {

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
  /// The layer's input tensors (what a partition starting here keeps per
  /// micro-batch), all of them when it takes a list.
  int64_t input_bytes = 0;
  /// The layer's output tensors (what a checkpointed partition ending here
  /// keeps per micro-batch).
  int64_t output_bytes = 0;
  /// What the layer adds to what a forward with autograd holds: its outputs,
  /// the skips it stashes and the tensors it saves for backward, less its
  /// inputs when nothing keeps them (so it can be negative); Note [What a
  /// layer keeps].
  int64_t activation_bytes = 0;
  /// The peak rise over the layer's backward on its own: the gradient that
  /// arrives, the gradients it computes and its workspace.
  int64_t backward_bytes = 0;
};

namespace detail {

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

  int64_t partitions() const {
    return partitions_;
  }

  /// Each partition's bytes, rounded up, when the layers are split by
  /// `balance` (a resolved one: sizes that sum to the layers).
  std::vector<int64_t> bytes_of(const std::vector<int64_t>& balance) const {
    std::vector<int64_t> bytes;
    int64_t b = 0;
    for (size_t j = 0; j < balance.size(); ++j) {
      const int64_t e = b + balance[j];
      bytes.push_back(static_cast<int64_t>(
          std::ceil(partition_bytes(static_cast<int64_t>(j), b, e))));
      b = e;
    }
    return bytes;
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
    const auto bytes = bytes_of(*split);
    return *std::max_element(bytes.begin(), bytes.end());
  }

  /// Whether partition j may hold [b, e) under the budget.
  bool fits(int64_t j, int64_t b, int64_t e) const {
    return !options_.budget() ||
        partition_bytes(j, b, e) <= static_cast<double>(*options_.budget());
  }

  /// The exact split by `cost` among those that fit the budget (Note [The
  /// exact split]); fails naming the smallest feasible budget when none does.
  std::vector<int64_t> split(const SplitCost& cost) const {
    auto split = solve_split(
        layers(), partitions_, cost, [this](int64_t j, int64_t b, int64_t e) {
          return fits(j, b, e);
        });
    if (!split) {
      reject_budget();
    }
    return *split;
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

} // namespace detail

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
  return model.bytes_of(resolved);
}

} // namespace gpipe
