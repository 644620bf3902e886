// The validator of programs: runs a program in simulated time and says how
// long it takes, how many micro-batches each stage holds at once, and, where
// the program is wrong, what is wrong and where.
//
// Why simulate rather than check rules one by one: a program is right when it
// can run to the end, and "can run" is exactly what a list-scheduling run
// answers (each lane runs its actions in order; an action starts when its
// lane is free and what it needs is done). The same run, with every compute
// action one unit long, lays the program out as the grid a reader compares
// with a paper's figure, and a fault is printed on that grid at the step
// where it happens. Letters: m micro-batches, s a stage, i a micro-batch, l a
// lane, t a step.
#pragma once

#include <gpipe/program.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace gpipe {

/// How long each action takes, in any unit. comm is the time of a receive
/// once its send is done (a send takes no time).
struct Costs {
  double F = 1.0;
  double B = 2.0;
  double I = 1.0;
  double W = 1.0;
  double comm = 0.0;
};

struct TimedAction {
  Action action;
  double start = 0;
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

namespace detail {

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
      : p_(program), costs_(costs), implicit_(implicit) {
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
      const double end = best_start + duration(a.op);
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
  double duration(Op op) const {
    switch (op) {
      case Op::F:
        return costs_.F;
      case Op::B:
        return costs_.B;
      case Op::I:
        return costs_.I;
      case Op::W:
        return costs_.W;
      case Op::RECV_F:
      case Op::RECV_B:
        return costs_.comm;
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
  Costs costs_;
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

/// Checks what can be checked without running: shape, ranges, each action
/// once, each lane's order (a consumer after its producer and its receive),
/// every send matched by a receive; then what is missing.
inline void check_program(const Program& p) {
  const auto lanes = static_cast<int64_t>(p.lanes.size());
  const int64_t stages = p.stages;
  const int64_t m = p.microbatches;
  auto reject = [&](const std::string& fault) {
    reject_program(fault, {}, lanes, "before step 0");
  };
  if (stages < 1 || m < 1 || lanes < 1) {
    reject(
        "needs at least one stage, micro-batch and lane (stages: " +
        std::to_string(stages) + ", micro-batches: " + std::to_string(m) +
        ", lanes: " + std::to_string(lanes) + ")");
  }
  if (static_cast<int64_t>(p.lane_of_stage.size()) != stages) {
    reject(
        "lane_of_stage has " + std::to_string(p.lane_of_stage.size()) +
        " entries for " + std::to_string(stages) + " stages");
  }
  for (int64_t s = 0; s < stages; ++s) {
    const int64_t l = p.lane_of_stage[static_cast<size_t>(s)];
    if (l < 0 || l >= lanes) {
      reject(
          "stage " + std::to_string(s) + " is on lane " + std::to_string(l) +
          ", out of range (lanes: " + std::to_string(lanes) + ")");
    }
  }
  // count[op][s][i] over the whole program, and seen[...] up to the action
  // being checked (the same lane holds every action of a stage).
  auto index = [&](Op op, int64_t s, int64_t i) {
    return static_cast<size_t>((static_cast<int64_t>(op) * stages + s) * m + i);
  };
  std::vector<int> count(static_cast<size_t>(8 * stages * m), 0);
  bool backward = false;
  for (size_t l = 0; l < p.lanes.size(); ++l) {
    for (size_t k = 0; k < p.lanes[l].size(); ++k) {
      const Action& a = p.lanes[l][k];
      auto where = [&]() { return lane_action(l, a); };
      if (a.stage < 0 || a.stage >= stages || a.microbatch < 0 ||
          a.microbatch >= m) {
        reject_at(
            p,
            where() + " is out of range (stages: " + std::to_string(stages) +
                ", micro-batches: " + std::to_string(m) + ")",
            l,
            k);
      }
      const int64_t home = p.lane_of_stage[static_cast<size_t>(a.stage)];
      if (home != static_cast<int64_t>(l)) {
        reject_at(
            p,
            where() + " is on lane " + std::to_string(l) + ", but stage " +
                std::to_string(a.stage) + " runs on lane " +
                std::to_string(home),
            l,
            k);
      }
      ++count[index(a.op, a.stage, a.microbatch)];
      backward = backward || a.op == Op::B || a.op == Op::I || a.op == Op::W;
    }
  }
  std::vector<int> seen(count.size(), 0);
  // A send or receive without its match is reported after what is missing:
  // a missing B leaves its stage's gradient unsent, and the B is the fault.
  std::string unmatched;
  size_t unmatched_lane = 0;
  size_t unmatched_at = 0;
  for (size_t l = 0; l < p.lanes.size(); ++l) {
    for (size_t k = 0; k < p.lanes[l].size(); ++k) {
      const Action& a = p.lanes[l][k];
      const int64_t s = a.stage;
      const int64_t i = a.microbatch;
      auto where = [&]() { return lane_action(l, a); };
      auto fail = [&](const std::string& why) {
        reject_at(p, where() + " " + why, l, k);
      };
      auto unmatch = [&](const std::string& why) {
        if (unmatched.empty()) {
          unmatched = where() + " " + why;
          unmatched_lane = l;
          unmatched_at = k;
        }
      };
      auto was_seen = [&](Op op, int64_t stage) {
        return seen[index(op, stage, i)] > 0;
      };
      auto counted = [&](Op op, int64_t stage) {
        return stage >= 0 && stage < stages && count[index(op, stage, i)] > 0;
      };
      auto text = [&](Op op, int64_t stage) {
        return to_string(Action{stage, op, i});
      };
      auto lane_text = [&](int64_t stage) {
        return std::to_string(p.lane_of_stage[static_cast<size_t>(stage)]);
      };
      if (seen[index(a.op, s, i)]++ > 0) {
        fail("appears twice");
      }
      // A neighbour to talk to: it exists and is on another lane.
      auto check_peer = [&](int64_t peer) {
        if (peer < 0 || peer >= stages) {
          fail(
              "talks to stage " + std::to_string(peer) +
              ", which does not exist (stages: " + std::to_string(stages) +
              ")");
        }
        if (!apart(p, s, peer)) {
          fail(
              "talks between stages " + std::to_string(std::min(s, peer)) +
              " and " + std::to_string(std::max(s, peer)) +
              ", which share lane " + lane_text(s) +
              " (communication is only between neighbours on different lanes)");
        }
      };
      switch (a.op) {
        case Op::F:
          if (s > 0 && apart(p, s - 1, s) && !was_seen(Op::RECV_F, s)) {
            fail(
                "comes before its receive " + text(Op::RECV_F, s) + " (stage " +
                std::to_string(s - 1) + " runs on lane " + lane_text(s - 1) +
                ")");
          }
          break;
        case Op::B:
        case Op::I:
        case Op::W:
          if (a.op == Op::B && (counted(Op::I, s) || counted(Op::W, s))) {
            fail(
                "and " + text(counted(Op::I, s) ? Op::I : Op::W, s) +
                " both appear: a backward is either B, or I and W");
          }
          if (a.op != Op::B && counted(Op::B, s)) {
            fail(
                "and " + text(Op::B, s) +
                " both appear: a backward is either B, or I and W");
          }
          if (a.op == Op::W) {
            if (!was_seen(Op::I, s)) {
              fail("comes before its input gradient " + text(Op::I, s));
            }
            break;
          }
          if (!was_seen(Op::F, s)) {
            fail("comes before its forward " + text(Op::F, s));
          }
          if (s + 1 < stages && apart(p, s, s + 1) &&
              !was_seen(Op::RECV_B, s)) {
            fail(
                "comes before its receive " + text(Op::RECV_B, s) + " (stage " +
                std::to_string(s + 1) + " runs on lane " + lane_text(s + 1) +
                ")");
          }
          break;
        case Op::SEND_F:
          check_peer(s + 1);
          if (!was_seen(Op::F, s)) {
            fail("comes before " + text(Op::F, s) + ", which it sends");
          }
          if (!counted(Op::RECV_F, s + 1)) {
            unmatch("has no matching receive " + text(Op::RECV_F, s + 1));
          }
          break;
        case Op::RECV_F:
          check_peer(s - 1);
          if (!counted(Op::SEND_F, s - 1)) {
            unmatch("has no matching send " + text(Op::SEND_F, s - 1));
          }
          break;
        case Op::SEND_B:
          check_peer(s - 1);
          if (!was_seen(Op::B, s) && !was_seen(Op::I, s)) {
            fail(
                "comes before " + text(Op::B, s) + " or " + text(Op::I, s) +
                ", which it sends");
          }
          if (!counted(Op::RECV_B, s - 1)) {
            unmatch("has no matching receive " + text(Op::RECV_B, s - 1));
          }
          break;
        case Op::RECV_B:
          check_peer(s + 1);
          if (!counted(Op::SEND_B, s + 1)) {
            unmatch("has no matching send " + text(Op::SEND_B, s + 1));
          }
          break;
      }
    }
  }
  // What is missing: shown on the grid of the whole run.
  std::string missing;
  for (int64_t s = 0; s < stages && missing.empty(); ++s) {
    for (int64_t i = 0; i < m && missing.empty(); ++i) {
      auto has = [&](Op op) { return count[index(op, s, i)] > 0; };
      auto text = [&](Op op) { return to_string(Action{s, op, i}); };
      if (!has(Op::F)) {
        missing = text(Op::F) + " is missing";
      } else if (backward && !has(Op::B) && !has(Op::I)) {
        missing = text(Op::B) + " is missing (or " + text(Op::I) + " and " +
            text(Op::W) + ")";
      } else if (has(Op::I) && !has(Op::W)) {
        missing = text(Op::W) + " is missing";
      }
    }
  }
  if (!missing.empty()) {
    Runner runner(p, unit_costs(), false);
    const Run run = runner.run(no_limit(p));
    const double end = end_of(run);
    reject_program(
        missing,
        grid_of(run, end),
        lanes,
        "step " + std::to_string(std::llround(end)) + ": " +
            (run.finished ? std::string("every lane is done")
                          : waits(p, runner, run)));
  }
  if (!unmatched.empty()) {
    reject_at(p, unmatched, unmatched_lane, unmatched_at);
  }
}

inline std::vector<int64_t> peak_in_flight(
    const Program& program,
    const std::vector<std::vector<TimedAction>>& lanes) {
  // (time, +1 at an F's start or -1 at a release), releases first on ties.
  std::vector<std::vector<std::pair<double, int>>> events(
      static_cast<size_t>(program.stages));
  for (const auto& lane : lanes) {
    for (const auto& timed : lane) {
      auto& mine = events[static_cast<size_t>(timed.action.stage)];
      if (timed.action.op == Op::F) {
        mine.emplace_back(timed.start, 1);
      } else if (timed.action.op == Op::B || timed.action.op == Op::W) {
        mine.emplace_back(timed.end, -1);
      }
    }
  }
  std::vector<int64_t> peaks;
  for (auto& mine : events) {
    std::sort(mine.begin(), mine.end());
    int64_t now = 0;
    int64_t peak = 0;
    for (const auto& event : mine) {
      now += event.second;
      peak = std::max(peak, now);
    }
    peaks.push_back(peak);
  }
  return peaks;
}

} // namespace detail

/// Runs `program` with `costs` and returns its run; throws a c10::Error
/// "gpipe: invalid program: <fault>" followed by the grid so far and a last
/// line ">>> step t: ..." saying where it stopped, when the program is not
/// valid: lane_of_stage of the wrong size or out of range, an action on
/// another lane than its stage's, a stage or micro-batch out of range, an F,
/// B, I or W missing or repeated, B together with I and W, a backward before
/// its forward or a W before its I, a consumer before its receive, a send or
/// receive without its match or between stages that share a lane or are no
/// neighbours, or an order that can never finish (deadlock).
///
/// A program without any communication action is lowered first (`lower`),
/// so `lanes` then lists the SEND and RECV actions the pipe would run.
///
/// A program is forward-only (no B, I or W) or does every (stage,
/// micro-batch)'s backward once, as B or as I then W. Communication:
/// SEND_F(s, i) sends stage s's output to stage s + 1, which takes it with
/// RECV_F(s + 1, i) before its F; SEND_B(s, i) sends the gradient of stage
/// s's input to stage s - 1, which takes it with RECV_B(s - 1, i) before its
/// B or I. A receive ends `comm` after both its lane is free and its send is
/// done.
inline Simulation simulate(const Program& given, const Costs& costs = {}) {
  TORCH_CHECK(
      costs.F >= 0 && costs.B >= 0 && costs.I >= 0 && costs.W >= 0 &&
          costs.comm >= 0,
      "gpipe: simulate needs costs of zero or more (F: ",
      costs.F,
      ", B: ",
      costs.B,
      ", I: ",
      costs.I,
      ", W: ",
      costs.W,
      ", comm: ",
      costs.comm,
      ")");
  // A program without communication gets it here, as the pipe would run it.
  const Program program = lower(given);
  detail::check_program(program);
  const auto lanes = static_cast<int64_t>(program.lanes.size());
  const auto limit = detail::no_limit(program);
  detail::Runner unit(program, detail::unit_costs(), false);
  const detail::Run layout = unit.run(limit);
  if (!layout.finished) {
    const std::string waits = detail::waits(program, unit, layout);
    const double end = detail::end_of(layout);
    detail::reject_program(
        "deadlock (" + waits + ")",
        detail::grid_of(layout, end),
        lanes,
        "step " + std::to_string(std::llround(end)) + ": " + waits);
  }
  detail::Runner timed(program, costs, false);
  detail::Run run = timed.run(limit);
  Simulation simulation;
  simulation.makespan = detail::end_of(run);
  simulation.peak_in_flight = detail::peak_in_flight(program, run.lanes);
  simulation.lanes = std::move(run.lanes);
  simulation.grid = detail::grid_of(layout, detail::end_of(layout));
  return simulation;
}

} // namespace gpipe
