// The fill-drain schedule of GPipe as a pure function.
//
// Why a function and not a loop inside the pipeline: the schedule is the one
// thing every reader of a pipeline wants to check by eye, so it is kept free
// of tensors and threads and is tested against literal lists laid out like the
// schedule diagram. Letters are fixed everywhere: m micro-batches, n
// partitions, i a micro-batch, j a partition, k a clock tick.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace gpipe {

/// One clock tick: the (micro-batch i, partition j) cells that run at once.
using ClockTick = std::vector<std::pair<int64_t, int64_t>>;

/// The fill-drain schedule: m + n - 1 ticks; tick k holds every (i, j) with
/// i + j == k, ordered by partition. Backward runs the same ticks in reverse.
///
///   m=3, n=3:  k=0: (0,0)
///              k=1: (1,0) (0,1)
///              k=2: (2,0) (1,1) (0,2)
///              k=3:       (2,1) (1,2)
///              k=4:             (2,2)
inline std::vector<ClockTick> clock_cycles(int64_t m, int64_t n) {
  TORCH_CHECK(
      m >= 1 && n >= 1,
      "gpipe: clock_cycles needs at least one micro-batch and one partition (m: ",
      m,
      ", n: ",
      n,
      ")");
  std::vector<ClockTick> ticks;
  ticks.reserve(static_cast<size_t>(m + n - 1));
  for (int64_t k = 0; k < m + n - 1; ++k) {
    ClockTick tick;
    for (int64_t j = std::max<int64_t>(1 + k - m, 0); j < std::min(1 + k, n);
         ++j) {
      tick.emplace_back(k - j, j);
    }
    ticks.push_back(std::move(tick));
  }
  return ticks;
}

} // namespace gpipe
