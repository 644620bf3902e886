// What the benchmarks measure a training step with: its wall time, waiting
// for the device before and after, and the memory it allocates above what
// was live at its start; and how they read their flags. Kept with the
// benchmarks (it is not part of the library), so that every benchmark times and
// measures alike and their numbers compare.
#pragma once

#include <gpipe/memory.h>

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <string>
#include <vector>

namespace gpipe_bench {

/// Prints "<program>: <message> (see --help)" and exits 2.
[[noreturn]] inline void flag_error(
    const std::string& program,
    const std::string& message) {
  std::cerr << program << ": " << message << " (see --help)\n";
  std::exit(2);
}

/// Calls `on_flag(name, value)` for each "--name value" in argv, in order,
/// and for each "--name" alone when `name` is one of `switches` (value
/// empty). "--help" prints `usage` and exits 0; a flag without its value or
/// an argument that is no flag exits 2 naming it (unknown names are
/// `on_flag`'s to refuse, with flag_error).
inline void for_each_flag(
    int argc,
    char** argv,
    const std::string& program,
    const std::string& usage,
    const std::vector<std::string>& switches,
    const std::function<
        void(const std::string& name, const std::string& value)>& on_flag) {
  for (int a = 1; a < argc; ++a) {
    const std::string arg = argv[a];
    if (arg == "--help" || arg == "-h") {
      std::cout << usage;
      std::exit(0);
    }
    if (arg.rfind("--", 0) != 0) {
      flag_error(program, "unexpected argument " + arg);
    }
    const std::string name = arg.substr(2);
    if (std::find(switches.begin(), switches.end(), name) != switches.end()) {
      on_flag(name, "");
      continue;
    }
    if (a + 1 >= argc) {
      flag_error(program, arg + " needs a value");
    }
    on_flag(name, argv[++a]);
  }
}

/// A training step to time: zero_grad keeps the gradient buffers, so a
/// step's peak above its start is activations and temporaries alone.
using Step = std::function<void()>;

/// The median of `values` (the mean of the middle two for an even count).
inline double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

/// Waits for the work queued on `device`; nothing to wait for on the CPU.
inline void synchronize(const torch::Device& device) {
  if (device.is_cuda()) {
    torch::cuda::synchronize(device.index());
  }
}

/// The wall time of one `step` on `device`, in milliseconds.
inline double time_ms(const Step& step, const torch::Device& device) {
  synchronize(device);
  const auto start = std::chrono::steady_clock::now();
  step();
  synchronize(device);
  return std::chrono::duration<double, std::milli>(
             std::chrono::steady_clock::now() - start)
      .count();
}

/// The times of two steps measured in pairs, one entry a pair.
struct PairedTimes {
  std::vector<double> first_ms;
  std::vector<double> second_ms;
};

/// Runs `first` and `second` `warmup` times each untimed, then times them in
/// `repeats` pairs on `device`, alternating who goes first (`first` in even
/// pairs) so neither always runs on a warmer cache. Whatever the machine
/// does to both steps of a pair cancels in their ratio (`median_ratio`).
inline PairedTimes time_pairs(
    const Step& first,
    const Step& second,
    const torch::Device& device,
    int warmup,
    int repeats) {
  for (int w = 0; w < warmup; ++w) {
    first();
    second();
  }
  PairedTimes times;
  for (int r = 0; r < repeats; ++r) {
    double a = 0, b = 0;
    if (r % 2 == 0) {
      a = time_ms(first, device);
      b = time_ms(second, device);
    } else {
      b = time_ms(second, device);
      a = time_ms(first, device);
    }
    times.first_ms.push_back(a);
    times.second_ms.push_back(b);
  }
  return times;
}

/// The median over pairs of `numerators[r] / denominators[r]`.
inline double median_ratio(
    const std::vector<double>& numerators,
    const std::vector<double>& denominators) {
  std::vector<double> ratios;
  for (size_t r = 0; r < numerators.size() && r < denominators.size(); ++r) {
    ratios.push_back(numerators[r] / denominators[r]);
  }
  return median(ratios);
}

/// The memory one step allocated on a device.
struct MemoryUse {
  /// The peak above what was live at the step's start.
  int64_t activation_bytes = 0;
  /// The absolute peak.
  int64_t peak_bytes = 0;
};

/// Runs `step` once under a `gpipe::MemoryMeter` on `device`: exact on the
/// CPU through the counting allocator (call `gpipe::track_cpu_memory()` first
/// thing in main), from the caching allocator's peaks on CUDA.
inline MemoryUse measure_memory(const Step& step, const torch::Device& device) {
  synchronize(device);
  gpipe::MemoryMeter meter({device});
  step();
  synchronize(device);
  return {meter.peak_increase_bytes(device), meter.peak_bytes(device)};
}

} // namespace gpipe_bench
