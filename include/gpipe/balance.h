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
//
// A model whose layers pass several tensors or skips is balanced the same
// way, on a sample spelled as the pipe's input: `balance_by_time(seq,
// {hidden, mask, ids}, 4)`.
//
// The pieces, one concept each: balance/profile.h measures layers (running
// each as a partition would, balance/layer_run.h, and leaving the model as
// it was, balance/model_state.h); balance/memory_model.h predicts what a
// partition keeps; balance/split.h finds the exact split; balance/report.h
// prints one. This header puts them together.
#pragma once

#include <gpipe/balance/memory_model.h>
#include <gpipe/balance/profile.h>
#include <gpipe/balance/report.h>
#include <gpipe/balance/split.h>
#include <gpipe/options.h>

#include <c10/util/Exception.h>
#include <torch/nn/modules/container/sequential.h>

#include <cstdint>
#include <vector>

namespace gpipe {

/// The contiguous split of layers with costs `costs` into `partitions`
/// non-empty partitions that minimizes the largest partition sum, exactly;
/// ties go to the most even split, then the lexicographically smallest
/// balance (Note [The exact split]).
inline std::vector<int64_t> balance_cost(
    const std::vector<double>& costs,
    int64_t partitions) {
  detail::check_partitions(static_cast<int64_t>(costs.size()), partitions);
  detail::check_costs(costs);
  return *detail::solve_additive_split(
      costs, partitions, [](int64_t, int64_t, int64_t) { return true; });
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
  auto split = detail::solve_additive_split(
      costs, partitions, [&model](int64_t j, int64_t b, int64_t e) {
        return model.fits(j, b, e);
      });
  if (!split) {
    model.reject_budget();
  }
  return *split;
}

/// The balance whose slowest partition is fastest: `profile_times` then
/// `balance_cost`. `sample` is one micro-batch on the Sequential's device,
/// a tensor or a list of tensors as the pipe's input.
inline std::vector<int64_t> balance_by_time(
    const torch::nn::Sequential& seq,
    const Sample& sample,
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
    const Sample& sample,
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
  return model.split([&model](int64_t j, int64_t b, int64_t e) {
    return model.partition_bytes(j, b, e);
  });
}

} // namespace gpipe
