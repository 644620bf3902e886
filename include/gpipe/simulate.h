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

#include <gpipe/detail/program/checks.h>
#include <gpipe/detail/program/runner.h>
#include <gpipe/program.h>
#include <gpipe/simulation.h>

#include <c10/util/Exception.h>

#include <string>
#include <utility>
#include <vector>

namespace gpipe {

/// As simulate(program, costs), with stage s's actions taking
/// stage_costs[s] (its `comm`: a message into stage s). One entry stands for
/// every stage. For stages of unequal cost, as a profiler measures them.
inline Simulation simulate(
    const Program& given,
    const std::vector<Costs>& stage_costs) {
  TORCH_CHECK(
      stage_costs.size() == 1 ||
          static_cast<int64_t>(stage_costs.size()) == given.stages,
      "gpipe: simulate needs one Costs, or one per stage (stages: ",
      given.stages,
      ", costs: ",
      stage_costs.size(),
      ")");
  for (size_t s = 0; s < stage_costs.size(); ++s) {
    const Costs& costs = stage_costs[s];
    TORCH_CHECK(
        costs.F >= 0 && costs.B >= 0 && costs.I >= 0 && costs.W >= 0 &&
            costs.comm >= 0,
        "gpipe: simulate needs costs of zero or more (",
        stage_costs.size() == 1 ? "" : "stage " + std::to_string(s) + ": ",
        "F: ",
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
  }
  // A program without communication gets it here, as the pipe would run it.
  const Program program = lower(given);
  detail::check_program(program);
  const detail::Run layout = detail::unit_time_run(program);
  detail::Runner timed(program, stage_costs, false);
  detail::Run run = timed.run(detail::no_limit(program));
  Simulation simulation;
  simulation.makespan = detail::end_of(run);
  simulation.peak_in_flight = detail::peak_in_flight(program, run.lanes);
  simulation.lanes = std::move(run.lanes);
  simulation.grid = detail::grid_of(layout, detail::end_of(layout));
  return simulation;
}

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
  return simulate(given, std::vector<Costs>{costs});
}

} // namespace gpipe
