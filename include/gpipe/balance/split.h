// The exact contiguous split: layers in order into partitions, minimizing
// the costliest partition.
//
// Why apart from profiling: the split knows nothing of modules or devices,
// only a cost and a feasibility per run of layers, so balancing by time, by
// memory, under a budget or by costs the user measured elsewhere all share
// this one solver, and its tests compare it against brute force without
// running a model.
#pragma once

#include <gpipe/detail/partition.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <optional>
#include <vector>

namespace gpipe::detail {

inline void check_partitions(int64_t layers, int64_t partitions) {
  check_partition_count(layers, partitions, "balance");
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

/// What partition j costs holding layers [b, e), and whether it may.
using SplitCost = std::function<double(int64_t, int64_t, int64_t)>;
using SplitFits = std::function<bool(int64_t, int64_t, int64_t)>;

/// table[j][b] for partitions j..K-1 holding layers b..L-1: the least
/// `value(j, b, e)` over the ends e of partition j that leave every later
/// partition a layer; filled from the last partition back.
template <typename Value>
void fill_split_table(
    size_t K,
    size_t L,
    std::vector<std::vector<double>>& table,
    const Value& value) {
  for (size_t j = K; j-- > 0;) {
    for (size_t b = j; b + (K - j) <= L; ++b) {
      double lowest = std::numeric_limits<double>::infinity();
      for (size_t e = b + 1; e + (K - j - 1) <= L; ++e) {
        lowest = std::min(lowest, value(j, b, e));
      }
      table[j][b] = lowest;
    }
  }
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
    const SplitCost& cost,
    const SplitFits& fits) {
  check_partitions(layers, partitions);
  constexpr double kNone = std::numeric_limits<double>::infinity();
  const auto L = static_cast<size_t>(layers);
  const auto K = static_cast<size_t>(partitions);
  using Table = std::vector<std::vector<double>>;
  const auto at = [](size_t j, size_t b, size_t e) {
    return std::array<int64_t, 3>{
        static_cast<int64_t>(j),
        static_cast<int64_t>(b),
        static_cast<int64_t>(e)};
  };
  // Partition j may hold [b, e) when the later ones can hold [e, L) in
  // `table` and [b, e) fits.
  const auto open = [&](const Table& table, size_t j, size_t b, size_t e) {
    const auto run = at(j, b, e);
    return table[j + 1][e] != kNone && fits(run[0], run[1], run[2]);
  };
  const auto cost_of = [&](size_t j, size_t b, size_t e) {
    const auto run = at(j, b, e);
    return cost(run[0], run[1], run[2]);
  };
  Table best(K + 1, std::vector<double>(L + 1, kNone));
  best[K][L] = -kNone;
  fill_split_table(K, L, best, [&](size_t j, size_t b, size_t e) {
    return open(best, j, b, e) ? std::max(cost_of(j, b, e), best[j + 1][e])
                               : kNone;
  });
  if (best[0][0] == kNone) {
    return std::nullopt;
  }
  // Among the splits within the bottleneck, the least sum of squares.
  const double bound = best[0][0];
  Table spread(K + 1, std::vector<double>(L + 1, kNone));
  spread[K][L] = 0;
  const auto squares = [&](size_t j, size_t b, size_t e) {
    if (!open(spread, j, b, e)) {
      return kNone;
    }
    const double own = cost_of(j, b, e);
    return own <= bound ? own * own + spread[j + 1][e] : kNone;
  };
  fill_split_table(K, L, spread, squares);
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

/// The split of additive `costs` (the sum over a partition's layers) among
/// those that `fits` allows.
inline std::optional<std::vector<int64_t>> solve_additive_split(
    const std::vector<double>& costs,
    int64_t partitions,
    const SplitFits& fits) {
  const auto sums = prefix_sums(costs);
  return solve_split(
      static_cast<int64_t>(costs.size()),
      partitions,
      [&sums](int64_t, int64_t b, int64_t e) {
        return sums[static_cast<size_t>(e)] - sums[static_cast<size_t>(b)];
      },
      fits);
}

} // namespace gpipe::detail
