// A schedule searched for the model at hand: from measured per-stage costs
// (F, I, W, the messages between them) and a limit on the activations each
// lane may hold, the program with the shortest simulated makespan that
// search_schedule finds.
//
// Why search: every fixed schedule is a recipe for stages of equal cost.
// When a stage is slower, or a lane may hold more micro-batches than 1F1B
// keeps, a program built for the measured costs does better (Qi et al.
// 2023, section 3). The search is the paper's heuristic (greedy.h) under
// several policies, every fixed schedule that fits the placement, and a
// local search from the best of them: adjacent compute actions of a lane
// swapped while the makespan improves and the memory fits. Of equal
// makespans it keeps the one that holds the least, then the first tried
// (fixed schedules before the heuristic). It is not an exact search;
// `lower_bound` (the busiest lane's own work) says how far from optimal a
// result can be at most.
#pragma once

#include <gpipe/detail/program/greedy.h>
#include <gpipe/ordered_messages.h>
#include <gpipe/program.h>
#include <gpipe/schedule.h>
#include <gpipe/schedules.h>
#include <gpipe/simulate.h>

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>
#include <torch/arg.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace gpipe {

/// What search_schedule may use, and how hard it looks.
struct SearchOptions {
  /// Per lane, the most activation memory it may hold at once, in the units
  /// of `activation`; empty: no limit.
  TORCH_ARG(std::vector<double>, memory_limit) = {};
  /// Per stage, the activation memory one micro-batch holds from the start
  /// of its F to the end of its backward (B, or W); empty: 1 for every
  /// stage, so that limits count micro-batches.
  TORCH_ARG(std::vector<double>, activation) = {};
  /// Passes of the local search over every lane (0: none).
  TORCH_ARG(int64_t, local_search_passes) = 8;
};

/// What search_schedule found.
struct SearchedSchedule {
  /// The program, lowered; it passes simulate and the check for messages
  /// matched by order.
  Program program;
  /// Its simulated makespan with the given costs.
  double makespan = 0;
  /// No program is shorter: the busiest lane's own work (m (F + I + W)
  /// over its stages, and its receives) after the first micro-batch can
  /// reach it (detail::lower_bound).
  double lower_bound = 0;
  /// Per lane, the most activation memory it holds at once.
  std::vector<double> peak_memory;
  /// Where it came from: "greedy (I first, fill 0.5)", "fixed schedule
  /// zero_bubble_v", each followed by " + N local moves" where the local
  /// search improved it.
  std::string found_by;
};

namespace detail {

/// Per lane, the most activation memory held at once in `run` (an F adds
/// its stage's from its start, a B or W releases it at its end).
inline std::vector<double> peak_memory(
    const Simulation& run,
    const std::vector<double>& activation) {
  std::vector<double> peaks;
  for (const auto& lane : run.lanes) {
    std::vector<std::pair<double, double>> changes;
    for (const auto& timed : lane) {
      const double a = activation[static_cast<size_t>(timed.action.stage)];
      if (timed.action.op == Op::F) {
        changes.emplace_back(timed.start, a);
      } else if (timed.action.op == Op::B || timed.action.op == Op::W) {
        changes.emplace_back(timed.end, -a);
      }
    }
    peaks.push_back(peak_of(std::move(changes)));
  }
  return peaks;
}

/// No program is shorter: per lane, when the first micro-batch can reach
/// it (the forwards and receives before its first stage), then its own
/// work (m (F + I + W) and a receive per message into its stages, as
/// simulate runs receives on the receiving lane); the busiest lane's.
inline double lower_bound(
    const std::vector<Costs>& costs,
    const std::vector<int64_t>& lane_of_stage,
    int64_t lanes,
    int64_t m) {
  const auto stages = static_cast<int64_t>(costs.size());
  auto lane = [&](int64_t s) { return lane_of_stage[static_cast<size_t>(s)]; };
  auto receive = [&](int64_t from, int64_t s) {
    return from < 0 || from >= stages || lane(from) == lane(s)
        ? 0.0
        : costs[static_cast<size_t>(s)].comm;
  };
  const double kNone = std::numeric_limits<double>::infinity();
  std::vector<double> head(static_cast<size_t>(lanes), kNone);
  std::vector<double> work(static_cast<size_t>(lanes), 0.0);
  double reach = 0; // when micro-batch 0 can start on stage s
  for (int64_t s = 0; s < stages; ++s) {
    const Costs& c = costs[static_cast<size_t>(s)];
    const auto l = static_cast<size_t>(lane(s));
    head[l] = std::min(head[l], reach);
    work[l] += static_cast<double>(m) *
        (c.F + c.I + c.W + receive(s - 1, s) + receive(s + 1, s));
    reach += receive(s - 1, s) + c.F;
  }
  double bound = 0;
  for (size_t l = 0; l < work.size(); ++l) {
    bound = std::max(bound, head[l] + work[l]);
  }
  return bound;
}

/// A candidate's simulated makespan and memory, when it is valid, fits
/// and its messages can go by order.
struct Scored {
  Program program; // compute only
  double makespan = std::numeric_limits<double>::infinity();
  std::vector<double> peak;
};

inline std::optional<Scored> score(
    Program program,
    const std::vector<Costs>& costs,
    const std::vector<double>& activation,
    const std::vector<double>& memory) {
  try {
    const Simulation run = simulate(program, costs);
    auto peak = peak_memory(run, activation);
    for (size_t l = 0; l < peak.size(); ++l) {
      if (peak[l] > memory[l] + 1e-9) {
        return std::nullopt;
      }
    }
    check_ordered_messages(lower_for_ordered_messages(lower(program)));
    return Scored{std::move(program), run.makespan, std::move(peak)};
  } catch (const c10::Error&) {
    return std::nullopt;
  }
}

/// The largest of `values` (0 for none).
inline double most(const std::vector<double>& values) {
  return values.empty() ? 0.0 : *std::max_element(values.begin(), values.end());
}

/// The program's compute actions only (what lower() started from).
inline Program compute_only(const Program& program) {
  Program mine = program;
  for (auto& lane : mine.lanes) {
    lane.erase(
        std::remove_if(
            lane.begin(),
            lane.end(),
            [](const Action& a) { return !is_compute(a.op); }),
        lane.end());
  }
  return mine;
}

/// Hill climbing: swaps adjacent compute actions of a lane while the
/// makespan drops and the memory fits; returns the moves made.
inline int64_t improve_locally(
    Scored& best,
    const std::vector<Costs>& costs,
    const std::vector<double>& activation,
    const std::vector<double>& memory,
    int64_t passes) {
  int64_t moves = 0;
  for (int64_t pass = 0; pass < passes; ++pass) {
    bool improved = false;
    for (size_t l = 0; l < best.program.lanes.size(); ++l) {
      for (size_t k = 0; k + 1 < best.program.lanes[l].size(); ++k) {
        const Action& a = best.program.lanes[l][k];
        const Action& b = best.program.lanes[l][k + 1];
        if (a.stage == b.stage && a.microbatch == b.microbatch) {
          continue; // one needs the other
        }
        Program tried = best.program;
        std::swap(tried.lanes[l][k], tried.lanes[l][k + 1]);
        auto scored = score(std::move(tried), costs, activation, memory);
        if (scored && scored->makespan < best.makespan - 1e-9) {
          best = std::move(*scored);
          improved = true;
          ++moves;
        }
      }
    }
    if (!improved) {
      break;
    }
  }
  return moves;
}

} // namespace detail

/// The program with the shortest simulated makespan that the search finds
/// for `microbatches` micro-batches through stages whose actions take
/// stage_costs[s] (F, I, W and comm, the time of a message into the stage;
/// B is used by the fixed schedules that do not split it), stage s on lane
/// lane_of_stage[s], within `options.memory_limit()` per lane. Throws a
/// `gpipe:` error naming the values when the sizes disagree or a limit is
/// below one micro-batch through the lane's stages.
inline SearchedSchedule search_schedule(
    const std::vector<Costs>& stage_costs,
    const std::vector<int64_t>& lane_of_stage,
    int64_t microbatches,
    const SearchOptions& options = {}) {
  const auto stages = static_cast<int64_t>(lane_of_stage.size());
  const int64_t lanes = detail::count_lanes(
      "search_schedule", stages, microbatches, lane_of_stage);
  TORCH_CHECK(
      static_cast<int64_t>(stage_costs.size()) == stages,
      "gpipe: search_schedule needs the costs of every stage (stages: ",
      stages,
      ", costs: ",
      stage_costs.size(),
      ")");
  std::vector<double> activation = options.activation();
  if (activation.empty()) {
    activation.assign(static_cast<size_t>(stages), 1.0);
  }
  TORCH_CHECK(
      static_cast<int64_t>(activation.size()) == stages,
      "gpipe: search_schedule needs one activation size per stage (stages: ",
      stages,
      ", activation sizes: ",
      activation.size(),
      ")");
  std::vector<double> memory = options.memory_limit();
  if (memory.empty()) {
    memory.assign(
        static_cast<size_t>(lanes), std::numeric_limits<double>::infinity());
  }
  TORCH_CHECK(
      static_cast<int64_t>(memory.size()) == lanes,
      "gpipe: search_schedule needs one memory limit per lane (lanes: ",
      lanes,
      ", limits: ",
      memory.size(),
      ")");
  std::vector<double> one_microbatch(static_cast<size_t>(lanes), 0.0);
  for (int64_t s = 0; s < stages; ++s) {
    one_microbatch[static_cast<size_t>(
        lane_of_stage[static_cast<size_t>(s)])] +=
        activation[static_cast<size_t>(s)];
  }
  for (int64_t l = 0; l < lanes; ++l) {
    const auto k = static_cast<size_t>(l);
    TORCH_CHECK(
        memory[k] + 1e-9 >= one_microbatch[k],
        "gpipe: search_schedule: lane ",
        l,
        " may hold ",
        memory[k],
        ", less than one micro-batch through its stages (",
        one_microbatch[k],
        "); a limit of ",
        one_microbatch[k],
        " or more fits");
  }
  std::optional<detail::Scored> best;
  std::string found_by;
  // The shortest; of equal makespans, the one that holds the least, then
  // the first tried (the fixed schedules are tried first).
  auto consider = [&](Program program, const std::string& origin) {
    auto scored = detail::score(
        detail::compute_only(program), stage_costs, activation, memory);
    if (!scored) {
      return;
    }
    const bool better = !best || scored->makespan < best->makespan - 1e-9 ||
        (scored->makespan < best->makespan + 1e-9 &&
         detail::most(scored->peak) < detail::most(best->peak) - 1e-9);
    if (better) {
      best = std::move(scored);
      found_by = origin;
    }
  };
  for (const Schedule schedule : kEverySchedule) {
    try {
      consider(
          build_program(schedule, stages, microbatches, lane_of_stage),
          std::string("fixed schedule ") + to_string(schedule));
    } catch (const c10::Error&) {
      // a schedule that cannot run on this placement
    }
  }
  const detail::GreedyProblem problem{
      stage_costs, lane_of_stage, lanes, microbatches, activation, memory};
  for (const bool input_first : {true, false}) {
    for (const double fill : {0.0, 0.5, 1.0, 2.0}) {
      if (auto program =
              detail::GreedyRun(problem, {input_first, fill}).run()) {
        consider(
            std::move(*program),
            std::string("greedy (") + (input_first ? "I" : "F") +
                " first, fill " + std::to_string(fill).substr(0, 3) + ")");
      }
    }
  }
  TORCH_CHECK(
      best,
      "gpipe: search_schedule found no program within the memory limits [",
      c10::Join(", ", memory),
      "] for ",
      microbatches,
      " micro-batches; raise the limits");
  const int64_t moves = detail::improve_locally(
      *best, stage_costs, activation, memory, options.local_search_passes());
  if (moves > 0) {
    found_by += " + " + std::to_string(moves) + " local moves";
  }
  SearchedSchedule result;
  result.program = lower(best->program);
  result.makespan = best->makespan;
  result.lower_bound =
      detail::lower_bound(stage_costs, lane_of_stage, lanes, microbatches);
  result.peak_memory = best->peak;
  result.found_by = found_by;
  return result;
}

} // namespace gpipe
