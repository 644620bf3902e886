#include "test_support.h"

#include <gpipe/schedule.h>

#include <set>

namespace schedule_test {

using gpipe::clock_cycles;
using gpipe::ClockTick;

TEST(ClockCycles, OneMicrobatchOnePartitionIsOneTick) {
  EXPECT_EQ(clock_cycles(1, 1), (std::vector<ClockTick>{{{0, 0}}}));
}

TEST(ClockCycles, ThreeMicrobatchesOnThreePartitionsFillThenDrain) {
  // clang-format off
  const std::vector<ClockTick> expected = {
      {{0, 0}},
      {{1, 0}, {0, 1}},
      {{2, 0}, {1, 1}, {0, 2}},
      {        {2, 1}, {1, 2}},
      {                {2, 2}},
  };
  // clang-format on
  EXPECT_EQ(clock_cycles(3, 3), expected);
}

TEST(ClockCycles, FewerMicrobatchesThanPartitionsStillVisitsEveryCell) {
  // clang-format off
  const std::vector<ClockTick> expected = {
      {{0, 0}},
      {{1, 0}, {0, 1}},
      {        {1, 1}, {0, 2}},
      {                {1, 2}, {0, 3}},
      {                        {1, 3}},
  };
  // clang-format on
  EXPECT_EQ(clock_cycles(2, 4), expected);
}

TEST(ClockCycles, MorePartitionsThanMicrobatchesKeepsOrderByPartition) {
  // clang-format off
  const std::vector<ClockTick> expected = {
      {{0, 0}},
      {{1, 0}, {0, 1}},
      {{2, 0}, {1, 1}},
      {{3, 0}, {2, 1}},
      {        {3, 1}},
  };
  // clang-format on
  EXPECT_EQ(clock_cycles(4, 2), expected);
}

TEST(ClockCycles, HasMPlusNMinusOneTicksAndEveryCellOnce) {
  for (int64_t m = 1; m <= 9; ++m) {
    for (int64_t n = 1; n <= 6; ++n) {
      const auto ticks = clock_cycles(m, n);
      ASSERT_EQ(static_cast<int64_t>(ticks.size()), m + n - 1);
      std::set<std::pair<int64_t, int64_t>> seen;
      for (size_t k = 0; k < ticks.size(); ++k) {
        for (const auto& cell : ticks[k]) {
          EXPECT_EQ(cell.first + cell.second, static_cast<int64_t>(k));
          EXPECT_TRUE(seen.insert(cell).second);
        }
      }
      EXPECT_EQ(static_cast<int64_t>(seen.size()), m * n);
    }
  }
}

TEST(ClockCycles, RejectsZeroMicrobatchesOrPartitions) {
  EXPECT_EQ(
      gpipe_test::error_of([] { clock_cycles(0, 2); }),
      "gpipe: clock_cycles needs at least one micro-batch and one partition (m: 0, n: 2)");
  EXPECT_THROW(clock_cycles(2, 0), c10::Error);
}

using gpipe::Action;
using gpipe::Op;
using gpipe::Schedule;

namespace {
Action F(int64_t i, int64_t j = 0) {
  return Action::forward(i, j);
}
Action B(int64_t i, int64_t j = 0) {
  return Action::backward(i, j);
}
/// The lists with partition j's actions on stage j.
gpipe::PartitionActions staged(gpipe::PartitionActions actions) {
  for (size_t j = 0; j < actions.size(); ++j) {
    for (auto& action : actions[j]) {
      action.stage = static_cast<int64_t>(j);
    }
  }
  return actions;
}
} // namespace

TEST(ScheduleActions, FillDrainRunsEveryForwardThenBackwardsInReverse) {
  const gpipe::PartitionActions expected = {
      {F(0), F(1), F(2), B(2), B(1), B(0)},
      {F(0), F(1), F(2), B(2), B(1), B(0)}};
  EXPECT_EQ(
      gpipe::schedule_actions(Schedule::FillDrain, 3, 2), staged(expected));
}

TEST(ScheduleActions, OneFOneBWarmsUpThenAlternatesThenDrains) {
  // clang-format off
  const gpipe::PartitionActions expected = {
      {F(0), F(1), F(2), F(3), B(0), F(4), B(1), F(5), B(2), B(3), B(4), B(5)},
      {F(0), F(1), F(2), B(0), F(3), B(1), F(4), B(2), F(5), B(3), B(4), B(5)},
      {F(0), F(1), B(0), F(2), B(1), F(3), B(2), F(4), B(3), F(5), B(4), B(5)},
      {F(0), B(0), F(1), B(1), F(2), B(2), F(3), B(3), F(4), B(4), F(5), B(5)},
  };
  // clang-format on
  EXPECT_EQ(
      gpipe::schedule_actions(Schedule::OneFOneB, 6, 4), staged(expected));
}

TEST(
    ScheduleActions,
    OneFOneBWithFewerMicrobatchesThanPartitionsCutsTheWarmUp) {
  const auto actions = gpipe::schedule_actions(Schedule::OneFOneB, 2, 4);
  EXPECT_EQ(actions[0], (std::vector<Action>{F(0), F(1), B(0), B(1)}));
  EXPECT_EQ(
      actions[3], (std::vector<Action>{F(0, 3), B(0, 3), F(1, 3), B(1, 3)}));
}

TEST(Lockstep, OneFOneBOnFourPartitionsLaysOutAsTheTextbookGrid) {
  const auto grid =
      gpipe::lockstep(gpipe::schedule_actions(Schedule::OneFOneB, 4, 4), 4, 4);
  EXPECT_EQ(
      gpipe::format_grid(grid, 4),
      "step  L0    L1    L2    L3  \n"
      "   0  0F0   .     .     .   \n"
      "   1  0F1   1F0   .     .   \n"
      "   2  0F2   1F1   2F0   .   \n"
      "   3  0F3   1F2   2F1   3F0 \n"
      "   4  .     .     .     3B0 \n"
      "   5  .     .     2B0   3F1 \n"
      "   6  .     1B0   2F2   3B1 \n"
      "   7  0B0   1F3   2B1   3F2 \n"
      "   8  .     1B1   2F3   3B2 \n"
      "   9  0B1   .     2B2   3F3 \n"
      "  10  .     1B2   .     3B3 \n"
      "  11  0B2   .     2B3   .   \n"
      "  12  .     1B3   .     .   \n"
      "  13  0B3   .     .     .   \n");
}

TEST(
    Lockstep,
    AcceptsEveryGeneratedScheduleUpToEightPartitionsAndThirtyTwoMicrobatches) {
  for (const auto schedule : {Schedule::FillDrain, Schedule::OneFOneB}) {
    for (int64_t n = 1; n <= 8; ++n) {
      for (int64_t m = 1; m <= 32; ++m) {
        const auto grid =
            gpipe::lockstep(gpipe::schedule_actions(schedule, m, n), m, n);
        // Both schedules keep the fill-drain bubble: 2 (m + n - 1) steps.
        EXPECT_EQ(static_cast<int64_t>(grid.size()), 2 * (m + n - 1))
            << gpipe::to_string(schedule) << " m " << m << " n " << n;
      }
    }
  }
}

TEST(Lockstep, OneFOneBKeepsAtMostNMinusJMicrobatchesInFlight) {
  const int64_t m = 16;
  const int64_t n = 4;
  const auto actions = gpipe::schedule_actions(Schedule::OneFOneB, m, n);
  for (int64_t j = 0; j < n; ++j) {
    int64_t in_flight = 0;
    int64_t most = 0;
    for (const auto& action : actions[static_cast<size_t>(j)]) {
      in_flight += action.op == Op::F ? 1 : -1;
      most = std::max(most, in_flight);
    }
    EXPECT_EQ(most, n - j);
  }
}

TEST(Lockstep, RejectsABackwardBeforeItsForward) {
  const gpipe::PartitionActions bad = {{B(0), F(0)}};
  EXPECT_EQ(
      gpipe_test::error_of([&] { gpipe::lockstep(bad, 1, 1); }),
      "gpipe: invalid program: lane 0: 0B0 comes before its forward 0F0\n"
      "step  L0  \n"
      ">>> step 0: lane 0 reaches 0B0");
}

TEST(Lockstep, RejectsAMissingOrRepeatedAction) {
  const gpipe::PartitionActions missing = {
      {F(0), F(1), B(1)}, {F(0), F(1), B(1), B(0)}};
  EXPECT_NE(
      gpipe_test::error_of([&] {
        gpipe::lockstep(missing, 2, 2);
      }).find("invalid program: 0B0 is missing"),
      std::string::npos);
  const gpipe::PartitionActions repeated = {{F(0), F(0), B(0)}};
  EXPECT_NE(
      gpipe_test::error_of([&] {
        gpipe::lockstep(repeated, 1, 1);
      }).find("lane 0: 0F0 appears twice"),
      std::string::npos);
  const gpipe::PartitionActions out_of_range = {{F(0), F(2), B(0)}};
  EXPECT_NE(
      gpipe_test::error_of([&] {
        gpipe::lockstep(out_of_range, 1, 1);
      }).find("0F2 is out of range"),
      std::string::npos);
  EXPECT_NE(
      gpipe_test::error_of([&] {
        gpipe::lockstep({}, 1, 1);
      }).find("actions for 0 partitions, expected 1"),
      std::string::npos);
}

TEST(Lockstep, RejectsAnOrderThatDeadlocksAndPrintsTheGridSoFar) {
  // Partition 0 wants B0 before F1; partition 1 needs F1 before it can
  // produce B0: each waits for the other.
  const gpipe::PartitionActions bad = {
      {F(0), B(0), F(1), B(1)}, {F(0), F(1), B(0), B(1)}};
  EXPECT_EQ(
      gpipe_test::error_of([&] { gpipe::lockstep(bad, 2, 2); }),
      "gpipe: invalid program: deadlock (lane 0 waits at 0RECV_B0 for 1SEND_B0, lane 1 waits at 1RECV_F1 for 0SEND_F1)\n"
      "step  L0    L1  \n"
      "   0  0F0   .   \n"
      "   1  .     1F0 \n"
      ">>> step 2: lane 0 waits at 0RECV_B0 for 1SEND_B0, lane 1 waits at 1RECV_F1 for 0SEND_F1");
}

} // namespace schedule_test
