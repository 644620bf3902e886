// The schedule pictures as data: the theoretical fill-drain layout, layouts
// of measured timelines, the bubble arithmetic and the summary table.
#include "test_support.h"

#include <gpipe/chart.h>

#include "../examples/run_results.h"

#include <set>
#include <tuple>

namespace chart_test {

using gpipe::Phase;
using gpipe::ScheduleLayout;
using gpipe::ScheduleSlice;

namespace {

const ScheduleSlice* find_slice(
    const ScheduleLayout& layout,
    int64_t row,
    int64_t microbatch,
    Phase phase) {
  for (const auto& slice : layout.slices) {
    if (slice.row == row && slice.microbatch == microbatch &&
        slice.phase == phase) {
      return &slice;
    }
  }
  return nullptr;
}

} // namespace

TEST(Chart, EfficiencyOfFourPartitionsAndSixteenMicrobatchesIs8421Percent) {
  EXPECT_NEAR(gpipe::pipeline_efficiency(4, 16), 16.0 / 19.0, 1e-12);
  EXPECT_NEAR(100 * gpipe::pipeline_efficiency(4, 16), 84.21, 0.005);
  EXPECT_NEAR(gpipe::bubble_fraction(4, 16), 3.0 / 19.0, 1e-12);
  EXPECT_DOUBLE_EQ(gpipe::pipeline_efficiency(1, 1), 1.0);
}

TEST(
    Chart,
    TheoreticalScheduleOfFourPartitionsAndSixteenMicrobatchesHasEveryCellOnItsTick) {
  const auto layout = gpipe::theoretical_schedule(4, 16);
  ASSERT_EQ(layout.row_labels.size(), 4u);
  ASSERT_EQ(layout.slices.size(), 2u * 4 * 16);
  EXPECT_DOUBLE_EQ(layout.span(), 2.0 * (16 + 4 - 1));

  std::set<std::tuple<int64_t, int64_t, Phase>> seen;
  for (const auto& slice : layout.slices) {
    EXPECT_DOUBLE_EQ(slice.duration, 1.0);
    EXPECT_TRUE(seen.insert({slice.row, slice.microbatch, slice.phase}).second)
        << "duplicate slice row " << slice.row << " micro-batch "
        << slice.microbatch;
  }
  for (int64_t i = 0; i < 16; ++i) {
    for (int64_t j = 0; j < 4; ++j) {
      const auto* forward = find_slice(layout, j, i, Phase::Forward);
      const auto* backward = find_slice(layout, j, i, Phase::Backward);
      ASSERT_NE(forward, nullptr);
      ASSERT_NE(backward, nullptr);
      // Forward: fill-drain, cell (i, j) at tick i + j.
      EXPECT_DOUBLE_EQ(forward->start, static_cast<double>(i + j));
      // Backward: the same ticks in reverse, after the 19 forward ticks.
      EXPECT_DOUBLE_EQ(
          backward->start, static_cast<double>(19 + (15 - i) + (3 - j)));
    }
  }
  // No row runs two slices at once.
  for (int64_t j = 0; j < 4; ++j) {
    std::set<double> starts;
    for (const auto& slice : layout.slices) {
      if (slice.row == j) {
        EXPECT_TRUE(starts.insert(slice.start).second)
            << "row " << j << " tick " << slice.start;
      }
    }
    EXPECT_EQ(starts.size(), 32u);
  }
  // The picture's idle share is the formula's bubble.
  EXPECT_NEAR(gpipe::bubble_fraction(layout), 3.0 / 19.0, 1e-12);
}

TEST(Chart, TheoreticalScheduleOfOnePartitionHasNoBubble) {
  const auto layout = gpipe::theoretical_schedule(1, 3);
  EXPECT_EQ(layout.slices.size(), 6u);
  EXPECT_DOUBLE_EQ(gpipe::bubble_fraction(layout), 0.0);
}

TEST(Chart, TheoreticalScheduleRejectsZeroMicrobatches) {
  const auto message =
      gpipe_test::error_of([] { gpipe::theoretical_schedule(4, 0); });
  EXPECT_NE(message.find("(partitions: 4, microbatches: 0)"), std::string::npos)
      << message;
}

TEST(Chart, MeasuredScheduleStartsAtZeroInMillisecondsWithOneRowPerPartition) {
  std::vector<gpipe::TimelineEvent> events(3);
  events[0] = {0, 0, Phase::Forward, torch::kCPU, 1000, 3000};
  events[1] = {1, 0, Phase::Copy, torch::kCPU, 3000, 3500};
  events[2] = {1, 0, Phase::Forward, torch::kCPU, 3500, 5000};
  const auto layout = gpipe::measured_schedule(events);
  ASSERT_EQ(layout.row_labels.size(), 2u);
  EXPECT_EQ(layout.row_labels[1], "partition 1 (cpu)");
  EXPECT_EQ(layout.unit, "ms");
  ASSERT_EQ(layout.slices.size(), 3u);
  EXPECT_DOUBLE_EQ(layout.slices[0].start, 0.0);
  EXPECT_DOUBLE_EQ(layout.slices[0].duration, 2.0);
  EXPECT_DOUBLE_EQ(layout.slices[2].start, 2.5);
  EXPECT_DOUBLE_EQ(layout.span(), 4.0);
  // Busy 2 ms of row 0 and 1.5 ms of row 1 (copies are not work) over 2 x 4 ms.
  EXPECT_NEAR(gpipe::bubble_fraction(layout), 1.0 - 3.5 / 8.0, 1e-12);
}

TEST(Chart, SvgHasOneBoxPerSliceAndEscapesTitles) {
  auto layout = gpipe::theoretical_schedule(2, 3);
  layout.title = "a <b> & \"c\"";
  const auto svg =
      gpipe::render_svg({layout, gpipe::theoretical_schedule(4, 16)});
  EXPECT_EQ(svg.rfind("<svg", 0), 0u);
  EXPECT_NE(svg.find("a &lt;b&gt; &amp; &quot;c&quot;"), std::string::npos);
  size_t boxes = 0;
  for (size_t at = svg.find("<title>"); at != std::string::npos;
       at = svg.find("<title>", at + 1)) {
    ++boxes;
  }
  EXPECT_EQ(boxes, 2u * 2 * 3 + 2u * 4 * 16);
}

TEST(Chart, ASinglePanelSvgKeepsItsLegendInsideThePicture) {
  const auto svg = gpipe::render_svg({gpipe::theoretical_schedule(4, 8)});
  const auto number_after = [&](const std::string& key, size_t from) {
    const size_t at = svg.find(key, from);
    EXPECT_NE(at, std::string::npos) << key;
    return std::stod(svg.substr(at + key.size()));
  };
  const double width = number_after("width=\"", 0);
  const double height = number_after("height=\"", 0);
  EXPECT_NE(svg.find("number in a box: micro-batch"), std::string::npos);
  // Every left-aligned text (titles, legend) ends inside the picture, by a
  // generous estimate of its width.
  size_t texts = 0;
  for (size_t at = svg.find("<text "); at != std::string::npos;
       at = svg.find("<text ", at + 1)) {
    const size_t open_end = svg.find('>', at);
    const std::string tag = svg.substr(at, open_end - at);
    if (tag.find("text-anchor") != std::string::npos) {
      continue;
    }
    const std::string content =
        svg.substr(open_end + 1, svg.find("</text>", open_end) - open_end - 1);
    const double x = number_after("x=\"", at);
    const double y = number_after("y=\"", at);
    const double size = number_after("font-size=\"", at);
    EXPECT_LE(x + gpipe::detail::text_width(content, size), width) << content;
    EXPECT_LE(y, height) << content;
    ++texts;
  }
  EXPECT_EQ(texts, 6u); // the title, four phases and the note
}

TEST(Chart, SummaryTableAndJsonHaveOneRowPerConfiguration) {
  gpipe_example::RunResult plain;
  plain.mode = "plain";
  plain.device = "cpu";
  plain.batch = 64;
  plain.step_ms = 12.5;
  plain.peak_bytes = 3 * 1024 * 1024;
  gpipe_example::RunResult piped = plain;
  piped.mode = "always \"quoted\"";
  piped.partitions = 4;
  piped.microbatches = 16;
  piped.bubble = gpipe::bubble_fraction(4, 16);
  const auto table = gpipe_example::summarize_results({plain, piped});
  EXPECT_NE(table.find("15.8%"), std::string::npos) << table;
  EXPECT_NE(table.find("3.0"), std::string::npos) << table;
  EXPECT_EQ(std::count(table.begin(), table.end(), '\n'), 4);
  const auto json = gpipe_example::results_json({plain, piped});
  EXPECT_NE(json.find("\"mode\": \"always \\\"quoted\\\"\""), std::string::npos)
      << json;
  EXPECT_NE(json.find("\"step_ms\": 12.5,"), std::string::npos) << json;
  EXPECT_NE(json.find("\"bubble\": null"), std::string::npos) << json;
}

TEST(Chart, TheoreticalOneFOneBScheduleIsTheLockstepGridWithTheFillDrainSpan) {
  const auto layout =
      gpipe::theoretical_schedule(gpipe::Schedule::OneFOneB, 4, 8);
  EXPECT_EQ(layout.title, "1F1B schedule, theory (K=4, M=8)");
  EXPECT_EQ(layout.slices.size(), 2u * 4 * 8);
  EXPECT_DOUBLE_EQ(layout.span(), 2.0 * (8 + 4 - 1));
  // The last partition alternates from its first forward on: F0 at tick 3, B0
  // at 4, F1 at 5.
  std::vector<std::pair<gpipe::Phase, double>> last_row;
  for (const auto& slice : layout.slices) {
    if (slice.row == 3 && slice.microbatch <= 1) {
      last_row.emplace_back(slice.phase, slice.start);
    }
  }
  std::sort(last_row.begin(), last_row.end(), [](const auto& a, const auto& b) {
    return a.second < b.second;
  });
  ASSERT_EQ(last_row.size(), 4u);
  EXPECT_EQ(last_row[0], std::make_pair(gpipe::Phase::Forward, 3.0));
  EXPECT_EQ(last_row[1], std::make_pair(gpipe::Phase::Backward, 4.0));
  EXPECT_EQ(last_row[2], std::make_pair(gpipe::Phase::Forward, 5.0));
  EXPECT_EQ(last_row[3], std::make_pair(gpipe::Phase::Backward, 6.0));
}

} // namespace chart_test
