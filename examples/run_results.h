// What the giant-MLP example reports: one row per measured configuration,
// as an aligned table for people and as JSON for machines. Kept with the
// example (it is not part of the library): its columns are the example's.
#pragma once

#include <gpipe/trace.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

namespace gpipe_example {

namespace detail {
using gpipe::detail::json_number;
using gpipe::detail::json_string;
} // namespace detail

/// One measured configuration, a row of `summarize_results` and an object of
/// `results_json`. Fill in what you measured; NaN numbers print as "-"
/// (null in JSON).
struct RunResult {
  /// "plain", or the pipe's checkpoint mode ("never", "except_last", ...).
  std::string mode;
  /// Where it ran ("cpu", "cuda").
  std::string device;
  /// Rows per step.
  int64_t batch = 0;
  /// n, the partitions (1 for plain training).
  int64_t partitions = 1;
  /// m, the micro-batches per step (1 for plain training of the whole batch).
  int64_t microbatches = 1;
  /// Median wall time of a training step (forward, loss, backward).
  double step_ms = std::numeric_limits<double>::quiet_NaN();
  /// Absolute peak bytes allocated during a step, summed over the devices
  /// (`MemoryMeter::peak_bytes`).
  int64_t peak_bytes = 0;
  /// The rise above the step's start (`MemoryMeter::peak_increase_bytes`),
  /// summed over the devices: with gradient buffers allocated before the
  /// step, its activations and temporaries.
  int64_t activation_bytes = 0;
  /// The theoretical bubble (n - 1)/(m + n - 1), `gpipe::bubble_fraction(n,
  /// m)`.
  double bubble = std::numeric_limits<double>::quiet_NaN();
  /// The bubble of a measured timeline, NaN where none was recorded.
  double measured_bubble = std::numeric_limits<double>::quiet_NaN();
};

namespace detail {

inline std::string format_cell(const char* format, double value) {
  if (!std::isfinite(value)) {
    return "-";
  }
  char text[64];
  std::snprintf(text, sizeof(text), format, value);
  return text;
}

inline double megabytes(int64_t bytes) {
  return static_cast<double>(bytes) / (1024.0 * 1024.0);
}

} // namespace detail

/// `results` as an aligned text table with a header line, one row per
/// configuration: mode, device, batch, K (partitions), M (micro-batches),
/// step ms, peak MiB, activ. MiB, bubble and measured bubble (percent).
inline std::string summarize_results(const std::vector<RunResult>& results) {
  const std::vector<std::string> header = {
      "mode",
      "device",
      "batch",
      "K",
      "M",
      "step ms",
      "peak MiB",
      "activ. MiB",
      "bubble",
      "measured bubble"};
  std::vector<std::vector<std::string>> table = {header};
  for (const auto& r : results) {
    table.push_back(
        {r.mode,
         r.device,
         std::to_string(r.batch),
         std::to_string(r.partitions),
         std::to_string(r.microbatches),
         detail::format_cell("%.2f", r.step_ms),
         detail::format_cell("%.1f", detail::megabytes(r.peak_bytes)),
         detail::format_cell("%.1f", detail::megabytes(r.activation_bytes)),
         detail::format_cell("%.1f%%", 100 * r.bubble),
         detail::format_cell("%.1f%%", 100 * r.measured_bubble)});
  }
  std::vector<size_t> widths(header.size(), 0);
  for (const auto& row : table) {
    for (size_t c = 0; c < row.size(); ++c) {
      widths[c] = std::max(widths[c], row[c].size());
    }
  }
  std::string text;
  for (size_t r = 0; r < table.size(); ++r) {
    for (size_t c = 0; c < table[r].size(); ++c) {
      const auto& cell = table[r][c];
      const std::string pad(widths[c] - cell.size(), ' ');
      // Text columns align left, numbers right.
      text += (c < 2 ? cell + pad : pad + cell) +
          (c + 1 < table[r].size() ? "  " : "");
    }
    text += "\n";
    if (r == 0) {
      size_t total = 0;
      for (const auto w : widths) {
        total += w + 2;
      }
      text += std::string(total - 2, '-') + "\n";
    }
  }
  return text;
}

/// `results` as a JSON array of objects, for machines: one object per
/// configuration with the fields of `RunResult` under their own names
/// (sizes in bytes, times in ms, bubbles as fractions; NaN as null).
inline std::string results_json(const std::vector<RunResult>& results) {
  std::string json = "[";
  for (size_t k = 0; k < results.size(); ++k) {
    const auto& r = results[k];
    json += std::string(k ? "," : "") +
        "\n  {\"mode\": " + detail::json_string(r.mode) +
        ", \"device\": " + detail::json_string(r.device) +
        ", \"batch\": " + std::to_string(r.batch) +
        ", \"partitions\": " + std::to_string(r.partitions) +
        ", \"microbatches\": " + std::to_string(r.microbatches) +
        ", \"step_ms\": " + detail::json_number(r.step_ms, 4) +
        ", \"peak_bytes\": " + std::to_string(r.peak_bytes) +
        ", \"activation_bytes\": " + std::to_string(r.activation_bytes) +
        ", \"bubble\": " + detail::json_number(r.bubble, 6) +
        ", \"measured_bubble\": " + detail::json_number(r.measured_bubble, 6) +
        "}";
  }
  json += results.empty() ? "]\n" : "\n]\n";
  return json;
}

} // namespace gpipe_example
