// A pipe's timeline as Chrome trace JSON, the format Perfetto
// (ui.perfetto.dev) and chrome://tracing open.
//
// Why this format: it is the one every trace viewer reads, it needs no
// library to write, and its "complete" events ("ph": "X", a start and a
// duration) map one to one onto our slices. Each device becomes a process
// (pid) and each partition a thread (tid) under it, so a viewer shows one row
// per partition grouped by device; a slice is named like the paper's figure
// ("F3" forward of micro-batch 3, "B3" backward, "R3" recompute, "copy 3") and
// carries its partition, micro-batch and phase as args. Times are
// microseconds, as the format wants. The JSON is built by hand with proper
// string escaping, so the library stays free of JSON dependencies.
#pragma once

#include <gpipe/timeline.h>

#include <c10/util/Exception.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <locale>
#include <sstream>
#include <string>
#include <vector>

namespace gpipe {
namespace detail {

/// `text` as a JSON string literal, quotes included.
inline std::string json_string(const std::string& text) {
  std::string out;
  out.reserve(text.size() + 2);
  out.push_back('"');
  for (const char c : text) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char escaped[8];
          std::snprintf(
              escaped, sizeof(escaped), "\\u%04x", static_cast<unsigned>(c));
          out += escaped;
        } else {
          out.push_back(c);
        }
    }
  }
  out.push_back('"');
  return out;
}

/// `value` as a JSON number (locale independent); null when not finite.
inline std::string json_number(double value, int precision = 6) {
  if (!std::isfinite(value)) {
    return "null";
  }
  std::ostringstream stream;
  stream.imbue(std::locale::classic());
  stream.precision(precision);
  stream << std::fixed << value;
  std::string text = stream.str();
  // Trim trailing zeros of the fraction ("12.500000" -> "12.5", "3.000" ->
  // "3").
  if (text.find('.') != std::string::npos) {
    while (!text.empty() && text.back() == '0') {
      text.pop_back();
    }
    if (!text.empty() && text.back() == '.') {
      text.pop_back();
    }
  }
  if (text == "-0") {
    text = "0";
  }
  return text;
}

/// Writes `text` to `path`; `what` names the file in errors ("trace").
inline void write_text_file(
    const std::string& path,
    const std::string& text,
    const char* what) {
  std::ofstream file(path, std::ios::binary);
  TORCH_CHECK(
      file.good(),
      "gpipe: cannot open the ",
      what,
      " file for writing (path: ",
      path,
      ")");
  file << text;
  TORCH_CHECK(
      file.good(),
      "gpipe: cannot write the ",
      what,
      " file (path: ",
      path,
      ")");
}

/// Devices in a fixed order (CPU first, then by type and index): pid k + 1.
inline std::vector<torch::Device> devices_of(
    const std::vector<TimelineEvent>& events) {
  std::vector<torch::Device> devices;
  for (const auto& event : events) {
    if (std::find(devices.begin(), devices.end(), event.device) ==
        devices.end()) {
      devices.push_back(event.device);
    }
  }
  std::sort(
      devices.begin(),
      devices.end(),
      [](const torch::Device& a, const torch::Device& b) {
        if (a.type() != b.type()) {
          return static_cast<int>(a.type()) < static_cast<int>(b.type());
        }
        return a.index() < b.index();
      });
  return devices;
}

} // namespace detail

/// The short name of a slice, as in the paper's figure: "F3", "B3", "R3",
/// "copy 3" for micro-batch 3.
inline std::string slice_name(Phase phase, int64_t microbatch) {
  switch (phase) {
    case Phase::Forward:
      return "F" + std::to_string(microbatch);
    case Phase::Backward:
      return "B" + std::to_string(microbatch);
    case Phase::Recompute:
      return "R" + std::to_string(microbatch);
    case Phase::Copy:
      return "copy " + std::to_string(microbatch);
    case Phase::BackwardInput:
      return "I" + std::to_string(microbatch);
    case Phase::BackwardWeight:
      return "W" + std::to_string(microbatch);
  }
  return "?" + std::to_string(microbatch);
}

/// `events` (a Timeline's `events()`) as Chrome trace JSON: one complete
/// event per slice, pid per device, tid per partition, named by process and
/// thread metadata ("cuda:0", "partition 2").
inline std::string chrome_trace_json(const std::vector<TimelineEvent>& events) {
  const auto devices = detail::devices_of(events);
  auto pid_of = [&](const torch::Device& device) {
    return static_cast<int64_t>(
               std::find(devices.begin(), devices.end(), device) -
               devices.begin()) +
        1;
  };

  std::string json = "{\"displayTimeUnit\":\"ms\",\"traceEvents\":[";
  bool first = true;
  auto append = [&](const std::string& event) {
    json += first ? "\n" : ",\n";
    json += event;
    first = false;
  };

  for (size_t d = 0; d < devices.size(); ++d) {
    const auto pid = std::to_string(d + 1);
    append(
        "{\"ph\":\"M\",\"name\":\"process_name\",\"pid\":" + pid +
        ",\"tid\":0,\"args\":{\"name\":" +
        detail::json_string(devices[d].str()) + "}}");
    append(
        "{\"ph\":\"M\",\"name\":\"process_sort_index\",\"pid\":" + pid +
        ",\"tid\":0,\"args\":{\"sort_index\":" + pid + "}}");
  }
  // One thread name per (device, partition) that appears.
  std::vector<std::pair<int64_t, int64_t>> threads;
  for (const auto& event : events) {
    const std::pair<int64_t, int64_t> thread{
        pid_of(event.device), event.partition};
    if (std::find(threads.begin(), threads.end(), thread) == threads.end()) {
      threads.push_back(thread);
    }
  }
  std::sort(threads.begin(), threads.end());
  for (const auto& thread : threads) {
    const auto pid = std::to_string(thread.first);
    const auto tid = std::to_string(thread.second);
    append(
        "{\"ph\":\"M\",\"name\":\"thread_name\",\"pid\":" + pid + ",\"tid\":" +
        tid + ",\"args\":{\"name\":" + detail::json_string("partition " + tid) +
        "}}");
    append(
        "{\"ph\":\"M\",\"name\":\"thread_sort_index\",\"pid\":" + pid +
        ",\"tid\":" + tid + ",\"args\":{\"sort_index\":" + tid + "}}");
  }

  for (const auto& event : events) {
    const double duration = std::max(0.0, event.end_us - event.start_us);
    append(
        "{\"ph\":\"X\",\"name\":" +
        detail::json_string(slice_name(event.phase, event.microbatch)) +
        ",\"cat\":" + detail::json_string(to_string(event.phase)) +
        ",\"pid\":" + std::to_string(pid_of(event.device)) +
        ",\"tid\":" + std::to_string(event.partition) +
        ",\"ts\":" + detail::json_number(event.start_us, 3) +
        ",\"dur\":" + detail::json_number(duration, 3) +
        ",\"args\":{\"partition\":" + std::to_string(event.partition) +
        ",\"microbatch\":" + std::to_string(event.microbatch) +
        ",\"phase\":" + detail::json_string(to_string(event.phase)) +
        ",\"device\":" + detail::json_string(event.device.str()) + "}}");
  }
  json += "\n]}\n";
  return json;
}

/// Writes `chrome_trace_json(events)` to `path`.
inline void write_chrome_trace(
    const std::vector<TimelineEvent>& events,
    const std::string& path) {
  detail::write_text_file(path, chrome_trace_json(events), "trace");
}

} // namespace gpipe
