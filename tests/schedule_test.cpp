#include "test_support.h"

using gpipe::ClockTick;
using gpipe::clock_cycles;

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
