#include "test_support.h"

#include <gpipe/program.h>
#include <gpipe/schedule.h>
#include <gpipe/schedules.h>
#include <gpipe/simulate.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

namespace program_test {

using gpipe::Action;
using gpipe::Costs;
using gpipe::Op;
using gpipe::Program;
using gpipe::Schedule;

namespace {

const Costs kUnit{1.0, 2.0, 1.0, 1.0};

std::vector<int64_t> one_stage_per_lane(int64_t stages) {
  std::vector<int64_t> lanes;
  for (int64_t s = 0; s < stages; ++s) {
    lanes.push_back(s);
  }
  return lanes;
}

std::vector<int64_t> interleaved_lanes(int64_t lanes, int64_t chunks) {
  std::vector<int64_t> lane_of_stage;
  for (int64_t s = 0; s < lanes * chunks; ++s) {
    lane_of_stage.push_back(s % lanes);
  }
  return lane_of_stage;
}

/// Every placement a generator is tried on: one stage per lane, all on
/// lane 0 (the CPU default), two stages per lane.
std::vector<std::vector<int64_t>> layouts(int64_t stages) {
  std::vector<std::vector<int64_t>> all = {
      one_stage_per_lane(stages), std::vector<int64_t>(stages, 0)};
  std::vector<int64_t> pairs;
  for (int64_t s = 0; s < stages; ++s) {
    pairs.push_back(s / 2);
  }
  all.push_back(pairs);
  return all;
}

std::string text_of(const std::vector<int64_t>& values) {
  std::string text;
  for (const auto v : values) {
    text += (text.empty() ? "" : ",") + std::to_string(v);
  }
  return text;
}

/// Simulated makespans (F = 1, B = 2): `thin` on `chunks` stages per lane
/// (stage s on lane s mod L), and `plain` on one stage per lane that is
/// `chunks` times as slow.
std::pair<double, double> thin_and_fat(
    Schedule thin,
    Schedule plain,
    int64_t lanes,
    int64_t chunks,
    int64_t m) {
  const auto v = static_cast<double>(chunks);
  return {
      gpipe::simulate(
          gpipe::build_program(
              thin, lanes * chunks, m, interleaved_lanes(lanes, chunks)),
          Costs{1.0, 2.0, 1.0, 1.0})
          .makespan,
      gpipe::simulate(
          gpipe::build_program(plain, lanes, m, one_stage_per_lane(lanes)),
          Costs{v, 2 * v, v, v})
          .makespan};
}

/// The message of simulate(program) (or "(no error)").
std::string rejection(const Program& program) {
  return gpipe_test::error_of([&] { gpipe::simulate(program); });
}

/// Expects simulate to reject `text` with `fault` (the first line after
/// "gpipe: invalid program: "), a grid, and a marker line.
void expect_rejected(const std::string& text, const std::string& fault) {
  const std::string message = rejection(gpipe::parse_program(text));
  EXPECT_EQ(message.rfind("gpipe: invalid program: " + fault + "\nstep", 0), 0)
      << message;
  EXPECT_NE(message.find("\n>>> step "), std::string::npos) << message;
}

} // namespace

TEST(ActionText, IsStageOpMicrobatch) {
  EXPECT_EQ(gpipe::to_string(Action{2, Op::F, 0}), "2F0");
  EXPECT_EQ(gpipe::to_string(Action{2, Op::I, 5}), "2I5");
  EXPECT_EQ(gpipe::to_string(Action{2, Op::W, 5}), "2W5");
  EXPECT_EQ(gpipe::to_string(Action{2, Op::SEND_F, 0}), "2SEND_F0");
  EXPECT_EQ(gpipe::to_string(Action{0, Op::RECV_B, 3}), "0RECV_B3");
  EXPECT_EQ(gpipe::to_string(Action::backward(7, 1)), "1B7");
  EXPECT_EQ(Action::forward(3), (Action{0, Op::F, 3}));
}

TEST(ActionText, ParsesBackEveryOp) {
  for (const Op op : gpipe::kOps) {
    const Action action{12, op, 34};
    EXPECT_EQ(gpipe::parse_action(gpipe::to_string(action)), action);
  }
}

TEST(ActionText, RejectsTextThatIsNoAction) {
  for (const std::string bad :
       {"", "F0", "2F", "2X0", "2F0x", "-1F0", "2SEND0"}) {
    EXPECT_EQ(
        gpipe_test::error_of([&] { gpipe::parse_action(bad); }),
        "gpipe: cannot parse action '" + bad +
            "': expected <stage><op><micro-batch>, such as 2F0 or 0RECV_B3 (ops: F, B, I, W, SEND_F, RECV_F, SEND_B, RECV_B)");
  }
}

TEST(ProgramText, IsOneLinePerLane) {
  Program program;
  program.stages = 2;
  program.microbatches = 1;
  program.lane_of_stage = {0, 1};
  program.lanes = {
      {{0, Op::F, 0}, {0, Op::SEND_F, 0}, {0, Op::RECV_B, 0}, {0, Op::B, 0}},
      {{1, Op::RECV_F, 0}, {1, Op::F, 0}, {1, Op::B, 0}, {1, Op::SEND_B, 0}}};
  const std::string text =
      "lane 0: 0F0 0SEND_F0 0RECV_B0 0B0\n"
      "lane 1: 1RECV_F0 1F0 1B0 1SEND_B0\n";
  EXPECT_EQ(gpipe::format_program(program), text);
  EXPECT_EQ(gpipe::parse_program(text), program);
}

TEST(ProgramText, ParsesCommentsBlankLinesAndLanesInAnyOrder) {
  const Program program = gpipe::parse_program(
      "# two stages, stage 1 first on lane 0\n"
      "\n"
      "lane 1: 0F0 0B0   # stage 0\n"
      "lane 0:   1F0  1B0\n");
  EXPECT_EQ(program.stages, 2);
  EXPECT_EQ(program.microbatches, 1);
  EXPECT_EQ(program.lane_of_stage, (std::vector<int64_t>{1, 0}));
  EXPECT_EQ(
      gpipe::format_program(program),
      "lane 0: 1F0 1B0\n"
      "lane 1: 0F0 0B0\n");
}

TEST(ProgramText, RejectsLinesThatAreNoLane) {
  EXPECT_EQ(
      gpipe_test::error_of(
          [] { gpipe::parse_program("lane 0: 0F0\nlane 1 0F1"); }),
      "gpipe: cannot parse program line 2: expected 'lane <l>: <actions>' (line: 'lane 1 0F1')");
  EXPECT_EQ(
      gpipe_test::error_of([] { gpipe::parse_program("lane 0: 0F0 0Q1"); }),
      "gpipe: cannot parse program line 1: cannot parse action '0Q1': expected <stage><op><micro-batch>, such as 2F0 or 0RECV_B3 (ops: F, B, I, W, SEND_F, RECV_F, SEND_B, RECV_B) (line: 'lane 0: 0F0 0Q1')");
  EXPECT_EQ(
      gpipe_test::error_of(
          [] { gpipe::parse_program("lane 0: 0F0\nlane 0: 1F0"); }),
      "gpipe: cannot parse program line 2: lane 0 appears twice (line: 'lane 0: 1F0')");
  EXPECT_EQ(
      gpipe_test::error_of([] { gpipe::parse_program("lane 1: 0F0"); }),
      "gpipe: cannot parse program: lane 0 is missing (lanes: 2)");
  EXPECT_EQ(
      gpipe_test::error_of([] { gpipe::parse_program("lane 0: 1F0"); }),
      "gpipe: cannot parse program: stage 0 has no actions (stages: 2)");
}

TEST(ProgramText, HugeLaneStageAndMicrobatchNumbersAreErrorsNotAllocations) {
  // Each used to size a table by the number named: "lane 999999999:" asked
  // for a billion lanes, "999999999F0" a billion stages, and simulate sized
  // its counts by stages x micro-batches.
  EXPECT_EQ(
      gpipe_test::error_of([] { gpipe::parse_program("lane 999999999: 0F0"); }),
      "gpipe: cannot parse program: lane 0 is missing (lanes: 1000000000)");
  EXPECT_EQ(
      gpipe_test::error_of([] { gpipe::parse_program("lane 0: 999999999F0"); }),
      "gpipe: cannot parse program: stage 0 has no actions (stages: 1000000000)");
  const std::string message = gpipe_test::error_of([] {
    gpipe::simulate(gpipe::parse_program("lane 0: 0F999999999 0B999999999"));
  });
  EXPECT_EQ(
      message.rfind(
          "gpipe: invalid program: has 2 compute actions, fewer than one F per stage and micro-batch (stages: 1, micro-batches: 1000000000)",
          0),
      0)
      << message;
}

TEST(Lower, AddsASendAfterEachProducerAndAReceiveBeforeEachConsumer) {
  const Program bare = gpipe::parse_program(
      "lane 0: 0F0 1F0 1B0 0B0\n"
      "lane 1: 2F0 2B0\n");
  EXPECT_EQ(
      gpipe::format_program(gpipe::lower(bare)),
      "lane 0: 0F0 1F0 1SEND_F0 1RECV_B0 1B0 0B0\n"
      "lane 1: 2RECV_F0 2F0 2B0 2SEND_B0\n");
  // Split backwards: the gradient goes out after I, before W.
  EXPECT_EQ(
      gpipe::format_program(
          gpipe::lower(gpipe::parse_program("lane 0: 0F0 0I0 0W0\n"
                                            "lane 1: 1F0 1I0 1W0\n"))),
      "lane 0: 0F0 0SEND_F0 0RECV_B0 0I0 0W0\n"
      "lane 1: 1RECV_F0 1F0 1I0 1SEND_B0 1W0\n");
}

TEST(Lower, LeavesAProgramThatCommunicatesAsItIs) {
  const Program program = gpipe::parse_program(
      "lane 0: 0F0 0SEND_F0\n"
      "lane 1: 1F0\n");
  EXPECT_EQ(gpipe::lower(program), program);
}

TEST(ForwardProgram, RunsTheClockTicksOnEachStagesLane) {
  EXPECT_EQ(
      gpipe::format_program(gpipe::forward_program(3, 2, {0, 1, 1})),
      "lane 0: 0F0 0SEND_F0 0F1 0SEND_F1\n"
      "lane 1: 1RECV_F0 1F0 1RECV_F1 1F1 2F0 2F1\n");
  const auto simulation =
      gpipe::simulate(gpipe::forward_program(3, 2, {0, 1, 2}));
  EXPECT_EQ(simulation.makespan, 4.0);
  // Forward-only: nothing is released, every micro-batch stays.
  EXPECT_EQ(simulation.peak_in_flight, (std::vector<int64_t>{2, 2, 2}));
}

TEST(BuildProgram, OneFOneBOnFourLanesIsTheTextbookOrder) {
  EXPECT_EQ(
      gpipe::format_program(
          gpipe::build_program(Schedule::OneFOneB, 4, 8, {0, 1, 2, 3})),
      "lane 0: 0F0 0SEND_F0 0F1 0SEND_F1 0F2 0SEND_F2 0F3 0SEND_F3 0RECV_B0 0B0 0F4 0SEND_F4 0RECV_B1 0B1 0F5 0SEND_F5 0RECV_B2 0B2 0F6 0SEND_F6 0RECV_B3 0B3 0F7 0SEND_F7 0RECV_B4 0B4 0RECV_B5 0B5 0RECV_B6 0B6 0RECV_B7 0B7\n"
      "lane 1: 1RECV_F0 1F0 1SEND_F0 1RECV_F1 1F1 1SEND_F1 1RECV_F2 1F2 1SEND_F2 1RECV_B0 1B0 1SEND_B0 1RECV_F3 1F3 1SEND_F3 1RECV_B1 1B1 1SEND_B1 1RECV_F4 1F4 1SEND_F4 1RECV_B2 1B2 1SEND_B2 1RECV_F5 1F5 1SEND_F5 1RECV_B3 1B3 1SEND_B3 1RECV_F6 1F6 1SEND_F6 1RECV_B4 1B4 1SEND_B4 1RECV_F7 1F7 1SEND_F7 1RECV_B5 1B5 1SEND_B5 1RECV_B6 1B6 1SEND_B6 1RECV_B7 1B7 1SEND_B7\n"
      "lane 2: 2RECV_F0 2F0 2SEND_F0 2RECV_F1 2F1 2SEND_F1 2RECV_B0 2B0 2SEND_B0 2RECV_F2 2F2 2SEND_F2 2RECV_B1 2B1 2SEND_B1 2RECV_F3 2F3 2SEND_F3 2RECV_B2 2B2 2SEND_B2 2RECV_F4 2F4 2SEND_F4 2RECV_B3 2B3 2SEND_B3 2RECV_F5 2F5 2SEND_F5 2RECV_B4 2B4 2SEND_B4 2RECV_F6 2F6 2SEND_F6 2RECV_B5 2B5 2SEND_B5 2RECV_F7 2F7 2SEND_F7 2RECV_B6 2B6 2SEND_B6 2RECV_B7 2B7 2SEND_B7\n"
      "lane 3: 3RECV_F0 3F0 3B0 3SEND_B0 3RECV_F1 3F1 3B1 3SEND_B1 3RECV_F2 3F2 3B2 3SEND_B2 3RECV_F3 3F3 3B3 3SEND_B3 3RECV_F4 3F4 3B4 3SEND_B4 3RECV_F5 3F5 3B5 3SEND_B5 3RECV_F6 3F6 3B6 3SEND_B6 3RECV_F7 3F7 3B7 3SEND_B7\n");
}

TEST(BuildProgram, FillDrainOnTwoLanesAndOnOne) {
  EXPECT_EQ(
      gpipe::format_program(
          gpipe::build_program(Schedule::FillDrain, 2, 3, {0, 1})),
      "lane 0: 0F0 0SEND_F0 0F1 0SEND_F1 0F2 0SEND_F2 0RECV_B2 0B2 0RECV_B1 0B1 0RECV_B0 0B0\n"
      "lane 1: 1RECV_F0 1F0 1RECV_F1 1F1 1RECV_F2 1F2 1B2 1SEND_B2 1B1 1SEND_B1 1B0 1SEND_B0\n");
  // Sharing a lane: the stages' lists merged step by step, no communication.
  EXPECT_EQ(
      gpipe::format_program(
          gpipe::build_program(Schedule::FillDrain, 2, 3, {0, 0})),
      "lane 0: 0F0 0F1 1F0 0F2 1F1 1F2 1B2 0B2 1B1 0B1 1B0 0B0\n");
}

TEST(BuildProgram, OneFOneBOnOneLaneMergesTheStagesStepByStep) {
  EXPECT_EQ(
      gpipe::format_program(
          gpipe::build_program(Schedule::OneFOneB, 3, 3, {0, 0, 0})),
      "lane 0: 0F0 0F1 1F0 0F2 1F1 2F0 2B0 1B0 2F1 0B0 1F2 2B1 1B1 2F2 0B1 2B2 1B2 0B2\n");
}

TEST(BuildProgram, ZeroBubbleH1DefersWeightGradientsIntoTheDrain) {
  const Program program =
      gpipe::build_program(Schedule::ZeroBubbleH1, 3, 4, {0, 1, 2});
  EXPECT_EQ(
      gpipe::format_program(program),
      "lane 0: 0F0 0SEND_F0 0F1 0SEND_F1 0F2 0SEND_F2 0RECV_B0 0I0 0W0 0F3 0SEND_F3 0RECV_B1 0I1 0W1 0RECV_B2 0I2 0W2 0RECV_B3 0I3 0W3\n"
      "lane 1: 1RECV_F0 1F0 1SEND_F0 1RECV_F1 1F1 1SEND_F1 1RECV_B0 1I0 1SEND_B0 1RECV_F2 1F2 1SEND_F2 1RECV_B1 1I1 1SEND_B1 1W0 1RECV_F3 1F3 1SEND_F3 1RECV_B2 1I2 1SEND_B2 1W1 1RECV_B3 1I3 1SEND_B3 1W2 1W3\n"
      "lane 2: 2RECV_F0 2F0 2I0 2SEND_B0 2RECV_F1 2F1 2I1 2SEND_B1 2RECV_F2 2F2 2I2 2SEND_B2 2W0 2RECV_F3 2F3 2I3 2SEND_B3 2W1 2W2 2W3\n");
  EXPECT_EQ(
      gpipe::format_grid(gpipe::simulate(program, kUnit).grid, 3),
      "step  L0    L1    L2  \n"
      "   0  0F0   .     .   \n"
      "   1  0F1   1F0   .   \n"
      "   2  0F2   1F1   2F0 \n"
      "   3  .     .     2I0 \n"
      "   4  .     1I0   2F1 \n"
      "   5  0I0   1F2   2I1 \n"
      "   6  0W0   1I1   2F2 \n"
      "   7  0F3   1W0   2I2 \n"
      "   8  0I1   1F3   2W0 \n"
      "   9  0W1   1I2   2F3 \n"
      "  10  0I2   1W1   2I3 \n"
      "  11  0W2   1I3   2W1 \n"
      "  12  0I3   1W2   2W2 \n"
      "  13  0W3   1W3   2W3 \n");
}

TEST(BuildProgram, InterleavedRunsChunksInGroupsOfLMicrobatches) {
  const Program program = gpipe::build_program(
      Schedule::Interleaved1F1B, 4, 4, interleaved_lanes(2, 2));
  EXPECT_EQ(
      gpipe::format_program(program),
      "lane 0: 0F0 0SEND_F0 0F1 0SEND_F1 2RECV_F0 2F0 2SEND_F0 2RECV_F1 2F1 2SEND_F1 0F2 0SEND_F2 2RECV_B0 2B0 2SEND_B0 0F3 0SEND_F3 2RECV_B1 2B1 2SEND_B1 2RECV_F2 2F2 2SEND_F2 0RECV_B0 0B0 2RECV_F3 2F3 2SEND_F3 0RECV_B1 0B1 2RECV_B2 2B2 2SEND_B2 2RECV_B3 2B3 2SEND_B3 0RECV_B2 0B2 0RECV_B3 0B3\n"
      "lane 1: 1RECV_F0 1F0 1SEND_F0 1RECV_F1 1F1 1SEND_F1 3RECV_F0 3F0 3B0 3SEND_B0 3RECV_F1 3F1 3B1 3SEND_B1 1RECV_F2 1F2 1SEND_F2 1RECV_B0 1B0 1SEND_B0 1RECV_F3 1F3 1SEND_F3 1RECV_B1 1B1 1SEND_B1 3RECV_F2 3F2 3B2 3SEND_B2 3RECV_F3 3F3 3B3 3SEND_B3 1RECV_B2 1B2 1SEND_B2 1RECV_B3 1B3 1SEND_B3\n");
  EXPECT_EQ(
      gpipe::format_grid(gpipe::simulate(program).grid, 2),
      "step  L0    L1  \n"
      "   0  0F0   .   \n"
      "   1  0F1   1F0 \n"
      "   2  2F0   1F1 \n"
      "   3  2F1   3F0 \n"
      "   4  0F2   3B0 \n"
      "   5  2B0   3F1 \n"
      "   6  0F3   3B1 \n"
      "   7  2B1   1F2 \n"
      "   8  2F2   1B0 \n"
      "   9  0B0   1F3 \n"
      "  10  2F3   1B1 \n"
      "  11  0B1   3F2 \n"
      "  12  .     3B2 \n"
      "  13  2B2   3F3 \n"
      "  14  .     3B3 \n"
      "  15  2B3   1B2 \n"
      "  16  0B2   1B3 \n"
      "  17  0B3   .   \n");
}

TEST(BuildProgram, RejectsALaneOfStageThatIsNoPlacement) {
  EXPECT_EQ(
      gpipe_test::error_of([] {
        gpipe::build_program(Schedule::OneFOneB, 3, 2, {0, 1});
      }),
      "gpipe: build_program: lane_of_stage has 2 entries for 3 stages");
  EXPECT_EQ(
      gpipe_test::error_of([] {
        gpipe::build_program(Schedule::OneFOneB, 2, 2, {0, 2});
      }),
      "gpipe: build_program: lane 1 runs no stage (lanes: 3); number the lanes 0..L-1 and use each");
  EXPECT_EQ(
      gpipe_test::error_of([] {
        gpipe::build_program(Schedule::OneFOneB, 2, 2, {0, -1});
      }),
      "gpipe: build_program: stage 1 is on lane -1; lanes are numbered from 0");
  EXPECT_EQ(
      gpipe_test::error_of([] {
        gpipe::build_program(Schedule::OneFOneB, 2, 0, {0, 1});
      }),
      "gpipe: build_program needs at least one stage and one micro-batch (stages: 2, m: 0)");
}

TEST(BuildProgram, RejectsInterleavingThatIsNotStageModuloLanes) {
  EXPECT_EQ(
      gpipe_test::error_of([] {
        gpipe::build_program(Schedule::Interleaved1F1B, 4, 4, {0, 0, 1, 1});
      }),
      "gpipe: interleaved_1f1b puts stage s on lane s mod L, but stage 1 is on lane 0 (lanes: 2)");
  EXPECT_EQ(
      gpipe_test::error_of([] {
        gpipe::build_program(Schedule::Interleaved1F1B, 3, 4, {0, 1, 0});
      }),
      "gpipe: interleaved_1f1b needs the same number of stages on every lane (stages: 3, lanes: 2)");
  EXPECT_EQ(
      gpipe_test::error_of(
          [] { gpipe::schedule_actions(Schedule::Interleaved1F1B, 4, 2); }),
      "gpipe: interleaved_1f1b puts several stages on each lane; use build_program with lane_of_stage (m: 4, n: 2)");
}

TEST(
    Simulate,
    AcceptsEveryGeneratedProgramUpToEightStagesAndThirtyTwoMicrobatches) {
  for (const auto schedule :
       {Schedule::FillDrain, Schedule::OneFOneB, Schedule::ZeroBubbleH1}) {
    for (int64_t stages = 1; stages <= 8; ++stages) {
      for (const auto& lanes : layouts(stages)) {
        for (int64_t m = 1; m <= 32; ++m) {
          const Program program =
              gpipe::build_program(schedule, stages, m, lanes);
          const std::string what = std::string(gpipe::to_string(schedule)) +
              " stages " + std::to_string(stages) + " m " + std::to_string(m) +
              " lanes " + text_of(lanes);
          EXPECT_EQ(rejection(program), "(no error)") << what;
          EXPECT_EQ(
              gpipe::parse_program(gpipe::format_program(program)), program)
              << what;
        }
      }
    }
  }
}

TEST(Simulate, AcceptsEveryInterleavedProgramForAnyMicrobatchCount) {
  for (int64_t lanes = 1; lanes <= 4; ++lanes) {
    for (int64_t chunks = 1; chunks <= 4; ++chunks) {
      for (int64_t m = 1; m <= 32; ++m) {
        const Program program = gpipe::build_program(
            Schedule::Interleaved1F1B,
            lanes * chunks,
            m,
            interleaved_lanes(lanes, chunks));
        const std::string what = "L " + std::to_string(lanes) + " V " +
            std::to_string(chunks) + " m " + std::to_string(m);
        EXPECT_EQ(rejection(program), "(no error)") << what;
        EXPECT_EQ(gpipe::parse_program(gpipe::format_program(program)), program)
            << what;
      }
    }
  }
}

TEST(Simulate, AcceptsEveryForwardProgram) {
  for (int64_t stages = 1; stages <= 8; ++stages) {
    for (const auto& lanes : layouts(stages)) {
      for (int64_t m = 1; m <= 32; ++m) {
        const Program program = gpipe::forward_program(stages, m, lanes);
        EXPECT_EQ(rejection(program), "(no error)")
            << "stages " << stages << " m " << m << " lanes " << text_of(lanes);
        EXPECT_EQ(
            gpipe::parse_program(gpipe::format_program(program)), program);
      }
    }
  }
}

TEST(Simulate, FillDrainTakesMPlusKMinusOneTimesFPlusB) {
  for (const Costs costs : {Costs{1.0, 2.0}, Costs{1.5, 2.5}}) {
    for (int64_t k = 1; k <= 8; ++k) {
      for (int64_t m = 1; m <= 32; ++m) {
        const auto simulation = gpipe::simulate(
            gpipe::build_program(
                Schedule::FillDrain, k, m, one_stage_per_lane(k)),
            costs);
        EXPECT_DOUBLE_EQ(
            simulation.makespan,
            static_cast<double>(m + k - 1) * (costs.F + costs.B))
            << "k " << k << " m " << m;
        // Every micro-batch's activations are alive at the turn.
        EXPECT_EQ(simulation.peak_in_flight, std::vector<int64_t>(k, m));
      }
    }
  }
}

TEST(Simulate, OneFOneBHasFillDrainsBubbleAndKeepsKMinusJInFlight) {
  for (int64_t k = 1; k <= 8; ++k) {
    for (int64_t m = 1; m <= 32; ++m) {
      const auto simulation = gpipe::simulate(
          gpipe::build_program(Schedule::OneFOneB, k, m, one_stage_per_lane(k)),
          kUnit);
      EXPECT_DOUBLE_EQ(
          simulation.makespan, 3.0 * static_cast<double>(m + k - 1));
      for (int64_t j = 0; j < k; ++j) {
        EXPECT_EQ(
            simulation.peak_in_flight[static_cast<size_t>(j)],
            std::min(k - j, m))
            << "k " << k << " m " << m << " j " << j;
      }
    }
  }
}

TEST(Simulate, ZeroBubbleH1HasAThirdOfOneFOneBsBubbleAndItsPeakInFlight) {
  for (int64_t k = 1; k <= 8; ++k) {
    for (int64_t m = 1; m <= 32; ++m) {
      const auto lanes = one_stage_per_lane(k);
      const auto zero_bubble = gpipe::simulate(
          gpipe::build_program(Schedule::ZeroBubbleH1, k, m, lanes), kUnit);
      const auto one_f_one_b = gpipe::simulate(
          gpipe::build_program(Schedule::OneFOneB, k, m, lanes), kUnit);
      const std::string what =
          "k " + std::to_string(k) + " m " + std::to_string(m);
      // Bubble: the makespan less the 3 m units of work of a stage.
      const double work = 3.0 * static_cast<double>(m);
      if (m >= k) {
        EXPECT_DOUBLE_EQ(
            zero_bubble.makespan - work, static_cast<double>(k - 1))
            << what;
        EXPECT_DOUBLE_EQ(
            3 * (zero_bubble.makespan - work), one_f_one_b.makespan - work)
            << what;
      } else {
        EXPECT_LT(zero_bubble.makespan, one_f_one_b.makespan + (k == 1 ? 1 : 0))
            << what;
      }
      // Memory: no stage holds more than 1F1B's peak (stage 0's, k)...
      EXPECT_EQ(
          *std::max_element(
              zero_bubble.peak_in_flight.begin(),
              zero_bubble.peak_in_flight.end()),
          *std::max_element(
              one_f_one_b.peak_in_flight.begin(),
              one_f_one_b.peak_in_flight.end()))
          << what;
      // ...and at most k - j wait for their I on stage j, as in 1F1B.
      for (const auto& lane : zero_bubble.lanes) {
        std::vector<int64_t> waiting(static_cast<size_t>(k), 0);
        for (const auto& timed : lane) {
          auto& mine = waiting[static_cast<size_t>(timed.action.stage)];
          mine += timed.action.op == Op::F ? 1
              : timed.action.op == Op::I   ? -1
                                           : 0;
          EXPECT_LE(mine, k - timed.action.stage) << what;
        }
      }
    }
  }
}

TEST(BuildProgram, LoopedBfsRunsEachStagesForwardsThenTheBackwardsInReverse) {
  // Two lanes, two stages each (stage s on lane s mod 2), 3 micro-batches.
  const Program program =
      gpipe::build_program(Schedule::LoopedBFS, 4, 3, interleaved_lanes(2, 2));
  std::vector<std::string> lanes;
  for (const auto& lane : program.lanes) {
    std::string text;
    for (const Action& action : lane) {
      if (gpipe::is_compute(action.op)) {
        text += (text.empty() ? "" : " ") + gpipe::to_string(action);
      }
    }
    lanes.push_back(text);
  }
  EXPECT_EQ(lanes[0], "0F0 0F1 0F2 2F0 2F1 2F2 2B2 2B1 2B0 0B2 0B1 0B0");
  EXPECT_EQ(lanes[1], "1F0 1F1 1F2 3F0 3F1 3F2 3B2 3B1 3B0 1B2 1B1 1B0");
}

TEST(Simulate, AcceptsEveryLoopedBfsProgramOnEveryPlacement) {
  for (int64_t stages = 1; stages <= 8; ++stages) {
    for (int64_t m = 1; m <= 16; ++m) {
      auto placements = layouts(stages);
      for (int64_t lanes = 2; lanes < stages; ++lanes) {
        if (stages % lanes == 0) {
          placements.push_back(interleaved_lanes(lanes, stages / lanes));
        }
      }
      for (const auto& lanes : placements) {
        const Program program =
            gpipe::build_program(Schedule::LoopedBFS, stages, m, lanes);
        const std::string what = "stages " + std::to_string(stages) + " m " +
            std::to_string(m) + " lanes " + text_of(lanes);
        EXPECT_EQ(rejection(program), "(no error)") << what;
        EXPECT_EQ(gpipe::parse_program(gpipe::format_program(program)), program)
            << what;
        // Breadth first: every micro-batch is alive on every stage at the
        // turn, as in fill-drain.
        for (const int64_t peak : gpipe::simulate(program).peak_in_flight) {
          EXPECT_EQ(peak, m) << what;
        }
      }
    }
  }
}

TEST(Simulate, LoopedBfsWithOneStagePerLaneIsFillDrain) {
  for (int64_t k = 1; k <= 6; ++k) {
    for (int64_t m = 1; m <= 9; ++m) {
      EXPECT_EQ(
          gpipe::build_program(
              Schedule::LoopedBFS, k, m, one_stage_per_lane(k)),
          gpipe::build_program(
              Schedule::FillDrain, k, m, one_stage_per_lane(k)))
          << "k " << k << " m " << m;
    }
  }
}

TEST(Simulate, LoopingBeatsFillDrainOnFatterStages) {
  // V thin stages per lane against one stage V times as slow per lane.
  for (int64_t lanes = 2; lanes <= 4; ++lanes) {
    for (int64_t chunks = 2; chunks <= 4; ++chunks) {
      for (int64_t m = 2; m <= 16; ++m) {
        const auto [looped, fat] = thin_and_fat(
            Schedule::LoopedBFS, Schedule::FillDrain, lanes, chunks, m);
        EXPECT_LT(looped, fat)
            << "L " << lanes << " V " << chunks << " m " << m;
      }
    }
  }
}

TEST(Simulate, InterleavingBeatsOneFOneBOnFatterStages) {
  for (int64_t lanes = 2; lanes <= 4; ++lanes) {
    for (int64_t chunks = 2; chunks <= 4; ++chunks) {
      for (int64_t m = 2; m <= 32; ++m) {
        const auto [interleaved, fat] = thin_and_fat(
            Schedule::Interleaved1F1B, Schedule::OneFOneB, lanes, chunks, m);
        EXPECT_LT(interleaved, fat)
            << "L " << lanes << " V " << chunks << " m " << m;
      }
    }
  }
}

TEST(Simulate, ChargesCommunicationOnTheReceive) {
  const auto simulation = gpipe::simulate(
      gpipe::build_program(Schedule::FillDrain, 2, 1, {0, 1}),
      Costs{1.0, 2.0, 1.0, 1.0, 0.5});
  // 0F0 [0, 1], 1RECV_F0 [1, 1.5], 1F0 [1.5, 2.5], 1B0 [2.5, 4.5],
  // 0RECV_B0 [4.5, 5], 0B0 [5, 7].
  EXPECT_DOUBLE_EQ(simulation.makespan, 7.0);
  ASSERT_EQ(simulation.lanes.size(), 2u);
  const auto& lane1 = simulation.lanes[1];
  ASSERT_EQ(lane1.size(), 4u);
  EXPECT_EQ(lane1[0].action, (Action{1, Op::RECV_F, 0}));
  EXPECT_DOUBLE_EQ(lane1[0].start, 1.0);
  EXPECT_DOUBLE_EQ(lane1[0].end, 1.5);
  EXPECT_DOUBLE_EQ(lane1[2].start, 2.5);
  EXPECT_DOUBLE_EQ(lane1[2].end, 4.5);
  EXPECT_DOUBLE_EQ(simulation.lanes[0].back().start, 5.0);
}

TEST(Simulate, RunsStagesSharingALaneOneAfterTheOther) {
  const auto simulation = gpipe::simulate(
      gpipe::build_program(
          Schedule::OneFOneB, 4, 8, std::vector<int64_t>(4, 0)),
      kUnit);
  EXPECT_DOUBLE_EQ(simulation.makespan, 4 * 8 * 3.0);
  ASSERT_EQ(simulation.grid.size(), static_cast<size_t>(4 * 8 * 2));
}

TEST(Simulate, RejectsALaneOfStageOfTheWrongSizeOrOutOfRange) {
  Program program = gpipe::parse_program("lane 0: 0F0\nlane 1: 1F0\n");
  program.lane_of_stage = {0};
  EXPECT_EQ(
      rejection(program),
      "gpipe: invalid program: lane_of_stage has 1 entries for 2 stages\n"
      "step  L0    L1  \n"
      ">>> before step 0");
  program.lane_of_stage = {0, 2};
  EXPECT_EQ(
      rejection(program),
      "gpipe: invalid program: stage 1 is on lane 2, out of range (lanes: 2)\n"
      "step  L0    L1  \n"
      ">>> before step 0");
  EXPECT_EQ(
      rejection(Program{}),
      "gpipe: invalid program: needs at least one stage, micro-batch and lane (stages: 0, micro-batches: 0, lanes: 0)\n"
      "step\n"
      ">>> before step 0");
}

TEST(Simulate, RejectsAStagesActionOnAnotherLane) {
  expect_rejected(
      "lane 0: 0F0 0SEND_F0 0RECV_B0 0B0\n"
      "lane 1: 1RECV_F0 1F0 1B0 1SEND_B0 0F1\n",
      "lane 1: 0F1 is on lane 1, but stage 0 runs on lane 0");
}

TEST(Simulate, RejectsAStageOrMicrobatchOutOfRange) {
  Program program = gpipe::parse_program("lane 0: 0F0 0F1 0B1 0B0\n");
  program.microbatches = 1;
  EXPECT_EQ(
      rejection(program),
      "gpipe: invalid program: lane 0: 0F1 is out of range (stages: 1, micro-batches: 1)\n"
      "step  L0  \n"
      "   0  0F0 \n"
      ">>> step 1: lane 0 reaches 0F1");
  program = gpipe::parse_program("lane 0: 0F0 1F0 1B0 0B0\n");
  program.stages = 1;
  program.lane_of_stage = {0};
  EXPECT_NE(
      rejection(program).find("lane 0: 1F0 is out of range (stages: 1"),
      std::string::npos);
}

TEST(Simulate, RejectsAForwardMissingOrRepeated) {
  expect_rejected("lane 0: 0F0 0F1 0F0 0B0 0B1\n", "lane 0: 0F0 appears twice");
  Program program = gpipe::parse_program("lane 0: 0F0 0B0\n");
  program.microbatches = 2;
  EXPECT_EQ(
      rejection(program),
      "gpipe: invalid program: 0F1 is missing\n"
      "step  L0  \n"
      "   0  0F0 \n"
      "   1  0B0 \n"
      ">>> step 2: every lane is done");
}

TEST(Simulate, RejectsABackwardMissingOrRepeated) {
  expect_rejected("lane 0: 0F0 0F1 0B0 0B1 0B0\n", "lane 0: 0B0 appears twice");
  expect_rejected("lane 0: 0F0 0F1 0B0\n", "0B1 is missing (or 0I1 and 0W1)");
  expect_rejected("lane 0: 0F0 0I0\n", "0W0 is missing");
  expect_rejected("lane 0: 0F0 0I0 0W0 0W0\n", "lane 0: 0W0 appears twice");
}

TEST(Simulate, RejectsABackwardTogetherWithItsHalves) {
  expect_rejected(
      "lane 0: 0F0 0B0 0I0 0W0\n",
      "lane 0: 0B0 and 0I0 both appear: a backward is either B, or I and W");
}

TEST(Simulate, RejectsABackwardBeforeItsForward) {
  EXPECT_EQ(
      rejection(gpipe::parse_program(
          "lane 0: 0F0 0SEND_F0 0F1 0SEND_F1 0RECV_B0 0B0 0RECV_B1 0B1\n"
          "lane 1: 1RECV_F0 1F0 1B0 1SEND_B0 1B1 1RECV_F1 1F1 1SEND_B1\n")),
      "gpipe: invalid program: lane 1: 1B1 comes before its forward 1F1\n"
      "step  L0    L1  \n"
      "   0  0F0   .   \n"
      "   1  0F1   1F0 \n"
      "   2  .     1B0 \n"
      ">>> step 3: lane 1 reaches 1B1");
}

TEST(Simulate, RejectsAWeightGradientBeforeItsInputGradient) {
  EXPECT_EQ(
      rejection(gpipe::parse_program("lane 0: 0F0 0F1 0I0 0W1 0I1 0W0\n")),
      "gpipe: invalid program: lane 0: 0W1 comes before its input gradient 0I1\n"
      "step  L0  \n"
      "   0  0F0 \n"
      "   1  0F1 \n"
      "   2  0I0 \n"
      ">>> step 3: lane 0 reaches 0W1");
}

TEST(Simulate, RejectsAReceiveWithoutItsSendAndASendWithoutItsReceive) {
  expect_rejected(
      "lane 0: 0F0 0RECV_B0 0B0\n"
      "lane 1: 1RECV_F0 1F0 1B0 1SEND_B0\n",
      "lane 1: 1RECV_F0 has no matching send 0SEND_F0");
  // A send without its receive: the consumer is the one at fault, it needs
  // its receive before it (here none, then a late one).
  expect_rejected(
      "lane 0: 0F0 0SEND_F0 0RECV_B0 0B0\n"
      "lane 1: 1F0 1B0 1SEND_B0\n",
      "lane 1: 1F0 comes before its receive 1RECV_F0 (stage 0 runs on lane 0)");
  expect_rejected(
      "lane 0: 0F0 0SEND_F0 0RECV_B0 0B0\n"
      "lane 1: 1F0 1RECV_F0 1B0 1SEND_B0\n",
      "lane 1: 1F0 comes before its receive 1RECV_F0 (stage 0 runs on lane 0)");
}

TEST(Simulate, RejectsCommunicationOnOneLaneOrToNoNeighbour) {
  expect_rejected(
      "lane 0: 0F0 0SEND_F0 1RECV_F0 1F0 1B0 0B0\n",
      "lane 0: 0SEND_F0 talks between stages 0 and 1, which share lane 0 (communication is only between neighbours on different lanes)");
  expect_rejected(
      "lane 0: 0F0 0SEND_F0 0RECV_B0 0B0\n"
      "lane 1: 1RECV_F0 1F0 1SEND_F0 1B0 1SEND_B0\n",
      "lane 1: 1SEND_F0 talks to stage 2, which does not exist (stages: 2)");
}

TEST(Simulate, RejectsADeadlockAndSaysWhatEachLaneWaitsFor) {
  // Lane 0 wants 0B0 before 0F1; lane 1 needs 1F1 before it gives 1B0.
  EXPECT_EQ(
      rejection(
          gpipe::lower(gpipe::parse_program("lane 0: 0F0 0B0 0F1 0B1\n"
                                            "lane 1: 1F0 1F1 1B0 1B1\n"))),
      "gpipe: invalid program: deadlock (lane 0 waits at 0RECV_B0 for 1SEND_B0, lane 1 waits at 1RECV_F1 for 0SEND_F1)\n"
      "step  L0    L1  \n"
      "   0  0F0   .   \n"
      "   1  .     1F0 \n"
      ">>> step 2: lane 0 waits at 0RECV_B0 for 1SEND_B0, lane 1 waits at 1RECV_F1 for 0SEND_F1");
}

TEST(ScheduleActions, ZeroBubbleH1SplitsEveryBackward) {
  const auto actions = gpipe::schedule_actions(Schedule::ZeroBubbleH1, 4, 2);
  EXPECT_EQ(
      actions[1],
      (std::vector<Action>{
          {1, Op::F, 0},
          {1, Op::I, 0},
          {1, Op::F, 1},
          {1, Op::I, 1},
          {1, Op::W, 0},
          {1, Op::F, 2},
          {1, Op::I, 2},
          {1, Op::W, 1},
          {1, Op::F, 3},
          {1, Op::I, 3},
          {1, Op::W, 2},
          {1, Op::W, 3}}));
  EXPECT_EQ(
      gpipe::lockstep(actions, 4, 2).size(), static_cast<size_t>(3 * 4 + 1));
}

TEST(ScheduleNames, AreTheOptionSpellings) {
  EXPECT_STREQ(gpipe::to_string(Schedule::FillDrain), "fill_drain");
  EXPECT_STREQ(gpipe::to_string(Schedule::OneFOneB), "1f1b");
  EXPECT_STREQ(gpipe::to_string(Schedule::Interleaved1F1B), "interleaved_1f1b");
  EXPECT_STREQ(gpipe::to_string(Schedule::ZeroBubbleH1), "zero_bubble_h1");
  EXPECT_STREQ(gpipe::to_string(gpipe::Phase::BackwardInput), "backward_input");
  EXPECT_STREQ(
      gpipe::to_string(gpipe::Phase::BackwardWeight), "backward_weight");
  EXPECT_STREQ(gpipe::to_string(Op::SEND_B), "SEND_B");
}

} // namespace program_test
