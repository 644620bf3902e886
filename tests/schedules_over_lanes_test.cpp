// The schedules over several stages per lane that pipelining also has:
// interleaved zero bubble, ZB-V and DualPipeV. Their small cases are pinned
// as pipelining's own per-rank orders (printed by its
// `_calculate_single_rank_operations`, idle steps dropped), every size the
// tests try is a valid program with messages matched by tag or by order,
// and the V schedules keep their promise: less bubble than interleaved 1F1B
// on the same lanes, at no more activations.
#include "test_support.h"

#include <gpipe/ordered_messages.h>
#include <gpipe/program.h>
#include <gpipe/schedule.h>
#include <gpipe/schedules.h>
#include <gpipe/simulate.h>

#include <c10/util/StringUtil.h>

#include <algorithm>
#include <string>
#include <vector>

namespace schedules_over_lanes_test {

using gpipe::Costs;
using gpipe::Program;
using gpipe::Schedule;

namespace {

constexpr Schedule kOverLanes[] = {
    Schedule::InterleavedZeroBubble,
    Schedule::ZeroBubbleV,
    Schedule::DualPipeV};

/// Each lane's compute actions as "lane l: ..." lines.
std::string compute_of(const Program& program) {
  std::string text;
  for (size_t l = 0; l < program.lanes.size(); ++l) {
    text += "lane " + std::to_string(l) + ":";
    for (const auto& action : program.lanes[l]) {
      if (gpipe::is_compute(action.op)) {
        text += " " + gpipe::to_string(action);
      }
    }
    text += "\n";
  }
  return text;
}

Program build(Schedule schedule, int64_t lanes, int64_t chunks, int64_t m) {
  return gpipe::build_program(
      schedule,
      lanes * chunks,
      m,
      gpipe::schedule_placement(schedule, lanes * chunks, lanes));
}

std::string error_of_build(
    Schedule schedule,
    int64_t stages,
    const std::vector<int64_t>& lanes) {
  return gpipe_test::error_of(
      [&] { gpipe::build_program(schedule, stages, 4, lanes); });
}

} // namespace

TEST(SchedulesOverLanes, ZeroBubbleVOnTwoLanesIsPipeliningsOrder) {
  EXPECT_EQ(
      compute_of(build(Schedule::ZeroBubbleV, 2, 2, 4)),
      "lane 0: 0F0 0F1 0F2 3F0 3I0 3W0 3F1 3I1 3W1 0F3 0I0 0W0 3F2 3I2 3W2 "
      "0I1 0W1 3F3 3I3 3W3 0I2 0W2 0I3 0W3\n"
      "lane 1: 1F0 2F0 1F1 2F1 2I0 2W0 1F2 1I0 1W0 2F2 2I1 2W1 1F3 1I1 1W1 "
      "2F3 2I2 2W2 1I2 2I3 1I3 1W2 2W3 1W3\n");
}

TEST(
    SchedulesOverLanes,
    DualPipeVOnTwoLanesIsPipeliningsOrderWithPairsInSequence) {
  // Pipelining's OVERLAP_F_B pairs (3F1 with 0B0 on lane 0, say) run as
  // their forward, then their backward.
  EXPECT_EQ(
      compute_of(build(Schedule::DualPipeV, 2, 2, 4)),
      "lane 0: 0F0 0F1 0F2 3F0 3I0 3W0 3F1 0F3 3B1 3F2 0B0 3B2 3F3 0B1 3B3 "
      "0I2 0W2 0I3 0W3\n"
      "lane 1: 1F0 2F0 1F1 2F1 1F2 2B0 2F2 1B0 1F3 2B1 2F3 1B1 2B2 1B2 2I3 "
      "1I3 2W3 1W3\n");
}

TEST(SchedulesOverLanes, InterleavedZeroBubbleOnTwoLanesIsPipeliningsOrder) {
  EXPECT_EQ(
      compute_of(build(Schedule::InterleavedZeroBubble, 2, 2, 4)),
      "lane 0: 0F0 0F1 2F0 2F1 2I0 2W0 0F2 2I1 2W1 0F3 0I0 0W0 2F2 0I1 0W1 "
      "2F3 2I2 2W2 2I3 2W3 0I2 0W2 0I3 0W3\n"
      "lane 1: 1F0 1F1 3F0 3I0 3F1 3I1 3W0 1F2 1I0 3W1 1F3 1I1 1W0 3F2 3I2 "
      "1W1 3F3 3I3 3W2 1I2 3W3 1I3 1W2 1W3\n");
}

TEST(SchedulesOverLanes, AFewMicrobatchesLeaveOutThoseOfTheFullSchedule) {
  // ZB-V needs 2L - 1 micro-batches and DualPipeV 2L; with fewer, the
  // program is the full one without the micro-batches from m on.
  EXPECT_EQ(
      compute_of(build(Schedule::ZeroBubbleV, 3, 2, 1)),
      "lane 0: 0F0 5F0 5I0 5W0 0I0 0W0\n"
      "lane 1: 1F0 4F0 4I0 4W0 1I0 1W0\n"
      "lane 2: 2F0 3F0 3I0 3W0 2I0 2W0\n");
  EXPECT_EQ(
      compute_of(build(Schedule::DualPipeV, 3, 2, 3)),
      "lane 0: 0F0 0F1 0F2 5F0 5I0 5W0 5F1 5I1 5W1 5F2 5B2 0B0 0B1 0B2\n"
      "lane 1: 1F0 1F1 1F2 4F0 4F1 4I0 4W0 4F2 4B1 1B0 4B2 1B1 1B2\n"
      "lane 2: 2F0 3F0 2F1 3F1 2F2 3F2 3B0 2B0 3B1 2B1 3B2 2B2\n");
}

TEST(
    SchedulesOverLanes,
    EveryProgramIsValidWithMessagesByTagAndByOrderForAnyMicrobatchCount) {
  for (const Schedule schedule : kOverLanes) {
    for (int64_t lanes = 1; lanes <= 4; ++lanes) {
      for (int64_t chunks = 1; chunks <= 3; ++chunks) {
        if (gpipe::places_stages_in_a_v(schedule) && chunks != 2) {
          continue;
        }
        for (int64_t m = 1; m <= 20; ++m) {
          const std::string what = std::string(gpipe::to_string(schedule)) +
              " L " + std::to_string(lanes) + " V " + std::to_string(chunks) +
              " m " + std::to_string(m);
          const Program program = build(schedule, lanes, chunks, m);
          EXPECT_EQ(
              gpipe_test::error_of([&] {
                gpipe::simulate(program);
                const Program ordered =
                    gpipe::lower_for_ordered_messages(program);
                gpipe::simulate(ordered);
                gpipe::check_ordered_messages(ordered);
              }),
              "(no error)")
              << what;
          EXPECT_EQ(
              gpipe::parse_program(gpipe::format_program(program)), program)
              << what;
        }
      }
    }
  }
}

TEST(SchedulesOverLanes, TheVSchedulesHaveLessBubbleThanInterleavedOneFOneB) {
  // F, I and W cost the same (B = I + W): ZB-V's lanes are idle for about
  // one F per lane in all, interleaved 1F1B's for its warm-up and drain.
  const Costs costs{1.0, 2.0, 1.0, 1.0};
  for (const int64_t lanes : {2, 4}) {
    for (const int64_t m : {8, 16}) {
      const double work = 2.0 * static_cast<double>(m) * 3.0; // per lane
      const double interleaved =
          gpipe::simulate(build(Schedule::Interleaved1F1B, lanes, 2, m), costs)
              .makespan;
      for (const Schedule v : {Schedule::ZeroBubbleV, Schedule::DualPipeV}) {
        const auto run = gpipe::simulate(build(v, lanes, 2, m), costs);
        const std::string what = std::string(gpipe::to_string(v)) + " L " +
            std::to_string(lanes) + " m " + std::to_string(m);
        EXPECT_LT(run.makespan, interleaved) << what;
        EXPECT_LE(run.makespan - work, static_cast<double>(lanes)) << what;
      }
    }
  }
}

TEST(
    SchedulesOverLanes,
    TheVSchedulesBusiestLaneHoldsNoMoreThanInterleavedOneFOneBs) {
  // Per lane, the sum of its two stages' peaks (in stage-sized
  // activations, F to W): the V spreads them evenly, at most 2L + 1 (about
  // 1F1B's L whole micro-batches on its first lane), where interleaved
  // 1F1B's first lanes hold more.
  auto busiest = [](Schedule schedule, int64_t lanes, int64_t m) {
    const auto placement =
        gpipe::schedule_placement(schedule, 2 * lanes, lanes);
    const auto run = gpipe::simulate(build(schedule, lanes, 2, m));
    std::vector<int64_t> held(static_cast<size_t>(lanes), 0);
    for (size_t s = 0; s < placement.size(); ++s) {
      held[static_cast<size_t>(placement[s])] += run.peak_in_flight[s];
    }
    return *std::max_element(held.begin(), held.end());
  };
  for (const int64_t lanes : {2, 3, 4}) {
    for (const int64_t m : {4, 8, 16}) {
      const int64_t interleaved = busiest(Schedule::Interleaved1F1B, lanes, m);
      for (const Schedule v : {Schedule::ZeroBubbleV, Schedule::DualPipeV}) {
        const int64_t mine = busiest(v, lanes, m);
        EXPECT_LE(mine, interleaved)
            << gpipe::to_string(v) << " L " << lanes << " m " << m;
        EXPECT_LE(mine, 2 * lanes + 1)
            << gpipe::to_string(v) << " L " << lanes << " m " << m;
      }
    }
  }
}

TEST(
    SchedulesOverLanes,
    SchedulePlacementPutsStagesOnTheLanesEachScheduleRuns) {
  EXPECT_EQ(
      gpipe::schedule_placement(Schedule::ZeroBubbleV, 6, 3),
      (std::vector<int64_t>{0, 1, 2, 2, 1, 0}));
  EXPECT_EQ(
      gpipe::schedule_placement(Schedule::InterleavedZeroBubble, 6, 3),
      (std::vector<int64_t>{0, 1, 2, 0, 1, 2}));
  EXPECT_EQ(
      gpipe::schedule_placement(Schedule::OneFOneB, 3, 3),
      (std::vector<int64_t>{0, 1, 2}));
  for (const Schedule schedule : gpipe::kEverySchedule) {
    EXPECT_EQ(gpipe::parse_schedule(gpipe::to_string(schedule)), schedule);
    EXPECT_EQ(
        gpipe::stages_per_lane(schedule),
        schedule == Schedule::FillDrain || schedule == Schedule::OneFOneB ||
                schedule == Schedule::ZeroBubbleH1
            ? 1
            : 2);
  }
  EXPECT_EQ(
      gpipe_test::error_of(
          [] { gpipe::schedule_placement(Schedule::DualPipeV, 6, 2); }),
      "gpipe: dual_pipe_v runs exactly two stages per lane, in a V: 6 stages need 3 lanes (got 2)");
  EXPECT_EQ(
      gpipe_test::error_of([] { gpipe::parse_schedule("zbv"); }),
      "gpipe: unknown schedule 'zbv' (schedules: fill_drain, 1f1b, interleaved_1f1b, zero_bubble_h1, looped_bfs, interleaved_zero_bubble, zero_bubble_v, dual_pipe_v, auto)");
}

TEST(SchedulesOverLanes, TheVSchedulesRunEveryStageOnOneLaneAsAVMergedOntoIt) {
  // A CPU pipe's default: every partition on one lane. The lane never
  // idles, so the makespan is its work.
  for (const Schedule v : {Schedule::ZeroBubbleV, Schedule::DualPipeV}) {
    for (const int64_t stages : {2, 4, 6, 8}) {
      for (const int64_t m : {1, 3, 8}) {
        const Program program = gpipe::build_program(
            v, stages, m, std::vector<int64_t>(static_cast<size_t>(stages), 0));
        EXPECT_DOUBLE_EQ(
            gpipe::simulate(program, Costs{1.0, 2.0, 1.0, 1.0}).makespan,
            3.0 * static_cast<double>(stages * m))
            << gpipe::to_string(v) << " stages " << stages << " m " << m;
      }
    }
  }
}

TEST(SchedulesOverLanes, APlacementThatDoesNotFitSaysWhatWould) {
  EXPECT_EQ(
      error_of_build(Schedule::ZeroBubbleV, 3, {0, 1, 0}),
      "gpipe: zero_bubble_v runs exactly two stages per lane, in a V, so it needs an even number of stages (stages: 3, lanes: 2)");
  EXPECT_EQ(
      error_of_build(Schedule::DualPipeV, 6, {0, 1, 0, 1, 0, 1}),
      "gpipe: dual_pipe_v runs exactly two stages per lane, in a V (stages: 6, lanes: 2); for 6 stages put them on lanes [0, 1, 2, 2, 1, 0] (schedule_placement)");
  EXPECT_EQ(
      error_of_build(Schedule::DualPipeV, 4, {0, 0, 1, 1}),
      "gpipe: dual_pipe_v puts stage s and 2L - 1 - s on lane s, but stage 1 is on lane 0 (lanes: 2)");
  EXPECT_EQ(
      error_of_build(Schedule::ZeroBubbleV, 4, {0, 1, 0, 1}),
      "gpipe: zero_bubble_v puts stage s and 2L - 1 - s on lane s, but stage 2 is on lane 0 (lanes: 2)");
  EXPECT_EQ(
      error_of_build(Schedule::InterleavedZeroBubble, 4, {0, 1, 1, 0}),
      "gpipe: interleaved_zero_bubble puts stage s on lane s mod L, but stage 2 is on lane 1 (lanes: 2)");
  EXPECT_EQ(
      gpipe_test::error_of(
          [] { gpipe::schedule_actions(Schedule::ZeroBubbleV, 4, 2); }),
      "gpipe: zero_bubble_v puts several stages on each lane; use build_program with lane_of_stage (m: 4, n: 2)");
}

} // namespace schedules_over_lanes_test
