// The programs of each schedule, for any placement of stages on lanes.
//
// Why generators and not hand-written programs: a schedule is a rule (1F1B:
// warm up, alternate, drain), a program is the rule applied to sizes and a
// placement, and the pipeline runs programs. Each generator here is checked
// by simulate for every size the tests try, and its small cases are pinned as
// literal text. Where several stages share a lane (every stage on one CPU
// thread, or interleaving), the stages' own lists are merged onto the lane by
// a unit-step run, so a lane never waits on work queued behind it. Letters:
// m micro-batches, s a stage, i a micro-batch, l a lane, L lanes, V chunks per
// lane.
#pragma once

#include <gpipe/detail/program/zero_bubble_programs.h>
#include <gpipe/program.h>
#include <gpipe/schedule.h>
#include <gpipe/simulate.h>

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace gpipe {

namespace detail {

/// Checks lane_of_stage (one entry per stage, lanes 0..L-1 each used) and
/// returns L.
inline int64_t count_lanes(
    const char* what,
    int64_t stages,
    int64_t m,
    const std::vector<int64_t>& lane_of_stage) {
  TORCH_CHECK(
      stages >= 1 && m >= 1,
      "gpipe: ",
      what,
      " needs at least one stage and one micro-batch (stages: ",
      stages,
      ", m: ",
      m,
      ")");
  TORCH_CHECK(
      static_cast<int64_t>(lane_of_stage.size()) == stages,
      "gpipe: ",
      what,
      ": lane_of_stage has ",
      lane_of_stage.size(),
      " entries for ",
      stages,
      " stages");
  const int64_t lanes =
      1 + *std::max_element(lane_of_stage.begin(), lane_of_stage.end());
  std::vector<bool> used(static_cast<size_t>(std::max<int64_t>(lanes, 0)));
  for (int64_t s = 0; s < stages; ++s) {
    const int64_t l = lane_of_stage[static_cast<size_t>(s)];
    TORCH_CHECK(
        l >= 0,
        "gpipe: ",
        what,
        ": stage ",
        s,
        " is on lane ",
        l,
        "; lanes are numbered from 0");
    used[static_cast<size_t>(l)] = true;
  }
  for (int64_t l = 0; l < lanes; ++l) {
    TORCH_CHECK(
        used[static_cast<size_t>(l)],
        "gpipe: ",
        what,
        ": lane ",
        l,
        " runs no stage (lanes: ",
        lanes,
        "); number the lanes 0..L-1 and use each");
  }
  return lanes;
}

/// A program of `lanes` empty lanes, stage s on lane_of_stage[s].
inline Program no_actions(
    int64_t stages,
    int64_t m,
    const std::vector<int64_t>& lane_of_stage,
    int64_t lanes) {
  Program program;
  program.stages = stages;
  program.microbatches = m;
  program.lane_of_stage = lane_of_stage;
  program.lanes.resize(static_cast<size_t>(lanes));
  return program;
}

/// Runs `apart` (compute only) in unit steps and appends each step's actions
/// to the lanes of `lane_of_stage`, in the order they start: a lane that
/// runs what several of apart's lanes ran never waits on work queued behind
/// it. Communication is left to lower().
inline Program merge_onto_lanes(
    const Program& apart,
    const std::vector<int64_t>& lane_of_stage,
    int64_t lanes) {
  Runner runner(apart, unit_costs(), /*implicit=*/true);
  const Run run = runner.run(no_limit(apart));
  TORCH_CHECK(
      run.finished,
      "gpipe: internal error: the per-stage lists deadlock (",
      waits(apart, runner, run),
      ")");
  std::vector<TimedAction> all;
  for (const auto& lane : run.lanes) {
    all.insert(all.end(), lane.begin(), lane.end());
  }
  std::stable_sort(
      all.begin(), all.end(), [](const TimedAction& a, const TimedAction& b) {
        return a.start < b.start;
      });
  Program program =
      no_actions(apart.stages, apart.microbatches, lane_of_stage, lanes);
  for (const auto& timed : all) {
    program
        .lanes[static_cast<size_t>(
            lane_of_stage[static_cast<size_t>(timed.action.stage)])]
        .push_back(timed.action);
  }
  return program;
}

/// Places per-stage lists on lanes: each stage on its own lane, merged.
inline Program merge_onto_lanes(
    const PartitionActions& per_stage,
    int64_t m,
    const std::vector<int64_t>& lane_of_stage,
    int64_t lanes) {
  const auto stages = static_cast<int64_t>(per_stage.size());
  Program apart;
  apart.stages = stages;
  apart.microbatches = m;
  for (int64_t s = 0; s < stages; ++s) {
    apart.lane_of_stage.push_back(s);
  }
  apart.lanes = per_stage;
  return merge_onto_lanes(apart, lane_of_stage, lanes);
}

/// Checks that `schedule` can run with stage s on lane_of_stage[s]: stage s
/// on lane s mod L with as many stages on every lane (Interleaved1F1B,
/// InterleavedZeroBubble), or stage s and 2L - 1 - s on lane s
/// (ZeroBubbleV, DualPipeV). The error says what would fit.
inline void check_schedule_placement(
    Schedule schedule,
    int64_t stages,
    const std::vector<int64_t>& lane_of_stage,
    int64_t lanes) {
  const bool v = places_stages_in_a_v(schedule);
  TORCH_CHECK(
      !v || stages % 2 == 0,
      "gpipe: ",
      to_string(schedule),
      " runs exactly two stages per lane, in a V, so it needs an even number of stages (stages: ",
      stages,
      ", lanes: ",
      lanes,
      ")");
  TORCH_CHECK(
      !v || stages == 2 * lanes,
      "gpipe: ",
      to_string(schedule),
      " runs exactly two stages per lane, in a V (stages: ",
      stages,
      ", lanes: ",
      lanes,
      "); for ",
      stages,
      " stages put them on lanes [",
      c10::Join(", ", schedule_placement(schedule, stages, stages / 2)),
      "] (schedule_placement)");
  TORCH_CHECK(
      v || stages % lanes == 0,
      "gpipe: ",
      to_string(schedule),
      " needs the same number of stages on every lane (stages: ",
      stages,
      ", lanes: ",
      lanes,
      ")");
  for (int64_t s = 0; s < stages; ++s) {
    const int64_t want = v ? std::min(s, 2 * lanes - 1 - s) : s % lanes;
    TORCH_CHECK(
        lane_of_stage[static_cast<size_t>(s)] == want,
        "gpipe: ",
        to_string(schedule),
        v ? " puts stage s and 2L - 1 - s on lane s"
          : " puts stage s on lane s mod L",
        ", but stage ",
        s,
        " is on lane ",
        lane_of_stage[static_cast<size_t>(s)],
        " (lanes: ",
        lanes,
        ")");
  }
}

/// Megatron's interleaved 1F1B on L lanes, V = stages / L chunks per lane,
/// stage s on lane s mod L. Lane l's forwards go in groups of L
/// micro-batches, chunk by chunk: for each group, for v in 0..V-1, for i in
/// the group, F(v L + l, i); its backwards the same with the chunks
/// reversed. It runs (L - l - 1) 2 + (V - 1) L warm-up forwards (L - l - 1
/// when V is 1: plain 1F1B), then one forward and one backward, then the
/// remaining backwards.
///
/// Any m: Megatron's order needs whole groups (with a short last group, a
/// lane's warm-up runs ahead of what the lane before it sends, and the
/// program deadlocks: L 4, V 3, m 5 for one). So the program is made for m
/// rounded up to a multiple of L, then the micro-batches from m on are left
/// out; leaving out whole micro-batches keeps a program valid, since what
/// is left needs nothing that was left out and keeps each lane's order.
inline Program interleaved(
    int64_t stages,
    int64_t m,
    const std::vector<int64_t>& lane_of_stage,
    int64_t lanes) {
  check_schedule_placement(
      Schedule::Interleaved1F1B, stages, lane_of_stage, lanes);
  const int64_t chunks = stages / lanes;
  Program program = no_actions(stages, m, lane_of_stage, lanes);
  for (int64_t l = 0; l < lanes; ++l) {
    std::vector<Action> forwards;
    std::vector<Action> backwards;
    const int64_t padded = (m + lanes - 1) / lanes * lanes;
    for (int64_t g = 0; g < padded; g += lanes) {
      for (int64_t v = 0; v < chunks; ++v) {
        for (int64_t i = g; i < g + lanes; ++i) {
          forwards.push_back(Action::forward(i, v * lanes + l));
          backwards.push_back(
              Action::backward(i, (chunks - 1 - v) * lanes + l));
        }
      }
    }
    const auto total = static_cast<int64_t>(forwards.size());
    const int64_t warmup = std::min(
        chunks == 1 ? lanes - l - 1
                    : (lanes - l - 1) * 2 + (chunks - 1) * lanes,
        total);
    auto& mine = program.lanes[static_cast<size_t>(l)];
    int64_t f = 0;
    int64_t b = 0;
    for (; f < warmup; ++f) {
      mine.push_back(forwards[static_cast<size_t>(f)]);
    }
    while (f < total) {
      mine.push_back(forwards[static_cast<size_t>(f++)]);
      mine.push_back(backwards[static_cast<size_t>(b++)]);
    }
    while (b < total) {
      mine.push_back(backwards[static_cast<size_t>(b++)]);
    }
    keep_first_microbatches(mine, m);
  }
  return program;
}

/// LoopedBFS on any placement: lane l runs F(s, i) for its stages s in
/// ascending order, each for i = 0..m-1, then B(s, i) for its stages in
/// descending order, each for i = m-1..0. It cannot deadlock: every lane
/// finishes its forwards before its first backward, a forward waits only on
/// a lower stage, which its lane runs first, and a backward only on a
/// higher one, which its lane runs first too.
inline Program looped_bfs(
    int64_t stages,
    int64_t m,
    const std::vector<int64_t>& lane_of_stage,
    int64_t lanes) {
  Program program = no_actions(stages, m, lane_of_stage, lanes);
  for (int64_t s = 0; s < stages; ++s) {
    auto& mine =
        program
            .lanes[static_cast<size_t>(lane_of_stage[static_cast<size_t>(s)])];
    for (int64_t i = 0; i < m; ++i) {
      mine.push_back(Action::forward(i, s));
    }
  }
  for (int64_t s = stages - 1; s >= 0; --s) {
    auto& mine =
        program
            .lanes[static_cast<size_t>(lane_of_stage[static_cast<size_t>(s)])];
    for (int64_t i = m - 1; i >= 0; --i) {
      mine.push_back(Action::backward(i, s));
    }
  }
  return program;
}

/// The smallest count from m on for which pipelining's interleaved zero
/// bubble has whole rounds: a multiple of max(1, count / L).
inline int64_t whole_rounds(int64_t m, int64_t lanes) {
  int64_t count = m;
  while (count % std::max<int64_t>(1, count / lanes) != 0) {
    ++count;
  }
  return count;
}

/// One of the zero bubble schedules over several stages per lane, lane by
/// lane (Note [The anchor's orders]).
inline Program zero_bubble_over_lanes(
    Schedule schedule,
    int64_t stages,
    int64_t m,
    const std::vector<int64_t>& lane_of_stage,
    int64_t lanes) {
  if (lanes == 1 && places_stages_in_a_v(schedule) && stages % 2 == 0 &&
      stages > 2) {
    // Every stage on one lane (a CPU pipe's default): the V on stages / 2
    // lanes, merged onto the one.
    const int64_t folded = stages / 2;
    return merge_onto_lanes(
        zero_bubble_over_lanes(
            schedule,
            stages,
            m,
            schedule_placement(schedule, stages, folded),
            folded),
        lane_of_stage,
        lanes);
  }
  check_schedule_placement(schedule, stages, lane_of_stage, lanes);
  Program program = no_actions(stages, m, lane_of_stage, lanes);
  for (int64_t l = 0; l < lanes; ++l) {
    auto& mine = program.lanes[static_cast<size_t>(l)];
    if (schedule == Schedule::InterleavedZeroBubble) {
      mine = interleaved_zero_bubble_lane(
          l, lanes, stages / lanes, whole_rounds(m, lanes));
    } else if (schedule == Schedule::ZeroBubbleV) {
      mine = zero_bubble_v_lane(l, lanes, std::max(m, 2 * lanes - 1));
    } else {
      mine = dual_pipe_v_lane(l, lanes, std::max(m, 2 * lanes));
    }
    keep_first_microbatches(mine, m);
  }
  return program;
}

} // namespace detail

/// The forward of every micro-batch on every stage, in clock_cycles order
/// (tick by tick, stage order within a tick), each on its stage's lane;
/// lowered.
inline Program forward_program(
    int64_t stages,
    int64_t microbatches,
    const std::vector<int64_t>& lane_of_stage) {
  const int64_t lanes = detail::count_lanes(
      "forward_program", stages, microbatches, lane_of_stage);
  Program program =
      detail::no_actions(stages, microbatches, lane_of_stage, lanes);
  for (const auto& tick : clock_cycles(microbatches, stages)) {
    for (const auto& cell : tick) {
      program
          .lanes[static_cast<size_t>(
              lane_of_stage[static_cast<size_t>(cell.second)])]
          .push_back(Action::forward(cell.first, cell.second));
    }
  }
  return lower(program);
}

/// The program of `schedule` for `microbatches` micro-batches through
/// `stages` stages, stage s on lane lane_of_stage[s] (lanes 0..L-1, each
/// used); lowered. Interleaved1F1B and InterleavedZeroBubble need stage s
/// on lane s mod L, ZeroBubbleV and DualPipeV stage s and 2L - 1 - s on
/// lane s (schedule_placement gives either; the V schedules also run every
/// stage on one lane, as a V merged onto it); LoopedBFS takes any placement
/// (stage s on lane s mod L is pipelining's).
inline Program build_program(
    Schedule schedule,
    int64_t stages,
    int64_t microbatches,
    const std::vector<int64_t>& lane_of_stage) {
  const int64_t lanes =
      detail::count_lanes("build_program", stages, microbatches, lane_of_stage);
  if (schedule == Schedule::Interleaved1F1B) {
    return lower(
        detail::interleaved(stages, microbatches, lane_of_stage, lanes));
  }
  if (schedule == Schedule::LoopedBFS) {
    return lower(
        detail::looped_bfs(stages, microbatches, lane_of_stage, lanes));
  }
  if (schedule == Schedule::InterleavedZeroBubble ||
      places_stages_in_a_v(schedule)) {
    return lower(detail::zero_bubble_over_lanes(
        schedule, stages, microbatches, lane_of_stage, lanes));
  }
  return lower(detail::merge_onto_lanes(
      schedule_actions(schedule, microbatches, stages),
      microbatches,
      lane_of_stage,
      lanes));
}

} // namespace gpipe
