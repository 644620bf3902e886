// Pictures and tables of a pipeline: the schedule GPipe promises, the one a
// pipe actually ran, and a summary of measured configurations.
//
// Why these live in the library: the first thing a reader of a pipeline wants
// is to see it, the paper's Gantt chart of forward fill-drain and backward in
// reverse, and the second is to hold a real run against it. Both are drawn
// from one kind of data, a layout (rows of slices with a start and a
// duration), so the theoretical schedule (in clock ticks) and a measured
// Timeline (in milliseconds) render the same way and are tested as data,
// not pixels. The SVG and the JSON are plain string building: no plotting or
// JSON library.
//
// Letters as in schedule.h: m micro-batches, n partitions, i a micro-batch,
// j a partition (the paper's M and K, which the pictures' titles and file
// names print). Note the argument order: the functions here take the
// partitions first, (n, m), as `GPipeOptions(n).microbatches(m)` reads,
// where schedule.h's `clock_cycles(m, n)` and `schedule_actions(s, m, n)`
// take the micro-batches first.
#pragma once

#include <gpipe/program.h>
#include <gpipe/schedule.h>
#include <gpipe/schedules.h>
#include <gpipe/simulate.h>
#include <gpipe/timeline.h>
#include <gpipe/trace.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace gpipe {

/// One box of a schedule chart: `row` (a partition) did `phase` for
/// `microbatch` from `start` for `duration` (in the layout's unit).
struct ScheduleSlice {
  /// The row the box is drawn in: partition j, or whatever the layout's rows
  /// are (`row_labels[row]` names it).
  int64_t row = 0;
  /// The micro-batch i, printed inside the box.
  int64_t microbatch = 0;
  /// What the row was doing; picks the box's colour.
  Phase phase = Phase::Forward;
  /// Where the box starts, in the layout's `unit`.
  double start = 0;
  /// How long the box is, in the layout's `unit`.
  double duration = 0;
};

/// What a schedule chart draws: labelled rows and their slices. Made by
/// `theoretical_schedule` or `measured_schedule`, or by hand; drawn by
/// `render_svg` / `write_svg`.
struct ScheduleLayout {
  /// Printed above the chart.
  std::string title;
  /// The unit of start and duration, for the axis ("tick", "ms").
  std::string unit;
  /// One label per row, top to bottom; the number of rows.
  std::vector<std::string> row_labels;
  /// The boxes, in any order.
  std::vector<ScheduleSlice> slices;

  /// The end of the last slice (0 for no slices), in `unit`.
  double span() const {
    double end = 0;
    for (const auto& slice : slices) {
      end = std::max(end, slice.start + slice.duration);
    }
    return end;
  }
};

namespace detail {

inline void check_pipe_shape(int64_t n, int64_t m, const char* what) {
  TORCH_CHECK(
      n >= 1 && m >= 1,
      "gpipe: ",
      what,
      " needs at least one partition and one micro-batch (partitions: ",
      n,
      ", microbatches: ",
      m,
      ")");
}

} // namespace detail

/// The paper's efficiency of a pipe of n partitions fed m micro-batches,
/// m / (m + n - 1): the share of the fill-drain schedule's ticks in which a
/// partition works. Arguments: partitions first. n = 4, m = 16 gives 0.842.
/// Throws a c10::Error unless n >= 1 and m >= 1.
inline double pipeline_efficiency(int64_t n, int64_t m) {
  detail::check_pipe_shape(n, m, "efficiency");
  return static_cast<double>(m) / static_cast<double>(m + n - 1);
}

/// The bubble: the share of the fill-drain schedule a partition sits idle,
/// (n - 1) / (m + n - 1) for n partitions and m micro-batches (partitions
/// first), i.e. 1 - `pipeline_efficiency(n, m)`. n = 4, m = 16 gives 0.158.
/// Throws a c10::Error unless n >= 1 and m >= 1.
inline double bubble_fraction(int64_t n, int64_t m) {
  return 1.0 - pipeline_efficiency(n, m);
}

/// The chart of `program` as `simulate` times it with `costs`: one row per
/// lane, one box per compute action (F, B, I, W), in the unit "tick".
inline ScheduleLayout program_schedule(
    const Program& program,
    const Costs& costs,
    const std::string& title) {
  const Simulation simulation = simulate(program, costs);
  ScheduleLayout layout;
  layout.title = title;
  layout.unit = "tick";
  for (size_t lane = 0; lane < simulation.lanes.size(); ++lane) {
    layout.row_labels.push_back(
        (program.lanes.size() == static_cast<size_t>(program.stages)
             ? "partition "
             : "lane ") +
        std::to_string(lane));
    for (const auto& timed : simulation.lanes[lane]) {
      Phase phase = Phase::Forward;
      switch (timed.action.op) {
        case Op::F:
          phase = Phase::Forward;
          break;
        case Op::B:
          phase = Phase::Backward;
          break;
        case Op::I:
          phase = Phase::BackwardInput;
          break;
        case Op::W:
          phase = Phase::BackwardWeight;
          break;
        default:
          continue; // communication takes no time here
      }
      layout.slices.push_back(
          {static_cast<int64_t>(lane),
           timed.action.microbatch,
           phase,
           timed.start,
           timed.end - timed.start});
    }
  }
  return layout;
}

/// The chart of `schedule` for n partitions and m micro-batches (partitions
/// first), one partition per row and every action one tick. Fill-drain puts
/// forward (i, j) at tick i + j, then backward in reverse, (i, j) at tick
/// (m + n - 1) + (m - 1 - i) + (n - 1 - j); 1F1B interleaves them. Both:
/// 2·n·m slices over 2·(m + n - 1) ticks; zero-bubble splits each backward
/// into I and W. The title reads like "GPipe schedule, theory (K=4, M=8)",
/// in the paper's letters. Throws a c10::Error unless n >= 1 and m >= 1.
inline ScheduleLayout theoretical_schedule(
    Schedule schedule,
    int64_t n,
    int64_t m) {
  detail::check_pipe_shape(n, m, "a schedule");
  // The schedules over several stages per lane draw two per lane when K is
  // even (a lane per row; a V for ZB-V and DualPipeV, which need it); the
  // others one partition per row.
  const int64_t per_lane = stages_per_lane(schedule);
  const int64_t lane_count = n % per_lane == 0 ? n / per_lane : n;
  const std::vector<int64_t> lanes =
      schedule_placement(schedule, n, lane_count);
  const char* name = "GPipe";
  switch (schedule) {
    case Schedule::FillDrain:
      break;
    case Schedule::OneFOneB:
      name = "1F1B";
      break;
    case Schedule::Interleaved1F1B:
      name = "Interleaved 1F1B";
      break;
    case Schedule::ZeroBubbleH1:
      name = "ZB-H1";
      break;
    case Schedule::LoopedBFS:
      name = "Looped BFS";
      break;
    case Schedule::InterleavedZeroBubble:
      name = "Interleaved zero bubble";
      break;
    case Schedule::ZeroBubbleV:
      name = "ZB-V";
      break;
    case Schedule::DualPipeV:
      name = "DualPipeV";
      break;
    case Schedule::Auto:
      name = "Auto"; // build_program refuses it: it is searched
      break;
  }
  return program_schedule(
      build_program(schedule, n, m, lanes),
      Costs{1.0, 1.0, 1.0, 1.0},
      std::string(name) + " schedule, theory (K=" + std::to_string(n) +
          (lane_count < n ? " on " + std::to_string(lane_count) + " lanes"
                          : std::string()) +
          ", M=" + std::to_string(m) + ")");
}

/// The chart of GPipe's fill-drain schedule for n partitions and m
/// micro-batches (partitions first): forward i on partition j at tick i + j,
/// backward the same staircase in reverse. The same as
/// `theoretical_schedule(Schedule::FillDrain, n, m)`.
inline ScheduleLayout theoretical_schedule(int64_t n, int64_t m) {
  return theoretical_schedule(Schedule::FillDrain, n, m);
}

/// A Timeline's slices (`timeline->events()`) as a layout, to draw a real
/// step the same way as the theory: one row per partition (labelled with its
/// device), every slice (forward, backward, recompute, copy) a box, times in
/// milliseconds from the first slice's start. No events give a layout with
/// no rows.
inline ScheduleLayout measured_schedule(
    const std::vector<TimelineEvent>& events,
    const std::string& title = "GPipe schedule, measured") {
  ScheduleLayout layout;
  layout.title = title;
  layout.unit = "ms";
  if (events.empty()) {
    return layout;
  }
  double origin = std::numeric_limits<double>::infinity();
  int64_t rows = 0;
  for (const auto& event : events) {
    origin = std::min(origin, event.start_us);
    rows = std::max(rows, event.partition + 1);
  }
  std::vector<std::string> device_of_row(static_cast<size_t>(rows));
  for (const auto& event : events) {
    auto& device = device_of_row[static_cast<size_t>(event.partition)];
    if (device.empty() && event.phase != Phase::Copy) {
      device = event.device.str();
    }
    layout.slices.push_back(
        {event.partition,
         event.microbatch,
         event.phase,
         (event.start_us - origin) / 1000.0,
         std::max(0.0, event.end_us - event.start_us) / 1000.0});
  }
  for (int64_t j = 0; j < rows; ++j) {
    const auto& device = device_of_row[static_cast<size_t>(j)];
    layout.row_labels.push_back(
        "partition " + std::to_string(j) +
        (device.empty() ? "" : " (" + device + ")"));
  }
  return layout;
}

/// The idle share of a layout: 1 - (busy time of all rows) / (rows · span),
/// where a row's busy time is the union of its compute slices (copies do not
/// count, overlapping slices count once). For `theoretical_schedule(n, m)`
/// it is `bubble_fraction(n, m)`; for a `measured_schedule` it is the
/// measured bubble. 0 for an empty layout.
inline double bubble_fraction(const ScheduleLayout& layout) {
  const double span = layout.span();
  const auto rows = layout.row_labels.size();
  if (span <= 0 || rows == 0) {
    return 0;
  }
  double busy = 0;
  for (size_t row = 0; row < rows; ++row) {
    std::vector<std::pair<double, double>> intervals;
    for (const auto& slice : layout.slices) {
      if (static_cast<size_t>(slice.row) == row && slice.phase != Phase::Copy) {
        intervals.emplace_back(slice.start, slice.start + slice.duration);
      }
    }
    std::sort(intervals.begin(), intervals.end());
    double covered_to = -std::numeric_limits<double>::infinity();
    for (const auto& interval : intervals) {
      const double from = std::max(interval.first, covered_to);
      if (interval.second > from) {
        busy += interval.second - from;
      }
      covered_to = std::max(covered_to, interval.second);
    }
  }
  return std::max(0.0, 1.0 - busy / (span * static_cast<double>(rows)));
}

namespace detail {

inline const char* phase_color(Phase phase) {
  switch (phase) {
    case Phase::Forward:
      return "#4c78a8";
    case Phase::Backward:
      return "#f58518";
    case Phase::Recompute:
      return "#b279a2";
    case Phase::Copy:
      return "#9d9d9d";
    case Phase::BackwardInput:
      return "#e45756";
    case Phase::BackwardWeight:
      return "#54a24b";
  }
  return "#000000";
}

/// `text` escaped for SVG/XML character data and attribute values.
inline std::string xml_escape(const std::string& text) {
  std::string out;
  for (const char c : text) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      case '\'':
        out += "&apos;";
        break;
      default:
        out.push_back(c);
    }
  }
  return out;
}

inline std::string svg_number(double value) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.1f", value);
  return text;
}

/// A generous estimate of the width of `text` in pixels at `font_size` in
/// a sans-serif font (0.6 em per character; Helvetica averages about 0.5),
/// so that a layout that fits this estimate fits the real text.
inline double text_width(const std::string& text, double font_size) {
  return 0.6 * font_size * static_cast<double>(text.size());
}

/// A "nice" axis step (1, 2 or 5 times a power of ten) for about 6 ticks.
inline double axis_step(double span) {
  if (span <= 0) {
    return 1;
  }
  const double raw = span / 6.0;
  const double power = std::pow(10.0, std::floor(std::log10(raw)));
  for (const double factor : {1.0, 2.0, 5.0, 10.0}) {
    if (factor * power >= raw) {
      return factor * power;
    }
  }
  return 10 * power;
}

constexpr double kLabelWidth = 150;
constexpr double kPlotWidth = 560;
constexpr double kRowHeight = 26;
constexpr double kTitleHeight = 34;
constexpr double kAxisHeight = 34;
constexpr double kPanelGap = 30;

/// Draws one panel with its top-left corner at (x, y).
inline std::string svg_panel(const ScheduleLayout& layout, double x, double y) {
  std::string svg;
  const double span = layout.span() > 0 ? layout.span() : 1;
  const double rows = static_cast<double>(layout.row_labels.size());
  const double plot_x = x + kLabelWidth;
  const double plot_y = y + kTitleHeight;
  auto x_of = [&](double t) { return plot_x + t / span * kPlotWidth; };

  svg += "<text x=\"" + svg_number(x + 4) + "\" y=\"" + svg_number(y + 20) +
      "\" font-size=\"15\" font-weight=\"bold\">" + xml_escape(layout.title) +
      "</text>\n";
  for (size_t row = 0; row < layout.row_labels.size(); ++row) {
    const double row_y = plot_y + static_cast<double>(row) * kRowHeight;
    svg += "<rect x=\"" + svg_number(plot_x) + "\" y=\"" + svg_number(row_y) +
        "\" width=\"" + svg_number(kPlotWidth) + "\" height=\"" +
        svg_number(kRowHeight) + "\" fill=\"" +
        (row % 2 ? "#ffffff" : "#f4f4f4") + "\"/>\n";
    svg += "<text x=\"" + svg_number(plot_x - 6) + "\" y=\"" +
        svg_number(row_y + kRowHeight / 2 + 4) +
        "\" font-size=\"12\" text-anchor=\"end\">" +
        xml_escape(layout.row_labels[row]) + "</text>\n";
  }
  for (const auto& slice : layout.slices) {
    const double left = x_of(slice.start);
    const double width =
        std::max(0.5, x_of(slice.start + slice.duration) - left);
    const double top = plot_y + static_cast<double>(slice.row) * kRowHeight + 2;
    svg += "<rect x=\"" + svg_number(left) + "\" y=\"" + svg_number(top) +
        "\" width=\"" + svg_number(width) + "\" height=\"" +
        svg_number(kRowHeight - 4) + "\" fill=\"" + phase_color(slice.phase) +
        "\" stroke=\"#ffffff\" stroke-width=\"0.5\"><title>" +
        xml_escape(
               slice_name(slice.phase, slice.microbatch) + " on row " +
               std::to_string(slice.row)) +
        "</title></rect>\n";
    const std::string label = std::to_string(slice.microbatch);
    if (width >= 7.0 * static_cast<double>(label.size()) + 2) {
      svg += "<text x=\"" + svg_number(left + width / 2) + "\" y=\"" +
          svg_number(top + kRowHeight / 2 + 2) +
          "\" font-size=\"10\" fill=\"#ffffff\" text-anchor=\"middle\">" +
          label + "</text>\n";
    }
  }
  const double axis_y = plot_y + rows * kRowHeight;
  svg += "<line x1=\"" + svg_number(plot_x) + "\" y1=\"" + svg_number(axis_y) +
      "\" x2=\"" + svg_number(plot_x + kPlotWidth) + "\" y2=\"" +
      svg_number(axis_y) + "\" stroke=\"#333333\"/>\n";
  const double step = axis_step(span);
  for (double t = 0; t <= span * (1 + 1e-9); t += step) {
    char value[32];
    std::snprintf(value, sizeof(value), step < 1 ? "%.2f" : "%.0f", t);
    svg += "<line x1=\"" + svg_number(x_of(t)) + "\" y1=\"" +
        svg_number(axis_y) + "\" x2=\"" + svg_number(x_of(t)) + "\" y2=\"" +
        svg_number(axis_y + 4) + "\" stroke=\"#333333\"/>\n";
    svg += "<text x=\"" + svg_number(x_of(t)) + "\" y=\"" +
        svg_number(axis_y + 16) +
        "\" font-size=\"10\" text-anchor=\"middle\">" + value + "</text>\n";
  }
  svg += "<text x=\"" + svg_number(plot_x + kPlotWidth) + "\" y=\"" +
      svg_number(axis_y + 30) +
      "\" font-size=\"11\" text-anchor=\"end\">time (" +
      xml_escape(layout.unit) + ")</text>\n";
  return svg;
}

} // namespace detail

/// Draws `panels` side by side as one SVG document (returned as text), each
/// with its title, row labels and time axis, and below them a legend of the
/// phases' colours. Boxes carry a tooltip with their name ("F3 on row 1").
/// Throws a c10::Error for no panels.
inline std::string render_svg(const std::vector<ScheduleLayout>& panels) {
  TORCH_CHECK(
      !panels.empty(),
      "gpipe: render_svg needs at least one layout (panels: 0)");
  size_t rows = 1;
  for (const auto& panel : panels) {
    rows = std::max(rows, panel.row_labels.size());
  }
  const double panel_width = detail::kLabelWidth + detail::kPlotWidth;
  double width =
      static_cast<double>(panels.size()) * (panel_width + detail::kPanelGap) +
      10;
  const double legend_y = detail::kTitleHeight +
      static_cast<double>(rows) * detail::kRowHeight + detail::kAxisHeight + 14;
  // The legend: four phases in a row, then the note; the note takes a line
  // of its own when the row would run past the picture's right edge (one
  // panel is too narrow for both).
  constexpr double kLegendItemWidth = 110;
  constexpr double kLegendLine = 22;
  const char* const note = "number in a box: micro-batch";
  // The four phases of every pipe, and I and W where a panel has them.
  std::vector<Phase> legend = {
      Phase::Forward, Phase::Backward, Phase::Recompute, Phase::Copy};
  for (const auto phase : {Phase::BackwardInput, Phase::BackwardWeight}) {
    for (const auto& panel : panels) {
      if (std::any_of(
              panel.slices.begin(), panel.slices.end(), [&](const auto& s) {
                return s.phase == phase;
              })) {
        legend.push_back(phase);
        break;
      }
    }
  }
  const double legend_left = 10 + detail::kLabelWidth;
  double note_x =
      legend_left + static_cast<double>(legend.size()) * kLegendItemWidth + 10;
  double note_y = legend_y;
  if (note_x + detail::text_width(note, 12) > width - 10) {
    note_x = legend_left;
    note_y = legend_y + kLegendLine;
  }
  const double legend_right =
      legend_left + static_cast<double>(legend.size()) * kLegendItemWidth;
  if (legend_right > width - 10) {
    width = legend_right + 10;
  }
  const double height = note_y + 30;
  std::string svg = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" +
      detail::svg_number(width) + "\" height=\"" + detail::svg_number(height) +
      "\" viewBox=\"0 0 " + detail::svg_number(width) + " " +
      detail::svg_number(height) +
      "\" font-family=\"Helvetica, Arial, sans-serif\">\n";
  svg += "<rect width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>\n";
  for (size_t p = 0; p < panels.size(); ++p) {
    svg += detail::svg_panel(
        panels[p],
        10 + static_cast<double>(p) * (panel_width + detail::kPanelGap),
        4);
  }
  double legend_x = legend_left;
  for (const auto phase : legend) {
    svg += "<rect x=\"" + detail::svg_number(legend_x) + "\" y=\"" +
        detail::svg_number(legend_y) + "\" width=\"14\" height=\"14\" fill=\"" +
        detail::phase_color(phase) + "\"/>\n";
    svg += "<text x=\"" + detail::svg_number(legend_x + 20) + "\" y=\"" +
        detail::svg_number(legend_y + 12) + "\" font-size=\"12\">" +
        to_string(phase) + "</text>\n";
    legend_x += kLegendItemWidth;
  }
  svg += "<text x=\"" + detail::svg_number(note_x) + "\" y=\"" +
      detail::svg_number(note_y + 12) +
      "\" font-size=\"12\" fill=\"#555555\">" + note + "</text>\n";
  svg += "</svg>\n";
  return svg;
}

/// Writes `render_svg(panels)` to the file `path` (replacing it); throws a
/// c10::Error naming the path when it cannot be written.
inline void write_svg(
    const std::vector<ScheduleLayout>& panels,
    const std::string& path) {
  detail::write_text_file(path, render_svg(panels), "SVG");
}

/// Draws the theoretical fill-drain schedule of n partitions and m
/// micro-batches (partitions first) into
/// `output_dir`/pipeline_schedule_K<n>_M<m>.svg (the paper's letters) and
/// returns that path. The folder must exist; throws a c10::Error when the
/// file cannot be written.
inline std::string plot_pipeline_schedule(
    int64_t n,
    int64_t m,
    const std::string& output_dir) {
  const std::string path = output_dir + "/pipeline_schedule_K" +
      std::to_string(n) + "_M" + std::to_string(m) + ".svg";
  write_svg({theoretical_schedule(n, m)}, path);
  return path;
}

} // namespace gpipe
