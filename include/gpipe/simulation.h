// What a simulated run of a program is (simulate.h computes it): the costs
// it assumes, each action's start and end, the peak number of micro-batches
// each stage holds, and the schedule as a grid a reader compares with a
// paper's figure.
#pragma once

#include <gpipe/program.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace gpipe {

/// How long each action takes, in any unit. comm is the time of a receive
/// once its send is done (a send takes no time).
struct Costs {
  /// A forward.
  double F = 1.0;
  /// A whole backward.
  double B = 2.0;
  /// The input-gradient half of a backward.
  double I = 1.0;
  /// The weight-gradient half of a backward.
  double W = 1.0;
  /// A message, from its send to its receive.
  double comm = 0.0;
};

/// One action of a simulated run, with when it starts and ends.
struct TimedAction {
  /// The action.
  Action action;
  /// When it starts.
  double start = 0;
  /// When it ends.
  double end = 0;
};

/// grid[t][l] is the compute action lane l starts at step t (nothing: idle).
using ScheduleGrid = std::vector<std::vector<std::optional<Action>>>;

/// A program's run.
struct Simulation {
  /// When the last action ends.
  double makespan = 0;
  /// lanes[l]: lane l's actions, communication included, in program order.
  std::vector<std::vector<TimedAction>> lanes;
  /// Per stage: the most micro-batches whose F has started and whose memory
  /// is not yet released (at the end of B, or of W for a split backward).
  std::vector<int64_t> peak_in_flight;
  /// The run with every compute action one step long and communication free:
  /// one column per lane, compute actions only.
  ScheduleGrid grid;
};

/// The grid as text: one line per step, one column per lane ("L0", "L1").
inline std::string format_grid(const ScheduleGrid& grid, int64_t n) {
  size_t width = 4;
  for (const auto& row : grid) {
    for (const auto& cell : row) {
      if (cell) {
        width = std::max(width, to_string(*cell).size());
      }
    }
  }
  auto padded = [&](const std::string& text) {
    return "  " + text +
        std::string(text.size() < width ? width - text.size() : 0, ' ');
  };
  std::string out = "step";
  for (int64_t l = 0; l < n; ++l) {
    out += padded("L" + std::to_string(l));
  }
  out += "\n";
  for (size_t t = 0; t < grid.size(); ++t) {
    const std::string step = std::to_string(t);
    out += std::string(step.size() < 4 ? 4 - step.size() : 0, ' ') + step;
    for (const auto& cell : grid[t]) {
      out += padded(cell ? to_string(*cell) : ".");
    }
    out += "\n";
  }
  return out;
}

} // namespace gpipe
