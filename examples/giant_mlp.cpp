// giant_mlp: the GPipe paper (Huang et al. 2019) told by a program.
//
// A deep stack of Linear layers is cut into K partitions and fed M
// micro-batches. The program walks through the paper step by step:
//   1. micro-batching: how the batch is split;
//   2. efficiency math: M/(M+K-1) and the bubble, for a range of M;
//   3. schedule pictures: the theoretical fill-drain schedule and the measured
//      timeline of a real training step, as SVG files side by side, plus a
//      Chrome trace (open it in https://ui.perfetto.dev);
//   4. time and memory of a training step with and without
//      re-materialization, against plain training of the whole batch and of
//      the same micro-batches;
//   5. gradient equivalence: GPipe trains exactly like the plain model;
//   6. balancing: a model with uneven layers (a wide first layer) split by
//      measured time and by memory instead of by layer count;
//   7. a summary of every configuration, as a table and as JSON.
// Run `giant_mlp --help` for the flags.
#include <gpipe/balance.h>
#include <gpipe/chart.h>
#include <gpipe/gpipe.h>
#include <gpipe/memory.h>
#include <gpipe/trace.h>

#include "flags.h"
#include "run_results.h"
#if GPIPE_EXAMPLE_DISTRIBUTED
#include "distributed_mode.h"
#endif

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif

namespace {

using gpipe::Checkpoint;
using gpipe_example::checkpoint_of;
using gpipe_example::for_each_flag;
using gpipe_example::parse_int;
using gpipe_example::usage_error;
using Clock = std::chrono::steady_clock;

struct Flags {
  int64_t layers = 60;
  std::optional<int64_t> width; // default depends on the device
  int64_t batch = 64;
  std::optional<int64_t> big_batch; // default depends on the device
  int64_t partitions = 4;
  int64_t microbatches = 8;
  std::optional<int64_t> steps; // default depends on the device
  std::optional<int64_t> warmup; // default depends on the device
  std::optional<int64_t> threads; // default: cores / lanes on the CPU
  std::string device; // default: cuda when present, else cpu
  std::string checkpoint = "except_last";
  std::string output = "giant_mlp_output";
  uint64_t seed = 0;
};

const char* const kProgram = "giant_mlp";

const char* const kUsage = R"(usage: giant_mlp [flags]

Walks through the GPipe paper on a giant MLP (a stack of Linear layers):
micro-batching, efficiency math, schedule pictures (theory and a measured
step), memory with and without re-materialization, gradient equivalence,
balancing a model with uneven layers by time and by memory, and a summary.
Pictures, the Chrome trace and the summary JSON go to --output.

flags (--name value or --name=value):
  --layers N         Linear layers in the model (default 60)
  --width N          features of every layer (default 1024 on cuda; 256 on cpu,
                     so the whole tour takes under a minute on two cores)
  --batch N          batch size of a training step (default 64)
  --big-batch N      a second, activation-dominated batch for the memory step
                     (default 8192 on cuda, 1024 on cpu; 0 skips it)
  --partitions N     K, the pipeline stages (default 4)
  --microbatches N   M, micro-batches per batch (default 8)
  --checkpoint MODE  re-materialization of the measured timeline and the
                     gradient check: never, except_last or always
                     (default except_last, the paper's choice)
  --steps N          timed steps per configuration (default 10 on cuda, 5 on
                     cpu; the median is reported)
  --warmup N         untimed steps per configuration first (default 3 on cuda,
                     2 on cpu)
  --threads N        intra-op CPU threads (default on the CPU: the free cores,
                     usable cores minus the load average, divided by the
                     pipe's lanes that run at once, so nothing oversubscribes
                     the cores; with OMP_NUM_THREADS set, or on cuda,
                     LibTorch's default); 0 keeps LibTorch's default
  --device D         cpu, cuda (partition j on GPU j mod count) or cuda:N
                     (default cuda when present, else cpu)
  --output DIR       folder for the SVGs, trace.json and results.json
                     (default giant_mlp_output)
  --seed N           seed of weights and data (default 0)
  --help             this text

giant_mlp --distributed [flags] trains the giant MLP across processes under
torchrun, one process per rank (giant_mlp --distributed --help lists its
flags; built where gpipe::distributed is).
)";

Flags parse_flags(int argc, char** argv) {
  Flags flags;
  for_each_flag(
      argc,
      argv,
      kProgram,
      kUsage,
      [&](const std::string& name, const std::string& value) {
        if (name == "layers") {
          flags.layers = parse_int(kProgram, name, value, 1);
        } else if (name == "width") {
          flags.width = parse_int(kProgram, name, value, 1);
        } else if (name == "batch") {
          flags.batch = parse_int(kProgram, name, value, 1);
        } else if (name == "big-batch") {
          flags.big_batch = parse_int(kProgram, name, value, 0);
        } else if (name == "partitions") {
          flags.partitions = parse_int(kProgram, name, value, 1);
        } else if (name == "microbatches") {
          flags.microbatches = parse_int(kProgram, name, value, 1);
        } else if (name == "steps") {
          flags.steps = parse_int(kProgram, name, value, 1);
        } else if (name == "warmup") {
          flags.warmup = parse_int(kProgram, name, value, 0);
        } else if (name == "threads") {
          flags.threads = parse_int(kProgram, name, value, 0);
        } else if (name == "seed") {
          flags.seed =
              static_cast<uint64_t>(parse_int(kProgram, name, value, 0));
        } else if (name == "device") {
          flags.device = value;
        } else if (name == "checkpoint") {
          if (value != "never" && value != "except_last" && value != "always") {
            usage_error(
                kProgram,
                "--checkpoint is never, except_last or always (got: " + value +
                    ")");
          }
          flags.checkpoint = value;
        } else if (name == "output") {
          flags.output = value;
        } else {
          usage_error(kProgram, "unknown flag (got: --" + name + ")");
        }
      });
  if (flags.partitions > flags.layers) {
    usage_error(
        kProgram,
        "--partitions cannot exceed --layers (partitions: " +
            std::to_string(flags.partitions) +
            ", layers: " + std::to_string(flags.layers) + ")");
  }
  return flags;
}

std::string percent(double fraction) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.2f%%", 100 * fraction);
  return text;
}

std::string mib(int64_t bytes) {
  char text[32];
  std::snprintf(
      text,
      sizeof(text),
      "%.1f MiB",
      static_cast<double>(bytes) / (1024.0 * 1024.0));
  return text;
}

std::string milliseconds(double ms) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.2f", ms);
  return text;
}

std::string shape_of(const torch::Tensor& t) {
  std::string text = "[";
  for (int64_t d = 0; d < t.dim(); ++d) {
    text += (d ? ", " : "") + std::to_string(t.size(d));
  }
  return text + "]";
}

void synchronize(const std::vector<torch::Device>& devices) {
  for (const auto& device : devices) {
    if (device.is_cuda()) {
      torch::cuda::synchronize(device.index());
    }
  }
}

/// The model: `layers` Linear(width, width). Weights are drawn from
/// N(0, 1/width) so the signal neither vanishes nor explodes over 60 layers.
torch::nn::Sequential make_model(int64_t layers, int64_t width, uint64_t seed) {
  torch::manual_seed(seed);
  torch::nn::Sequential model;
  for (int64_t l = 0; l < layers; ++l) {
    torch::nn::Linear linear(width, width);
    torch::NoGradGuard no_grad;
    linear->weight.normal_(0, 1.0 / std::sqrt(static_cast<double>(width)));
    linear->bias.zero_();
    model->push_back(linear);
  }
  return model;
}

/// Everything the steps share: the flags resolved, the model, its pipe.
struct Tour {
  Flags flags;
  int64_t width = 0;
  int64_t big_batch = 0;
  int64_t steps = 1;
  int64_t warmup = 1;
  std::vector<torch::Device> devices; // one per partition
  std::vector<torch::Device> unique_devices; // in partition order
  torch::nn::Sequential model{nullptr};
  std::vector<gpipe_example::RunResult> results;
  double measured_bubble = std::nan(""); // of the timeline of step 3
};

/// Parameter bytes per device of `model`.
std::map<std::string, int64_t> parameter_bytes(
    const torch::nn::Sequential& model) {
  std::map<std::string, int64_t> bytes;
  for (const auto& p : model->parameters()) {
    bytes[p.device().str()] +=
        p.numel() * static_cast<int64_t>(p.element_size());
  }
  return bytes;
}

/// Zeroes the gradients, allocating the buffers the first time: as an
/// optimizer's zero_grad does, so every measured step starts with its
/// gradient buffers already allocated, plain or piped alike.
void zero_grads(const torch::nn::Sequential& model) {
  torch::NoGradGuard no_grad;
  for (auto& p : model->parameters()) {
    if (p.grad().defined()) {
      p.mutable_grad().zero_();
    } else {
      p.mutable_grad() = torch::zeros_like(p);
    }
  }
}

/// One training step (forward, MSE loss, backward) of `forward`, gradients
/// zeroed first.
template <typename Forward>
void train_step(
    Forward& forward,
    const torch::nn::Sequential& model,
    const torch::Tensor& x,
    const torch::Tensor& y) {
  zero_grads(model);
  const auto out = forward(x);
  torch::mse_loss(out, y.to(out.device())).backward();
}

/// Plain training over the same m micro-batches a pipe makes, by hand: each
/// micro-batch's loss weighted by its share of the batch, gradients
/// accumulated. The fair baseline of a pipe: the same small matrix products,
/// without the pipe.
void train_step_microbatched(
    torch::nn::Sequential& model,
    int64_t m,
    const torch::Tensor& x,
    const torch::Tensor& y) {
  zero_grads(model);
  const auto xs = torch::tensor_split(x, m);
  const auto ys = torch::tensor_split(y, m);
  for (size_t i = 0; i < xs.size(); ++i) {
    if (xs[i].size(0) == 0) {
      continue;
    }
    const double share =
        static_cast<double>(xs[i].size(0)) / static_cast<double>(x.size(0));
    (torch::mse_loss(model->forward(xs[i]), ys[i]) * share).backward();
  }
}

/// One configuration of step 4: how to run one training step of it.
struct Candidate {
  gpipe_example::RunResult result; // mode, batch, K, M filled in beforehand
  std::string label;
  std::function<void()> step;
  std::vector<double> times; // ms, one per timed round
};

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

/// Times the candidates in interleaved rounds (each round runs every
/// candidate once, in alternating order, so a machine that slows down or
/// warms up does so for all of them) after `tour.warmup` untimed rounds, then
/// measures one more step of each under a memory meter. Every step starts
/// with its gradient buffers allocated, so the meter's rise above the start
/// is activations and temporaries, for plain training and pipes alike.
void measure(Tour& tour, std::vector<Candidate>& candidates) {
  const size_t n = candidates.size();
  for (int64_t round = 0; round < tour.warmup + tour.steps; ++round) {
    for (size_t c = 0; c < n; ++c) {
      auto& candidate = candidates[round % 2 ? n - 1 - c : c];
      synchronize(tour.unique_devices);
      const auto start = Clock::now();
      candidate.step();
      synchronize(tour.unique_devices);
      const double ms =
          std::chrono::duration<double, std::milli>(Clock::now() - start)
              .count();
      if (round >= tour.warmup) {
        candidate.times.push_back(ms);
      }
    }
  }
  for (auto& candidate : candidates) {
    synchronize(tour.unique_devices);
    gpipe::MemoryMeter meter(tour.unique_devices);
    candidate.step();
    synchronize(tour.unique_devices);
    auto& result = candidate.result;
    result.device = tour.flags.device;
    result.step_ms = median(candidate.times);
    result.bubble =
        gpipe::bubble_fraction(result.partitions, result.microbatches);
    result.peak_bytes = 0;
    result.activation_bytes = 0;
    for (const auto& device : tour.unique_devices) {
      result.peak_bytes += meter.peak_bytes(device);
      result.activation_bytes += meter.peak_increase_bytes(device);
    }
  }
}

/// The median over the timed rounds of `a`'s time over `b`'s in the same
/// round (how the benchmark compares, so noise common to a round cancels).
double median_ratio(const Candidate& a, const Candidate& b) {
  std::vector<double> ratios;
  for (size_t r = 0; r < a.times.size() && r < b.times.size(); ++r) {
    ratios.push_back(a.times[r] / b.times[r]);
  }
  return ratios.empty() ? std::nan("") : median(ratios);
}

void step_micro_batching(const Tour& tour) {
  const auto& flags = tour.flags;
  std::cout
      << "\nStep 1. Micro-batching\n"
      << "  A batch is split along its first dimension into M micro-batches; each of the\n"
      << "  K partitions (consecutive layers on one device) works on one at a time.\n";
  const auto x = torch::empty({flags.batch, tour.width});
  const auto pieces = torch::tensor_split(x, flags.microbatches);
  std::cout << "  full batch      " << shape_of(x) << "\n  micro-batches   ";
  // Group equal shapes: "6 x [11, 256], 2 x [10, 256]".
  std::vector<std::pair<std::string, int>> groups;
  for (const auto& piece : pieces) {
    if (piece.size(0) == 0) {
      continue;
    }
    const auto shape = shape_of(piece);
    if (!groups.empty() && groups.back().first == shape) {
      ++groups.back().second;
    } else {
      groups.emplace_back(shape, 1);
    }
  }
  int64_t used = 0;
  for (size_t g = 0; g < groups.size(); ++g) {
    std::cout << (g ? ", " : "") << groups[g].second << " x "
              << groups[g].first;
    used += groups[g].second;
  }
  std::cout << "  (" << used << " micro-batches";
  if (used < flags.microbatches) {
    std::cout << ", fewer than M=" << flags.microbatches
              << " because the batch is smaller";
  }
  std::cout << ")\n  partitions      ";
  const auto balance =
      gpipe::GPipe<torch::nn::Sequential>(
          tour.model,
          gpipe::GPipeOptions(flags.partitions).devices(tour.devices))
          ->options.balance();
  for (size_t j = 0; j < balance.size(); ++j) {
    std::cout << (j ? ", " : "") << balance[j] << " layers on "
              << tour.devices[j];
  }
  std::cout << "\n";
}

void step_efficiency(const Tour& tour) {
  const auto& flags = tour.flags;
  const int64_t k = flags.partitions;
  const int64_t m = flags.microbatches;
  std::cout
      << "\nStep 2. Efficiency math\n"
      << "  Forward fills the pipe and drains it: M + K - 1 clock ticks for M ticks of work per\n"
      << "  partition. Each partition idles K - 1 ticks (the bubble), forward and backward alike.\n"
      << "  K=" << k << ", M=" << m << ": efficiency M/(M+K-1) = " << m << "/"
      << (m + k - 1) << " = " << percent(gpipe::pipeline_efficiency(k, m))
      << ", bubble (K-1)/(M+K-1) = " << percent(gpipe::bubble_fraction(k, m))
      << "\n\n";
  std::cout << "      M   efficiency   bubble   (K=" << k << ")\n";
  for (const int64_t mm : {1, 2, 4, 8, 16, 32}) {
    char line[96];
    std::snprintf(
        line,
        sizeof(line),
        "  %5lld   %9s  %7s%s\n",
        static_cast<long long>(mm),
        percent(gpipe::pipeline_efficiency(k, mm)).c_str(),
        percent(gpipe::bubble_fraction(k, mm)).c_str(),
        mm >= 4 * k ? "   (M >= 4K: the paper calls the bubble negligible)"
                    : "");
    std::cout << line;
  }
}

void step_pictures(Tour& tour) {
  const auto& flags = tour.flags;
  const auto mode = checkpoint_of(flags.checkpoint);
  std::cout
      << "\nStep 3. Schedule pictures: theory and a measured training step\n";
  gpipe::GPipe<torch::nn::Sequential> pipe(
      tour.model,
      gpipe::GPipeOptions(flags.partitions)
          .microbatches(flags.microbatches)
          .checkpoint(mode)
          .devices(tour.devices));
  torch::manual_seed(flags.seed + 1);
  auto x = torch::randn({flags.batch, tour.width}).to(tour.devices.front());
  auto y = torch::randn({flags.batch, tour.width}).to(tour.devices.back());
  auto forward = [&](const torch::Tensor& input) { return pipe(input); };
  train_step(forward, tour.model, x, y); // warm-up, not recorded
  synchronize(tour.unique_devices);
  auto timeline = std::make_shared<gpipe::Timeline>();
  pipe->set_timeline(timeline);
  train_step(forward, tour.model, x, y);
  synchronize(tour.unique_devices);
  pipe->set_timeline(nullptr);
  const auto events = timeline->events();

  const auto theory =
      gpipe::theoretical_schedule(flags.partitions, flags.microbatches);
  const auto measured = gpipe::measured_schedule(
      events,
      "Measured step (" + flags.device + ", " + flags.checkpoint + ", batch " +
          std::to_string(flags.batch) + ")");
  const auto dir = flags.output + "/";
  const auto theory_path = gpipe::plot_pipeline_schedule(
      flags.partitions, flags.microbatches, flags.output);
  gpipe::write_svg({measured}, dir + "schedule_measured.svg");
  gpipe::write_svg({theory, measured}, dir + "schedule_side_by_side.svg");
  gpipe::write_chrome_trace(events, dir + "trace.json");

  int forwards = 0;
  int backwards = 0;
  int recomputes = 0;
  int copies = 0;
  for (const auto& event : events) {
    forwards += event.phase == gpipe::Phase::Forward;
    backwards += event.phase == gpipe::Phase::Backward;
    recomputes += event.phase == gpipe::Phase::Recompute;
    copies += event.phase == gpipe::Phase::Copy;
  }
  std::cout
      << "  theory     " << theory_path << "  (" << theory.slices.size()
      << " slices over " << theory.span() << " ticks)\n"
      << "  measured   " << dir << "schedule_measured.svg  (" << forwards
      << " forward, " << recomputes << " recompute, " << backwards
      << " backward, " << copies << " copy slices over " << measured.span()
      << " ms)\n"
      << "  both       " << dir << "schedule_side_by_side.svg\n"
      << "  trace      " << dir
      << "trace.json  (open in https://ui.perfetto.dev or chrome://tracing)\n";

  // The measured bubble: the idle share of the partition rows, and of the
  // devices.
  const double measured_bubble = gpipe::bubble_fraction(measured);
  gpipe::ScheduleLayout per_device = measured;
  per_device.row_labels.clear();
  for (auto& slice : per_device.slices) {
    const auto& device = tour.devices[static_cast<size_t>(slice.row)];
    slice.row =
        std::find(
            tour.unique_devices.begin(), tour.unique_devices.end(), device) -
        tour.unique_devices.begin();
  }
  for (const auto& device : tour.unique_devices) {
    per_device.row_labels.push_back(device.str());
  }
  const double device_idle = gpipe::bubble_fraction(per_device);
  std::cout << "  bubble     theory "
            << percent(
                   gpipe::bubble_fraction(flags.partitions, flags.microbatches))
            << ", measured " << percent(measured_bubble)
            << " of the partition rows idle; the " << tour.unique_devices.size()
            << " device(s) idle " << percent(device_idle) << "\n";
  if (tour.unique_devices.size() < static_cast<size_t>(flags.partitions)) {
    std::cout
        << "             " << flags.partitions << " partitions share "
        << tour.unique_devices.size()
        << " device(s), so they take turns: a partition row idles while the others\n"
        << "             run, whatever M is. The overlap the theory draws needs one device per partition.\n";
  }
  tour.measured_bubble = measured_bubble;

  // The same step through step() on every schedule: 1F1B interleaves the
  // backwards into the forwards and so keeps fewer micro-batches alive;
  // zero-bubble splits each backward into I and W and fills the drain's
  // bubble with W. The interleaved and looped schedules need several
  // partitions per lane: with one device per partition they run with one
  // chunk per lane. ZB-V and DualPipeV fold the partitions in a V: every
  // partition on one lane (the CPU default) or two per device.
  auto loss_fn = [](const torch::Tensor& out, const torch::Tensor& target) {
    return torch::mse_loss(out, target);
  };
  for (const auto schedule : gpipe::kEverySchedule) {
    if (gpipe::places_stages_in_a_v(schedule)) {
      try {
        pipe->step_program_for(std::min(flags.microbatches, flags.batch));
      } catch (const c10::Error& e) {
        std::cout << "  " << schedule
                  << ": not on these lanes: " << e.what_without_backtrace()
                  << "\n";
        continue;
      }
    }
    const std::string theory_path =
        dir + "schedule_theory_" + gpipe::to_string(schedule) + ".svg";
    gpipe::write_svg(
        {gpipe::theoretical_schedule(
            schedule, flags.partitions, flags.microbatches)},
        theory_path);
    std::cout << "  theory     " << theory_path << "\n";
    pipe->options.schedule(schedule);
    pipe->step(x, y, loss_fn); // warm-up, not recorded
    synchronize(tour.unique_devices);
    auto step_timeline = std::make_shared<gpipe::Timeline>();
    pipe->set_timeline(step_timeline);
    pipe->step(x, y, loss_fn);
    synchronize(tour.unique_devices);
    pipe->set_timeline(nullptr);
    const std::string name = gpipe::to_string(schedule);
    const auto step_events = step_timeline->events();
    gpipe::write_chrome_trace(
        step_events, dir + "trace_step_" + name + ".json");
    gpipe::write_svg(
        {gpipe::theoretical_schedule(
             schedule, flags.partitions, flags.microbatches),
         gpipe::measured_schedule(
             step_events,
             "Measured step(), " + name + " (" + flags.device + ")")},
        dir + "schedule_step_" + name + ".svg");
    std::cout << "  step()     " << dir << "schedule_step_" << name << ".svg  ("
              << name << ": theory and measured), trace_step_" << name
              << ".json\n";
  }
  pipe->options.schedule(gpipe::Schedule::FillDrain);
}

void step_memory(Tour& tour) {
  const auto& flags = tour.flags;
  const bool one_device = tour.unique_devices.size() == 1;
  const int64_t m = flags.microbatches;
  std::cout
      << "\nStep 4. Time and memory of a training step, with and without re-materialization\n"
      << "  Without checkpointing every layer keeps its input for backward: activations grow with\n"
      << "  batch x layers. With it, a partition keeps only its input per micro-batch and recomputes\n"
      << "  the rest in backward, one micro-batch at a time, at the price of one more forward.\n"
      << "  Times: the median of " << tour.steps << " steps after "
      << tour.warmup
      << " warm-up steps, the configurations interleaved step by step;\n"
      << "  ratios: the median of the per-round ratios. \"plain, M=" << m
      << "\" trains the same model on the same " << m << " micro-batches\n"
      << "  without a pipe: what a pipe costs itself, apart from the cost of smaller matrix products.\n"
      << "  Memory: every step starts with its gradient buffers allocated; activations = the peak\n"
      << "  above the step's start, counted "
      << (tour.unique_devices.front().is_cpu()
              ? "exactly, by a counting CPU allocator"
              : "by the caching allocator's peak statistics")
      << ". Parameters take "
      << mib(parameter_bytes(tour.model).begin()->second)
      << " (x2 with gradients).\n";
  std::vector<int64_t> batches = {flags.batch};
  if (tour.big_batch > 0 && tour.big_batch != flags.batch) {
    batches.push_back(tour.big_batch);
  }
  for (const auto batch : batches) {
    torch::manual_seed(flags.seed + 1);
    const auto x = torch::randn({batch, tour.width}).to(tour.devices.front());
    const auto y = torch::randn({batch, tour.width}).to(tour.devices.back());
    std::vector<Candidate> candidates;
    auto add = [&](const std::string& mode,
                   const std::string& label,
                   int64_t k,
                   int64_t microbatches,
                   std::function<void()> step) {
      Candidate candidate;
      candidate.result.mode = mode;
      candidate.result.batch = batch;
      candidate.result.partitions = k;
      candidate.result.microbatches = microbatches;
      candidate.label = label;
      candidate.step = std::move(step);
      candidates.push_back(std::move(candidate));
    };
    if (one_device) {
      add("plain", "plain, whole batch", 1, 1, [&] {
        auto forward = [&](const torch::Tensor& input) {
          return tour.model->forward(input);
        };
        train_step(forward, tour.model, x, y);
      });
      add("plain",
          "plain, M=" + std::to_string(m) + " micro-batches",
          1,
          m,
          [&] { train_step_microbatched(tour.model, m, x, y); });
    }
    std::vector<std::string> modes = {"never", "except_last", "always"};
    if (batch != flags.batch) {
      modes = {"never", "always"}; // the big batch compares the extremes only
    }
    for (const auto& mode : modes) {
      auto pipe = std::make_shared<gpipe::GPipe<torch::nn::Sequential>>(
          tour.model,
          gpipe::GPipeOptions(flags.partitions)
              .microbatches(m)
              .checkpoint(checkpoint_of(mode))
              .devices(tour.devices));
      add(mode, "gpipe " + mode, flags.partitions, m, [&tour, pipe, x, y] {
        auto forward = [&](const torch::Tensor& input) {
          return (*pipe)(input);
        };
        train_step(forward, tour.model, x, y);
      });
    }
    std::cout << "\n  batch " << batch << ": " << candidates.size()
              << " configurations x " << tour.warmup + tour.steps
              << " steps ... " << std::flush;
    const auto started = Clock::now();
    measure(tour, candidates);
    std::cout
        << "done in "
        << milliseconds(
               std::chrono::duration<double>(Clock::now() - started).count())
        << " s\n";

    char line[192];
    std::snprintf(
        line,
        sizeof(line),
        "  %-26s %9s %10s %15s %10s %12s\n",
        "configuration",
        "step ms",
        "vs plain",
        one_device ? ("vs plain M=" + std::to_string(m)).c_str() : "",
        "peak MiB",
        "activ. MiB");
    std::cout << line;
    const auto ratio_text = [](double ratio) {
      char text[32];
      std::snprintf(text, sizeof(text), "%.2fx", ratio);
      return std::isfinite(ratio) ? std::string(text) : std::string("-");
    };
    for (const auto& candidate : candidates) {
      const auto& r = candidate.result;
      std::string versus_plain = "-";
      std::string versus_microbatched = "-";
      if (one_device) {
        versus_plain = ratio_text(median_ratio(candidate, candidates[0]));
        versus_microbatched =
            ratio_text(median_ratio(candidate, candidates[1]));
      }
      std::snprintf(
          line,
          sizeof(line),
          "  %-26s %9.2f %10s %15s %10.1f %12.1f\n",
          candidate.label.c_str(),
          r.step_ms,
          versus_plain.c_str(),
          versus_microbatched.c_str(),
          static_cast<double>(r.peak_bytes) / (1024.0 * 1024.0),
          static_cast<double>(r.activation_bytes) / (1024.0 * 1024.0));
      std::cout << line;
    }
    const Candidate* never = nullptr;
    const Candidate* always = nullptr;
    for (auto& candidate : candidates) {
      if (candidate.result.mode == flags.checkpoint &&
          candidate.result.partitions > 1 && batch == flags.batch) {
        candidate.result.measured_bubble = tour.measured_bubble;
      }
      never = candidate.result.mode == "never" ? &candidate : never;
      always = candidate.result.mode == "always" ? &candidate : always;
      tour.results.push_back(candidate.result);
    }
    const auto& nr = never->result;
    const auto& ar = always->result;
    std::cout << "  never -> always: activations " << mib(nr.activation_bytes)
              << " -> " << mib(ar.activation_bytes) << " ("
              << ratio_text(
                     ar.activation_bytes > 0
                         ? static_cast<double>(nr.activation_bytes) /
                             static_cast<double>(ar.activation_bytes)
                         : std::nan(""))
              << " less), peak " << mib(nr.peak_bytes) << " -> "
              << mib(ar.peak_bytes) << "; step time "
              << ratio_text(median_ratio(*always, *never))
              << " of never's (one more forward: about 4/3 in theory)\n";
  }
  if (!one_device) {
    std::cout
        << "  (plain training is measured only when every partition shares one device)\n";
  }
}

void step_gradients(Tour& tour) {
  const auto& flags = tour.flags;
  std::cout
      << "\nStep 5. Gradient equivalence: GPipe against plain training of the same weights\n";
  auto plain =
      std::dynamic_pointer_cast<torch::nn::SequentialImpl>(tour.model->clone());
  plain->to(tour.devices.front());
  torch::manual_seed(flags.seed + 2);
  const auto x = torch::randn({flags.batch, tour.width});
  const auto y = torch::randn({flags.batch, tour.width});
  for (auto& p : plain->parameters()) {
    p.mutable_grad().reset();
  }
  const auto out_plain = plain->forward(x.to(tour.devices.front()));
  torch::mse_loss(out_plain, y.to(out_plain.device())).backward();
  const auto plain_parameters = plain->parameters();
  double largest_grad = 0;
  for (const auto& p : plain_parameters) {
    largest_grad = std::max(largest_grad, p.grad().abs().max().item<double>());
  }
  const double tolerance = 1e-4 * std::max(largest_grad, 1e-30);
  bool all_pass = true;
  for (const auto mode :
       {Checkpoint::Never, Checkpoint::ExceptLast, Checkpoint::Always}) {
    gpipe::GPipe<torch::nn::Sequential> pipe(
        tour.model,
        gpipe::GPipeOptions(flags.partitions)
            .microbatches(flags.microbatches)
            .checkpoint(mode)
            .devices(tour.devices));
    auto forward = [&](const torch::Tensor& input) { return pipe(input); };
    train_step(forward, tour.model, x.to(tour.devices.front()), y);
    const auto pipe_parameters = tour.model->parameters();
    double difference = 0;
    for (size_t k = 0; k < pipe_parameters.size(); ++k) {
      difference = std::max(
          difference,
          (pipe_parameters[k].grad().to(torch::kCPU) -
           plain_parameters[k].grad().to(torch::kCPU))
              .abs()
              .max()
              .item<double>());
    }
    const bool pass = difference <= tolerance;
    all_pass &= pass;
    char line[160];
    std::snprintf(
        line,
        sizeof(line),
        "  %-12s largest |grad difference| %.3e   (largest |grad| %.3e, tolerance %.1e)  %s\n",
        gpipe::to_string(mode),
        difference,
        largest_grad,
        tolerance,
        pass ? "PASS" : "FAIL");
    std::cout << line;
  }
  std::cout
      << "  "
      << (all_pass
              ? "GPipe's gradients equal plain training's, up to float summation order."
              : "GRADIENTS DIFFER: please report this.")
      << "\n";
  if (!all_pass) {
    throw std::runtime_error("gradient equivalence failed");
  }
}

/// The model with uneven layers: a wide first layer (8x the width out) and
/// its way back, then Linear(width, width) up to `layers` in all.
torch::nn::Sequential make_uneven_model(
    int64_t layers,
    int64_t width,
    uint64_t seed) {
  torch::manual_seed(seed);
  torch::nn::Sequential model;
  model->push_back(torch::nn::Linear(width, 8 * width));
  model->push_back(torch::nn::Linear(8 * width, width));
  for (int64_t l = 2; l < layers; ++l) {
    model->push_back(torch::nn::Linear(width, width));
  }
  return model;
}

std::string two_places(double value) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.2f", value);
  return text;
}

/// Decimal megabytes, as the balance reports print them.
std::string megabytes(double bytes) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.2f MB", bytes / 1e6);
  return text;
}

/// "[15, 15, 15, 15]"
std::string balance_text(const std::vector<int64_t>& balance) {
  std::string text = "[";
  for (size_t j = 0; j < balance.size(); ++j) {
    text += (j ? ", " : "") + std::to_string(balance[j]);
  }
  return text + "]";
}

/// Prints a report indented under the step.
void print_indented(const gpipe::BalanceReport& report) {
  std::ostringstream text;
  text << report;
  std::istringstream lines(text.str());
  for (std::string line; std::getline(lines, line);) {
    std::cout << "    " << line << "\n";
  }
}

void step_balance(const Tour& tour) {
  const auto& flags = tour.flags;
  const int64_t layers = std::max<int64_t>(flags.layers, 2);
  const int64_t k = flags.partitions;
  const int64_t m = flags.microbatches;
  const auto device = tour.devices.front();
  auto model = make_uneven_model(layers, tour.width, flags.seed);
  model->to(device);
  // One micro-batch of a --batch step: what every partition sees per cell.
  const int64_t rows = std::max<int64_t>(1, flags.batch / m);
  torch::manual_seed(flags.seed + 3);
  const auto sample = torch::randn({rows, tour.width}, device);
  std::cout << "\nStep 6. Balancing a model with uneven layers\n"
            << "  model: Linear(" << tour.width << ", " << 8 * tour.width
            << "), Linear(" << 8 * tour.width << ", " << tour.width << ")";
  if (layers > 2) {
    std::cout << ", " << layers - 2 << " x Linear(" << tour.width << ", "
              << tour.width << ")";
  }
  std::cout << "; each layer profiled on one micro-batch (" << rows
            << " rows) on " << device << "\n";

  // The split GPipe makes without a balance: by layer count.
  std::vector<int64_t> even_split(static_cast<size_t>(k), layers / k);
  for (int64_t j = 0; j < layers % k; ++j) {
    ++even_split[static_cast<size_t>(j)];
  }

  // By time: forward + backward of each layer, then the exact split.
  const auto times = gpipe::profile_times(model, sample);
  const auto by_time = gpipe::balance_cost(times, k);
  const auto even_report = gpipe::balance_report(times, even_split);
  const auto time_report = gpipe::balance_report(times, by_time);
  const double even_step =
      gpipe::predicted_step_time(even_report.partition_costs, m);
  const double balanced_step =
      gpipe::predicted_step_time(time_report.partition_costs, m);
  std::cout << "  by time (forward + backward per layer, median of 5 runs):\n"
            << "    even split      " << balance_text(even_split)
            << ": slowest partition "
            << milliseconds(even_report.max_cost() * 1e3)
            << " ms, imbalance (max/mean) "
            << two_places(even_report.imbalance()) << ", predicted step "
            << milliseconds(even_step * 1e3) << " ms\n"
            << "    balance_by_time " << balance_text(by_time)
            << ": slowest partition "
            << milliseconds(time_report.max_cost() * 1e3)
            << " ms, imbalance (max/mean) "
            << two_places(time_report.imbalance()) << ", predicted step "
            << milliseconds(balanced_step * 1e3) << " ms ("
            << percent(1 - balanced_step / even_step) << " less)\n";
  print_indented(time_report);

  // By memory: what each partition will keep with --checkpoint, M
  // micro-batches and Adam (two optimizer states per gradient).
  const auto checkpoint = checkpoint_of(flags.checkpoint);
  const auto options = gpipe::MemoryOptions().optimizer_factor(2);
  const auto memory = gpipe::profile_memory(model, sample);
  const auto by_memory =
      gpipe::balance_by_memory(model, sample, k, checkpoint, m, options);
  const auto even_bytes =
      gpipe::partition_memory(memory, even_split, checkpoint, m, options);
  const auto memory_report =
      gpipe::balance_report(memory, by_memory, checkpoint, m, options);
  std::cout << "  by memory (checkpoint " << checkpoint << ", M=" << m
            << ", Adam: optimizer factor 2):\n"
            << "    even split        " << balance_text(even_split)
            << ": fullest partition "
            << megabytes(static_cast<double>(
                   *std::max_element(even_bytes.begin(), even_bytes.end())))
            << "\n"
            << "    balance_by_memory " << balance_text(by_memory)
            << ": fullest partition " << megabytes(memory_report.max_cost())
            << "\n";
  print_indented(memory_report);
  std::cout
      << "  (predictions assume a device per partition and no recompute: fill-drain ticks, each as long\n"
      << "   as its slowest partition; pass the balance on with GPipeOptions(K).balance(...))\n";
}

void step_summary(const Tour& tour) {
  std::cout << "\nStep 7. Summary of every configuration run\n"
            << "  (measured bubble: from the timeline of step 3)\n\n";
  std::string table = gpipe_example::summarize_results(tour.results);
  size_t at = 0;
  while (at < table.size()) {
    const auto end = table.find('\n', at);
    std::cout << "  " << table.substr(at, end - at) << "\n";
    at = end + 1;
  }
  const auto path = tour.flags.output + "/results.json";
  std::ofstream file(path);
  file << gpipe_example::results_json(tour.results);
  TORCH_CHECK(
      file.good(), "giant_mlp: cannot write the summary (path: ", path, ")");
  std::cout << "\n  wrote " << path << "\n";
}

/// The CPUs this process may run on.
int usable_cores() {
#if defined(__linux__)
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    return std::max(1, CPU_COUNT(&set));
  }
#endif
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

/// The cores nobody else is using: the usable cores minus the machine's
/// 1-minute load average (rounded), at least one. Where the load cannot be
/// read, every usable core.
int free_cores(int cores, double* load) {
  *load = std::nan("");
#if defined(__linux__) || defined(__APPLE__)
  double loads[1] = {0};
  if (getloadavg(loads, 1) == 1) {
    *load = loads[0];
    return std::max(1, cores - static_cast<int>(std::lround(loads[0])));
  }
#endif
  return cores;
}

/// Sets LibTorch's intra-op threads (the threads one matrix product is split
/// over) and says how they were chosen. Lanes of a pipe run at once, each
/// with its own intra-op threads: together, and with whatever else the
/// machine runs, they must not ask for more threads than there are cores.
/// Otherwise the threads take turns on a core, every parallel operation
/// waits for the one that is descheduled, and the waiting threads spin
/// (OpenMP's default), taking the core from those that would work: on a
/// busy 2-core machine the tour then takes minutes instead of seconds (see
/// docs/performance.md, "Threads on the CPU"). This example puts every CPU
/// partition on one lane (as GPipe does unless `concurrent_cpu_partitions` is
/// on), so on the CPU one lane runs at a time and gets every free core; on GPUs
/// the CPU only launches work.
std::string set_threads(const Tour& tour) {
  const int libtorch_default = torch::get_num_threads();
  const int cores = usable_cores();
  double load = 0;
  const int free = free_cores(cores, &load);
  int cpu_lanes = 0;
  for (const auto& device : tour.unique_devices) {
    cpu_lanes += device.is_cpu() ? 1 : 0;
  }
  const char* omp = std::getenv("OMP_NUM_THREADS");
  std::string why;
  if (tour.flags.threads && *tour.flags.threads > 0) {
    torch::set_num_threads(static_cast<int>(*tour.flags.threads));
    why = "from --threads";
  } else if (tour.flags.threads) {
    why = "LibTorch's default, kept by --threads 0";
  } else if (omp != nullptr && *omp != '\0') {
    why =
        std::string("LibTorch's default, which follows OMP_NUM_THREADS=") + omp;
  } else if (cpu_lanes == 0) {
    why = "LibTorch's default: on GPUs the CPU only launches work";
  } else {
    torch::set_num_threads(std::max(1, free / cpu_lanes));
    char load_text[32];
    std::snprintf(load_text, sizeof(load_text), "%.1f", load);
    why = "chosen: " +
        (std::isfinite(load) ? std::to_string(free) + " free of " +
                 std::to_string(cores) + " usable core(s) at load " + load_text
                             : std::to_string(cores) + " usable core(s)") +
        " / " + std::to_string(cpu_lanes) + " CPU lane(s) running at once";
  }
  return "threads: intra-op " + std::to_string(torch::get_num_threads()) +
      " (" + why + "; LibTorch's default here " +
      std::to_string(libtorch_default) + "), inter-op " +
      std::to_string(torch::get_num_interop_threads()) + ", OMP_NUM_THREADS " +
      (omp != nullptr ? omp : "unset");
}

} // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::string(argv[1]) == "--distributed") {
#if GPIPE_EXAMPLE_DISTRIBUTED
    return gpipe_example::distributed_mode::main(argc - 1, argv + 1);
#else
    usage_error(
        kProgram,
        "--distributed needs gpipe::distributed, which this build lacks "
        "(Gloo's headers: libgloo-dev)");
#endif
  }
  // Count CPU memory from the first allocation on, parameters included.
  gpipe::track_cpu_memory();
  const auto started = Clock::now();
  Tour tour;
  tour.flags = parse_flags(argc, argv);
  auto& flags = tour.flags;
  try {
    if (flags.device.empty()) {
      flags.device = torch::cuda::is_available() ? "cuda" : "cpu";
    }
    const bool on_cpu = flags.device == "cpu";
    if (!on_cpu && !torch::cuda::is_available()) {
      usage_error(
          kProgram, "no CUDA device is present (device: " + flags.device + ")");
    }
    tour.width = flags.width.value_or(on_cpu ? 256 : 1024);
    tour.big_batch = flags.big_batch.value_or(on_cpu ? 1024 : 8192);
    tour.steps = flags.steps.value_or(on_cpu ? 5 : 10);
    tour.warmup = flags.warmup.value_or(on_cpu ? 2 : 3);
    for (int64_t j = 0; j < flags.partitions; ++j) {
      if (flags.device == "cuda") {
        tour.devices.emplace_back(
            torch::kCUDA,
            static_cast<c10::DeviceIndex>(j % torch::cuda::device_count()));
      } else {
        tour.devices.emplace_back(flags.device);
      }
      if (std::find(
              tour.unique_devices.begin(),
              tour.unique_devices.end(),
              tour.devices.back()) == tour.unique_devices.end()) {
        tour.unique_devices.push_back(tour.devices.back());
      }
    }
    std::filesystem::create_directories(flags.output);

    std::cout << "GPipe on a giant MLP: " << flags.layers << " x Linear("
              << tour.width << ", " << tour.width << "), batch " << flags.batch
              << ", K=" << flags.partitions
              << " partitions, M=" << flags.microbatches
              << " micro-batches, on " << flags.device << "\n"
              << set_threads(tour) << "\n";
    if (on_cpu && !flags.width) {
      std::cout
          << "(on the CPU the default width is 256 so the tour takes under a minute; --width 1024 is the\n"
          << " paper-sized layer)\n";
    }
    tour.model = make_model(flags.layers, tour.width, flags.seed);
    tour.model->to(tour.devices.front());

    step_micro_batching(tour);
    step_efficiency(tour);
    step_pictures(tour);
    step_memory(tour);
    step_gradients(tour);
    step_balance(tour);
    step_summary(tour);
  } catch (const c10::Error& e) {
    std::cerr << "giant_mlp: " << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "giant_mlp: " << e.what() << "\n";
    return 1;
  }
  std::cout << "\nDone in "
            << std::chrono::duration<double>(Clock::now() - started).count()
            << " s.\n";
  return 0;
}
