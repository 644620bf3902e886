// The list-scheduling run behind simulate(): each lane runs its actions in
// order, an action starts when its lane is free and what it needs is done.
// It stops where it cannot go on (a deadlock, or a limit), so that a fault
// can be shown on the grid of the run up to where it happens.
#pragma once

#include <gpipe/program.h>
#include <gpipe/simulation.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace gpipe::detail {

/// A list-scheduling run that stops where it cannot go on (a deadlock, or
/// lane l reaching limit[l]), for the validator to report on.
struct Run {
  std::vector<std::vector<TimedAction>> lanes;
  std::vector<size_t> next;
  bool finished = false;
};

class Runner {
 public:
  /// implicit: neighbours on different lanes need no SEND/RECV (a compute
  /// action waits directly for the one it consumes), for laying out programs
  /// before they are lowered.
  Runner(const Program& program, const Costs& costs, bool implicit)
      : Runner(program, std::vector<Costs>{costs}, implicit) {}

  /// Stage s's actions take stage_costs[s] (one entry: every stage's).
  Runner(const Program& program, std::vector<Costs> stage_costs, bool implicit)
      : p_(program), costs_(std::move(stage_costs)), implicit_(implicit) {
    end_.assign(static_cast<size_t>(8 * p_.stages * p_.microbatches), kNotYet);
  }

  Run run(const std::vector<size_t>& limit) {
    Run run;
    const size_t lanes = p_.lanes.size();
    run.lanes.resize(lanes);
    run.next.assign(lanes, 0);
    std::vector<double> free(lanes, 0.0);
    while (true) {
      int64_t best = -1;
      double best_start = 0;
      for (size_t l = 0; l < lanes; ++l) {
        if (run.next[l] >= limit[l]) {
          continue;
        }
        const Action& a = p_.lanes[l][run.next[l]];
        double start = free[l];
        if (!in_range(a) || blocker(a, start)) {
          continue;
        }
        if (best == -1 || start < best_start) {
          best = static_cast<int64_t>(l);
          best_start = start;
        }
      }
      if (best == -1) {
        break;
      }
      const auto l = static_cast<size_t>(best);
      const Action& a = p_.lanes[l][run.next[l]];
      const double end = best_start + duration(a);
      done(a) = end;
      run.lanes[l].push_back({a, best_start, end});
      free[l] = end;
      ++run.next[l];
    }
    run.finished = true;
    for (size_t l = 0; l < lanes; ++l) {
      run.finished = run.finished && run.next[l] == p_.lanes[l].size();
    }
    return run;
  }

  /// What `a` waits for, or nothing; raises `start` to when its needs are
  /// done.
  std::optional<Action> blocker(const Action& a, double& start) const {
    const int64_t s = a.stage;
    const int64_t i = a.microbatch;
    auto need = [&](Op op, int64_t stage) -> std::optional<Action> {
      const double when = at(op, stage, i);
      if (when == kNotYet) {
        return Action{stage, op, i};
      }
      start = std::max(start, when);
      return std::nullopt;
    };
    switch (a.op) {
      case Op::F:
        if (s == 0) {
          return std::nullopt;
        }
        return implicit_ || !apart(p_, s - 1, s) ? need(Op::F, s - 1)
                                                 : need(Op::RECV_F, s);
      case Op::B:
      case Op::I: {
        if (auto missing = need(Op::F, s)) {
          return missing;
        }
        if (s == p_.stages - 1) {
          return std::nullopt;
        }
        if (!implicit_ && apart(p_, s, s + 1)) {
          return need(Op::RECV_B, s);
        }
        return at(Op::I, s + 1, i) != kNotYet ? need(Op::I, s + 1)
                                              : need(Op::B, s + 1);
      }
      case Op::W:
        return need(Op::I, s);
      case Op::SEND_F:
        return need(Op::F, s);
      case Op::RECV_F:
        return need(Op::SEND_F, s - 1);
      case Op::SEND_B:
        return at(Op::I, s, i) != kNotYet ? need(Op::I, s) : need(Op::B, s);
      case Op::RECV_B:
        return need(Op::SEND_B, s + 1);
    }
    return std::nullopt;
  }

 private:
  static constexpr double kNotYet = -1;

  bool in_range(const Action& a) const {
    return a.stage >= 0 && a.stage < p_.stages && a.microbatch >= 0 &&
        a.microbatch < p_.microbatches;
  }
  double duration(const Action& a) const {
    const Costs& costs =
        costs_[costs_.size() == 1 ? 0 : static_cast<size_t>(a.stage)];
    switch (a.op) {
      case Op::F:
        return costs.F;
      case Op::B:
        return costs.B;
      case Op::I:
        return costs.I;
      case Op::W:
        return costs.W;
      case Op::RECV_F:
      case Op::RECV_B:
        return costs.comm;
      default:
        return 0;
    }
  }
  size_t index(Op op, int64_t s, int64_t i) const {
    return static_cast<size_t>(
        (static_cast<int64_t>(op) * p_.stages + s) * p_.microbatches + i);
  }
  double at(Op op, int64_t s, int64_t i) const {
    if (s < 0 || s >= p_.stages || i < 0 || i >= p_.microbatches) {
      return kNotYet;
    }
    return end_[index(op, s, i)];
  }
  double& done(const Action& a) {
    return end_[index(a.op, a.stage, a.microbatch)];
  }

  const Program& p_;
  std::vector<Costs> costs_; // per stage, or one for all
  bool implicit_;
  std::vector<double> end_;
};

/// The compute actions of a unit-time run, by start step.
inline ScheduleGrid grid_of(const Run& run, double before) {
  ScheduleGrid grid;
  const size_t lanes = run.lanes.size();
  for (size_t l = 0; l < lanes; ++l) {
    for (const auto& timed : run.lanes[l]) {
      if (!is_compute(timed.action.op) || timed.start >= before) {
        continue;
      }
      const auto t = static_cast<size_t>(std::llround(timed.start));
      if (grid.size() <= t) {
        grid.resize(t + 1, std::vector<std::optional<Action>>(lanes));
      }
      grid[t][l] = timed.action;
    }
  }
  return grid;
}

inline const Costs& unit_costs() {
  static const Costs unit{1.0, 1.0, 1.0, 1.0, 0.0};
  return unit;
}

inline std::vector<size_t> no_limit(const Program& program) {
  std::vector<size_t> limit;
  for (const auto& lane : program.lanes) {
    limit.push_back(lane.size());
  }
  return limit;
}

/// "lane 0 waits at 0B0 for 1B0, lane 1 waits at 1F1 for 1RECV_F1".
inline std::string waits(
    const Program& program,
    const Runner& runner,
    const Run& run) {
  std::string text;
  for (size_t l = 0; l < program.lanes.size(); ++l) {
    if (run.next[l] == program.lanes[l].size()) {
      continue;
    }
    const Action& a = program.lanes[l][run.next[l]];
    double start = 0;
    const auto missing = runner.blocker(a, start);
    text += (text.empty() ? "" : ", ") + std::string("lane ") +
        std::to_string(l) + " waits at " + to_string(a);
    if (missing) {
      text += " for " + to_string(*missing);
    }
  }
  return text;
}

inline double end_of(const Run& run) {
  double end = 0;
  for (const auto& lane : run.lanes) {
    for (const auto& timed : lane) {
      end = std::max(end, timed.end);
    }
  }
  return end;
}

[[noreturn]] inline void reject_program(
    const std::string& fault,
    const ScheduleGrid& grid,
    int64_t lanes,
    const std::string& marker) {
  C10_THROW_ERROR(
      Error,
      "gpipe: invalid program: " + fault + "\n" + format_grid(grid, lanes) +
          ">>> " + marker);
}

/// Rejects `program` for a fault found at lane l's action k: prints the
/// grid of a run that stops there, up to the step lane l reaches it.
[[noreturn]] inline void reject_at(
    const Program& program,
    const std::string& fault,
    size_t l,
    size_t k) {
  Runner runner(program, unit_costs(), false);
  auto limit = no_limit(program);
  limit[l] = k;
  const Run run = runner.run(limit);
  const double reached = run.lanes[l].empty() ? 0.0 : run.lanes[l].back().end;
  const auto step = static_cast<int64_t>(std::llround(reached));
  reject_program(
      fault,
      grid_of(run, reached),
      static_cast<int64_t>(program.lanes.size()),
      "step " + std::to_string(step) + ": lane " + std::to_string(l) +
          (run.next[l] == k ? " reaches " : " never reaches ") +
          to_string(program.lanes[l][k]));
}

/// "lane 1: 1F0", where a fault is reported.
inline std::string lane_action(size_t lane, const Action& action) {
  std::string text = "lane ";
  text += std::to_string(lane);
  text += ": ";
  text += to_string(action);
  return text;
}

/// The most that `changes` (time, amount added or, negative, released) hold
/// at once, releases first on ties.
inline double peak_of(std::vector<std::pair<double, double>> changes) {
  std::sort(changes.begin(), changes.end());
  double now = 0;
  double peak = 0;
  for (const auto& change : changes) {
    now += change.second;
    peak = std::max(peak, now);
  }
  return peak;
}

/// Per stage: the most micro-batches whose F has started and whose memory
/// is not yet released (at the end of B, or of W for a split backward).
inline std::vector<int64_t> peak_in_flight(
    const Program& program,
    const std::vector<std::vector<TimedAction>>& lanes) {
  // (time, +1 at an F's start or -1 at a release).
  std::vector<std::vector<std::pair<double, double>>> changes(
      static_cast<size_t>(program.stages));
  for (const auto& lane : lanes) {
    for (const auto& timed : lane) {
      auto& mine = changes[static_cast<size_t>(timed.action.stage)];
      if (timed.action.op == Op::F) {
        mine.emplace_back(timed.start, 1.0);
      } else if (timed.action.op == Op::B || timed.action.op == Op::W) {
        mine.emplace_back(timed.end, -1.0);
      }
    }
  }
  std::vector<int64_t> peaks;
  for (auto& mine : changes) {
    peaks.push_back(std::llround(peak_of(std::move(mine))));
  }
  return peaks;
}

} // namespace gpipe::detail
