// Options of GPipe, in LibTorch's style: the required argument in the
// constructor, everything else a chainable TORCH_ARG with a default, so
// `GPipeOptions(4).microbatches(8).checkpoint(Checkpoint::Always)` reads like
// the paper's knobs.
#pragma once

#include <gpipe/program.h>
#include <gpipe/schedule.h>

#include <torch/arg.h>
#include <torch/types.h>

#include <cstdint>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

namespace gpipe {

/// When a partition re-materializes its activations during backward instead
/// of keeping them from forward.
enum class Checkpoint {
  /// Keep every activation (fastest, most memory).
  Never,
  /// Recompute every micro-batch but the last one, whose backward starts
  /// right after its forward (the paper's choice, the default).
  ExceptLast,
  /// Recompute every micro-batch.
  Always,
};

inline const char* to_string(Checkpoint mode) {
  switch (mode) {
    case Checkpoint::Never:
      return "never";
    case Checkpoint::ExceptLast:
      return "except_last";
    case Checkpoint::Always:
      return "always";
  }
  return "unknown";
}

inline std::ostream& operator<<(std::ostream& os, Checkpoint mode) {
  return os << to_string(mode);
}

/// How `step` combines the per-micro-batch losses into the batch's loss.
enum class Reduction {
  /// loss_fn is a mean over its micro-batch: each micro-batch's loss is
  /// weighted by its share of the batch, so uneven micro-batches give exactly
  /// the mean over the whole batch.
  Mean,
  /// loss_fn is a sum over its micro-batch: the losses are added.
  Sum,
};

inline const char* to_string(Reduction reduction) {
  return reduction == Reduction::Mean ? "mean" : "sum";
}

inline std::ostream& operator<<(std::ostream& os, Reduction reduction) {
  return os << to_string(reduction);
}

/// The options of a pipe, LibTorch style: `GPipeOptions(4).microbatches(8)`.
/// Each option is a `TORCH_ARG`: `options.microbatches(8)` sets it and
/// returns the options, `options.microbatches()` reads it. `partitions`,
/// `balance`, `devices`, `lanes` and `concurrent_cpu_partitions` are fixed
/// when the pipe is built; the others may change between calls.
struct GPipeOptions {
  /// Options for a pipe of `partitions` partitions, every other option at
  /// its default.
  /* implicit */ GPipeOptions(int64_t partitions) : partitions_(partitions) {}

  /// Number of partitions (pipeline stages) K.
  TORCH_ARG(int64_t, partitions);
  /// Number of micro-batches M a batch is split into (fewer if the batch is
  /// smaller than M).
  TORCH_ARG(int64_t, microbatches) = 1;
  /// Which micro-batches re-materialize their activations in backward.
  TORCH_ARG(Checkpoint, checkpoint) = Checkpoint::ExceptLast;
  /// Layers per partition; empty splits the layers evenly by count.
  TORCH_ARG(std::vector<int64_t>, balance) = {};
  /// One device per partition; empty puts partition j on CUDA device
  /// j mod (visible devices), or on the CPU when there is no GPU.
  TORCH_ARG(std::vector<torch::Device>, devices) = {};
  /// The order of forwards and backwards in `step` (`forward` then
  /// `backward()` is always fill-drain).
  TORCH_ARG(Schedule, schedule) = Schedule::FillDrain;
  /// A program of your own for `step` (program.h), run instead of
  /// `schedule()`. It must have the pipe's partition count, the batch's
  /// micro-batch count and the pipe's lanes; it is validated before it runs.
  TORCH_ARG(std::optional<Program>, program) = std::nullopt;
  /// The lane each partition runs on: lanes run at once, each a thread
  /// running its partitions' actions in program order. Empty: one lane per
  /// device (per CPU partition with `concurrent_cpu_partitions`). A lane
  /// holds partitions of one device; a CUDA device has one lane. Several
  /// partitions per lane is what Schedule::Interleaved1F1B and
  /// Schedule::LoopedBFS run on (partition j on lane j mod L).
  TORCH_ARG(std::vector<int64_t>, lanes) = {};
  /// With Schedule::Auto: the most micro-batch activations each lane may
  /// hold at once, counted per stage (a lane whose two stages both hold
  /// micro-batch i holds 2), as search_schedule's memory_limit; 0: the
  /// partition count, what 1F1B holds on its first lane.
  TORCH_ARG(double, activation_limit) = 0;
  /// How `step` combines micro-batch losses.
  TORCH_ARG(Reduction, loss_reduction) = Reduction::Mean;
  /// Give every CPU partition a thread of its own, so CPU partitions run at
  /// the same time like partitions on different GPUs do. Off by default:
  /// all CPU partitions draw from the one CPU generator, so with concurrent
  /// lanes which mask a dropout draws depends on thread timing (recompute
  /// still replays exactly the mask its forward drew).
  TORCH_ARG(bool, concurrent_cpu_partitions) = false;
  /// BatchNorm running statistics over the whole mini-batch: training still
  /// normalizes each micro-batch with its own statistics, but the running
  /// mean and (unbiased) variance take one step per call on the statistics
  /// of the whole batch, and num_batches_tracked advances by one, as plain
  /// training of the whole batch does. Off: each micro-batch updates them,
  /// as plain training of M smaller batches would.
  TORCH_ARG(bool, deferred_batch_norm) = false;
  /// Parameters that train as one tensor though they are separate (a head
  /// on the last partition's GPU tied to the embedding on the first's), by
  /// the Sequential's names: every copy's gradient is the sum over all
  /// copies and every copy stays equal (Note [Declared ties train as one
  /// tensor]). A module shared by partitions on one device needs no tie.
  TORCH_ARG(std::vector<std::vector<std::string>>, ties) = {};

 public:
  /// Declares one tie, e.g. `tie({"0.weight", "7.weight"})`: the copies
  /// take the first one's value when the pipe is built.
  GPipeOptions& tie(std::vector<std::string> names) {
    ties_.push_back(std::move(names));
    return *this;
  }
};

} // namespace gpipe
