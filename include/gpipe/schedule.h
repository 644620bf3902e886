// Pipeline schedules as pure functions: GPipe's fill-drain clock, and the
// per-partition action lists that `step` runs (fill-drain and 1F1B).
//
// Why functions and not loops inside the pipeline: the schedule is the one
// thing every reader of a pipeline wants to check by eye, so it is kept free
// of tensors and threads and is tested against literal lists laid out like the
// schedule diagram, and every generated schedule is checked by a validator
// that prints the schedule as a grid when it finds a fault. Letters are fixed
// everywhere: m micro-batches, n partitions, i a micro-batch, j a partition,
// k a clock tick, s a lockstep step.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <ostream>
#include <sstream>
#include <string>
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

/// The order in which `step` runs forwards and backwards.
enum class Schedule {
  /// All forwards, then all backwards (GPipe): every micro-batch's
  /// activations are alive at the turn.
  FillDrain,
  /// One forward, one backward (PipeDream-Flush): partition j runs n - j - 1
  /// warm-up forwards, then alternates, then drains; at most n - j
  /// micro-batches are in flight on partition j, whatever m is. With m < n
  /// the warm-up is cut to m and it degenerates gracefully into fill-drain.
  OneFOneB,
};

inline const char* to_string(Schedule schedule) {
  switch (schedule) {
    case Schedule::FillDrain:
      return "fill_drain";
    case Schedule::OneFOneB:
      return "1f1b";
  }
  return "unknown";
}

inline std::ostream& operator<<(std::ostream& os, Schedule schedule) {
  return os << to_string(schedule);
}

/// What a partition does to a micro-batch: the two things a schedule orders
/// (forward, backward), and the two more a timeline records (a recompute
/// inside a backward, a copy between devices).
enum class Phase { Forward, Backward, Recompute, Copy };

/// The phase's name: "forward", "backward", "recompute" or "copy" (also the
/// category of a Chrome trace slice).
inline const char* to_string(Phase phase) {
  switch (phase) {
    case Phase::Forward:
      return "forward";
    case Phase::Backward:
      return "backward";
    case Phase::Recompute:
      return "recompute";
    case Phase::Copy:
      return "copy";
  }
  return "unknown";
}

/// One thing a partition does: the forward or the backward of micro-batch i.
struct Action {
  /// Phase::Forward or Phase::Backward (one name for one thing: the kind of
  /// a scheduled action is the phase a timeline records for it).
  using Kind = Phase;
  Kind kind = Kind::Forward;
  int64_t microbatch = 0;

  static Action forward(int64_t i) {
    return {Kind::Forward, i};
  }
  static Action backward(int64_t i) {
    return {Kind::Backward, i};
  }
  bool operator==(const Action& other) const {
    return kind == other.kind && microbatch == other.microbatch;
  }
  bool operator!=(const Action& other) const {
    return !(*this == other);
  }
};

/// "F3" or "B3".
inline std::string to_string(const Action& action) {
  // Appended rather than `"F" + std::to_string(i)`: GCC 12 warns falsely
  // (-Wrestrict, GCC bug 105329) on that form once inlined.
  std::string text(1, action.kind == Action::Kind::Forward ? 'F' : 'B');
  text += std::to_string(action.microbatch);
  return text;
}

inline std::ostream& operator<<(std::ostream& os, const Action& action) {
  return os << to_string(action);
}

/// actions[j] is partition j's actions in the order it runs them.
using PartitionActions = std::vector<std::vector<Action>>;

/// grid[s][j] is what partition j does at lockstep step s (nothing: idle).
using ScheduleGrid = std::vector<std::vector<std::optional<Action>>>;

/// The actions of `schedule` for m micro-batches on n partitions.
inline PartitionActions schedule_actions(
    Schedule schedule,
    int64_t m,
    int64_t n) {
  TORCH_CHECK(
      m >= 1 && n >= 1,
      "gpipe: a schedule needs at least one micro-batch and one partition (m: ",
      m,
      ", n: ",
      n,
      ")");
  PartitionActions actions(static_cast<size_t>(n));
  for (int64_t j = 0; j < n; ++j) {
    auto& mine = actions[static_cast<size_t>(j)];
    if (schedule == Schedule::FillDrain) {
      for (int64_t i = 0; i < m; ++i) {
        mine.push_back(Action::forward(i));
      }
      for (int64_t i = m - 1; i >= 0; --i) {
        mine.push_back(Action::backward(i));
      }
      continue;
    }
    const int64_t warmup = std::min(n - j - 1, m);
    int64_t next_forward = 0;
    int64_t next_backward = 0;
    for (; next_forward < warmup; ++next_forward) {
      mine.push_back(Action::forward(next_forward));
    }
    while (next_forward < m) {
      mine.push_back(Action::forward(next_forward++));
      mine.push_back(Action::backward(next_backward++));
    }
    while (next_backward < m) {
      mine.push_back(Action::backward(next_backward++));
    }
  }
  return actions;
}

/// The grid as text: one line per step, one column per partition.
inline std::string format_grid(const ScheduleGrid& grid, int64_t n) {
  std::ostringstream out;
  out << "step";
  for (int64_t j = 0; j < n; ++j) {
    out << "  p" << j << (j < 10 ? "  " : " ");
  }
  out << "\n";
  for (size_t s = 0; s < grid.size(); ++s) {
    out << (s < 10 ? "   " : s < 100 ? "  " : " ") << s;
    for (const auto& cell : grid[s]) {
      const std::string text = cell ? to_string(*cell) : ".";
      out << "  " << text
          << std::string(text.size() < 4 ? 4 - text.size() : 0, ' ');
    }
    out << "\n";
  }
  return out.str();
}

namespace detail {

[[noreturn]] inline void reject_schedule(
    const std::string& fault,
    const ScheduleGrid& grid,
    int64_t n) {
  C10_THROW_ERROR(
      Error, "gpipe: invalid schedule: " + fault + "\n" + format_grid(grid, n));
}

} // namespace detail

/// Runs `actions` in lockstep: at each step every partition does its next
/// action if what it needs was done at an earlier step (a forward needs the
/// previous partition's forward of that micro-batch; a backward needs its own
/// forward and the next partition's backward of that micro-batch). Returns
/// the grid, or throws a c10::Error naming the fault and printing the grid
/// when the actions are not a valid schedule: a partition count other than n,
/// a micro-batch out of range, an action missing or repeated, a backward
/// before its forward, or an order that can never finish (deadlock).
inline ScheduleGrid lockstep(
    const PartitionActions& actions,
    int64_t m,
    int64_t n) {
  ScheduleGrid grid;
  if (static_cast<int64_t>(actions.size()) != n) {
    detail::reject_schedule(
        "actions for " + std::to_string(actions.size()) +
            " partitions, expected " + std::to_string(n),
        grid,
        n);
  }
  for (int64_t j = 0; j < n; ++j) {
    std::vector<int> forwards(static_cast<size_t>(m), 0);
    std::vector<int> backwards(static_cast<size_t>(m), 0);
    for (const auto& action : actions[static_cast<size_t>(j)]) {
      const std::string where =
          "partition " + std::to_string(j) + ": " + to_string(action);
      if (action.microbatch < 0 || action.microbatch >= m) {
        detail::reject_schedule(
            where + " is out of range (micro-batches: " + std::to_string(m) +
                ")",
            grid,
            n);
      }
      const auto i = static_cast<size_t>(action.microbatch);
      if (action.kind == Action::Kind::Forward) {
        if (++forwards[i] > 1) {
          detail::reject_schedule(where + " appears twice", grid, n);
        }
      } else {
        if (forwards[i] == 0) {
          detail::reject_schedule(where + " comes before its forward", grid, n);
        }
        if (++backwards[i] > 1) {
          detail::reject_schedule(where + " appears twice", grid, n);
        }
      }
    }
    for (int64_t i = 0; i < m; ++i) {
      if (forwards[static_cast<size_t>(i)] == 0 ||
          backwards[static_cast<size_t>(i)] == 0) {
        detail::reject_schedule(
            "partition " + std::to_string(j) + ": " +
                to_string(
                    forwards[static_cast<size_t>(i)] == 0
                        ? Action::forward(i)
                        : Action::backward(i)) +
                " is missing",
            grid,
            n);
      }
    }
  }
  // done_at[kind][j][i]: the step at which partition j did that action.
  constexpr int64_t kNotYet = -1;
  std::vector<std::vector<int64_t>> forward_at(
      static_cast<size_t>(n),
      std::vector<int64_t>(static_cast<size_t>(m), kNotYet));
  auto backward_at = forward_at;
  std::vector<size_t> next(static_cast<size_t>(n), 0);
  size_t remaining = static_cast<size_t>(2 * m * n);
  for (int64_t s = 0; remaining > 0; ++s) {
    auto done_before = [&](const std::vector<std::vector<int64_t>>& at,
                           int64_t j,
                           int64_t i) {
      const int64_t when = at[static_cast<size_t>(j)][static_cast<size_t>(i)];
      return when != kNotYet && when < s;
    };
    std::vector<std::optional<Action>> row(static_cast<size_t>(n));
    for (int64_t j = 0; j < n; ++j) {
      const auto& mine = actions[static_cast<size_t>(j)];
      if (next[static_cast<size_t>(j)] == mine.size()) {
        continue;
      }
      const Action action = mine[next[static_cast<size_t>(j)]];
      const int64_t i = action.microbatch;
      const bool ready = action.kind == Action::Kind::Forward
          ? (j == 0 || done_before(forward_at, j - 1, i))
          : (done_before(forward_at, j, i) &&
             (j == n - 1 || done_before(backward_at, j + 1, i)));
      if (ready) {
        row[static_cast<size_t>(j)] = action;
        (action.kind == Action::Kind::Forward
             ? forward_at
             : backward_at)[static_cast<size_t>(j)][static_cast<size_t>(i)] = s;
        ++next[static_cast<size_t>(j)];
        --remaining;
      }
    }
    if (std::none_of(row.begin(), row.end(), [](const auto& cell) {
          return cell.has_value();
        })) {
      std::string waiting;
      for (int64_t j = 0; j < n; ++j) {
        if (next[static_cast<size_t>(j)] <
            actions[static_cast<size_t>(j)].size()) {
          waiting += (waiting.empty() ? "" : ", ") + std::string("p") +
              std::to_string(j) + " waits at " +
              to_string(actions[static_cast<size_t>(j)]
                               [next[static_cast<size_t>(j)]]);
        }
      }
      detail::reject_schedule(
          "deadlock at step " + std::to_string(s) + " (" + waiting + ")",
          grid,
          n);
    }
    grid.push_back(std::move(row));
  }
  return grid;
}

} // namespace gpipe
