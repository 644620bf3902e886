// giant_mlp: the GPipe paper (Huang et al. 2019) told by a program.
//
// A deep stack of Linear layers is cut into K partitions and fed M
// micro-batches. The program walks through the paper step by step:
//   1. micro-batching: how the batch is split;
//   2. efficiency math: M/(M+K-1) and the bubble, for a range of M;
//   3. schedule pictures: the theoretical fill-drain schedule and the measured
//      timeline of a real training step, as SVG files side by side, plus a
//      Chrome trace (open it in https://ui.perfetto.dev);
//   4. memory: the peak of a training step with and without re-materialization;
//   5. gradient equivalence: GPipe trains exactly like the plain model;
//   6. balancing: a model with uneven layers (a wide first layer) split by
//      measured time and by memory instead of by layer count;
//   7. a summary of every configuration, as a table and as JSON.
// Run `giant_mlp --help` for the flags.
#include <gpipe/balance.h>
#include <gpipe/gpipe.h>

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
#include <vector>

namespace {

using gpipe::Checkpoint;
using Clock = std::chrono::steady_clock;

struct Flags {
  int64_t layers = 60;
  std::optional<int64_t> width; // default depends on the device
  int64_t batch = 64;
  std::optional<int64_t> big_batch; // default depends on the device
  int64_t partitions = 4;
  int64_t microbatches = 8;
  std::optional<int64_t> steps; // default depends on the device
  std::string device; // default: cuda when present, else cpu
  std::string checkpoint = "except_last";
  std::string output = "giant_mlp_output";
  uint64_t seed = 0;
};

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
  --steps N          timed steps per configuration, after one warm-up
                     (default 3 on cuda, 1 on cpu; the median is reported)
  --device D         cpu, cuda (partition j on GPU j mod count) or cuda:N
                     (default cuda when present, else cpu)
  --output DIR       folder for the SVGs, trace.json and results.json
                     (default giant_mlp_output)
  --seed N           seed of weights and data (default 0)
  --help             this text
)";

[[noreturn]] void usage_error(const std::string& message) {
  std::cerr << "giant_mlp: " << message << "\n\n" << kUsage;
  std::exit(2);
}

int64_t parse_int(
    const std::string& name,
    const std::string& text,
    int64_t minimum) {
  size_t used = 0;
  int64_t value = 0;
  try {
    value = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != text.size() || text.empty()) {
    usage_error("--" + name + " needs a whole number (got: " + text + ")");
  }
  if (value < minimum) {
    usage_error(
        "--" + name + " must be at least " + std::to_string(minimum) +
        " (got: " + text + ")");
  }
  return value;
}

Flags parse_flags(int argc, char** argv) {
  Flags flags;
  for (int k = 1; k < argc; ++k) {
    std::string arg = argv[k];
    if (arg == "--help" || arg == "-h") {
      std::cout << kUsage;
      std::exit(0);
    }
    if (arg.rfind("--", 0) != 0) {
      usage_error("unexpected argument (got: " + arg + ")");
    }
    std::string name = arg.substr(2);
    std::string value;
    const auto equals = name.find('=');
    if (equals != std::string::npos) {
      value = name.substr(equals + 1);
      name = name.substr(0, equals);
    } else {
      if (k + 1 >= argc) {
        usage_error("--" + name + " needs a value");
      }
      value = argv[++k];
    }
    if (name == "layers") {
      flags.layers = parse_int(name, value, 1);
    } else if (name == "width") {
      flags.width = parse_int(name, value, 1);
    } else if (name == "batch") {
      flags.batch = parse_int(name, value, 1);
    } else if (name == "big-batch") {
      flags.big_batch = parse_int(name, value, 0);
    } else if (name == "partitions") {
      flags.partitions = parse_int(name, value, 1);
    } else if (name == "microbatches") {
      flags.microbatches = parse_int(name, value, 1);
    } else if (name == "steps") {
      flags.steps = parse_int(name, value, 1);
    } else if (name == "seed") {
      flags.seed = static_cast<uint64_t>(parse_int(name, value, 0));
    } else if (name == "device") {
      flags.device = value;
    } else if (name == "checkpoint") {
      if (value != "never" && value != "except_last" && value != "always") {
        usage_error(
            "--checkpoint is never, except_last or always (got: " + value +
            ")");
      }
      flags.checkpoint = value;
    } else if (name == "output") {
      flags.output = value;
    } else {
      usage_error("unknown flag (got: --" + name + ")");
    }
  }
  if (flags.partitions > flags.layers) {
    usage_error(
        "--partitions cannot exceed --layers (partitions: " +
        std::to_string(flags.partitions) +
        ", layers: " + std::to_string(flags.layers) + ")");
  }
  return flags;
}

Checkpoint checkpoint_of(const std::string& name) {
  if (name == "never") {
    return Checkpoint::Never;
  }
  if (name == "always") {
    return Checkpoint::Always;
  }
  return Checkpoint::ExceptLast;
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
  std::vector<torch::Device> devices; // one per partition
  std::vector<torch::Device> unique_devices; // in partition order
  torch::nn::Sequential model{nullptr};
  std::vector<gpipe::RunResult> results;
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

/// One training step (forward, MSE loss, backward) of `forward` on fresh
/// gradients, so the gradients are allocated inside the step.
template <typename Forward>
void train_step(
    Forward& forward,
    const torch::nn::Sequential& model,
    const torch::Tensor& x,
    const torch::Tensor& y) {
  for (auto& p : model->parameters()) {
    p.mutable_grad().reset();
  }
  const auto out = forward(x);
  torch::mse_loss(out, y.to(out.device())).backward();
}

/// Measures one configuration: a warm-up step, then `steps` timed steps
/// under a memory meter.
gpipe::RunResult measure(
    Tour& tour,
    const std::string& mode,
    int64_t batch,
    const std::string& label,
    int index,
    int count) {
  const auto& flags = tour.flags;
  const bool plain = mode == "plain";
  const int64_t k = plain ? 1 : flags.partitions;
  const int64_t m = plain ? 1 : flags.microbatches;
  std::cout << "  [" << index << "/" << count << "] " << label << " ... "
            << std::flush;

  std::function<torch::Tensor(const torch::Tensor&)> forward;
  std::shared_ptr<gpipe::GPipe<torch::nn::Sequential>> pipe;
  if (plain) {
    forward = [&](const torch::Tensor& x) { return tour.model->forward(x); };
  } else {
    pipe = std::make_shared<gpipe::GPipe<torch::nn::Sequential>>(
        tour.model,
        gpipe::GPipeOptions(k)
            .microbatches(m)
            .checkpoint(checkpoint_of(mode))
            .devices(tour.devices));
    forward = [pipe](const torch::Tensor& x) { return (*pipe)(x); };
  }
  torch::manual_seed(tour.flags.seed + 1);
  auto x = torch::randn({batch, tour.width}).to(tour.devices.front());
  auto y = torch::randn({batch, tour.width}).to(tour.devices.back());

  train_step(forward, tour.model, x, y); // warm-up
  synchronize(tour.unique_devices);
  for (auto& p : tour.model->parameters()) {
    p.mutable_grad().reset(); // the measured step allocates its own gradients
  }
  gpipe::MemoryMeter meter(tour.unique_devices);
  std::vector<double> times;
  for (int64_t s = 0; s < tour.steps; ++s) {
    const auto start = Clock::now();
    train_step(forward, tour.model, x, y);
    synchronize(tour.unique_devices);
    times.push_back(
        std::chrono::duration<double, std::milli>(Clock::now() - start)
            .count());
  }
  std::sort(times.begin(), times.end());

  gpipe::RunResult result;
  result.mode = mode;
  result.device = flags.device;
  result.batch = batch;
  result.partitions = k;
  result.microbatches = m;
  result.step_ms = times[times.size() / 2];
  result.bubble = gpipe::bubble_fraction(k, m);
  const auto params = parameter_bytes(tour.model);
  for (const auto& device : tour.unique_devices) {
    const int64_t peak = meter.peak_bytes(device);
    const auto found = params.find(device.str());
    const int64_t weights = found == params.end() ? 0 : found->second;
    result.peak_bytes += peak;
    result.activation_bytes +=
        std::max<int64_t>(0, peak - 2 * weights); // parameters and gradients
  }
  std::cout << milliseconds(result.step_ms) << " ms/step, peak "
            << mib(result.peak_bytes) << " (activations "
            << mib(result.activation_bytes) << ")\n";
  return result;
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

  // The same step through step() on both schedules: 1F1B interleaves the
  // backwards into the forwards and so keeps fewer micro-batches alive.
  auto loss_fn = [](const torch::Tensor& out, const torch::Tensor& target) {
    return torch::mse_loss(out, target);
  };
  for (const auto schedule :
       {gpipe::Schedule::FillDrain, gpipe::Schedule::OneFOneB}) {
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
  std::cout
      << "\nStep 4. Memory of a training step, with and without re-materialization\n"
      << "  Without checkpointing every layer keeps its input for backward: activations grow with\n"
      << "  batch x layers. With it, a partition keeps only its input per micro-batch and recomputes\n"
      << "  the rest in backward, one micro-batch at a time. Activations = peak - parameters - gradients.\n"
      << "  Memory is counted "
      << (tour.unique_devices.front().is_cpu()
              ? "exactly, by a counting CPU allocator"
              : "by the caching allocator's peak statistics")
      << "; parameters take "
      << mib(parameter_bytes(tour.model).begin()->second)
      << " (x2 with gradients).\n";
  std::vector<int64_t> batches = {flags.batch};
  if (tour.big_batch > 0 && tour.big_batch != flags.batch) {
    batches.push_back(tour.big_batch);
  }
  std::vector<std::string> modes = {"never", "except_last", "always"};
  if (one_device) {
    modes.insert(modes.begin(), "plain");
  }
  const int count =
      static_cast<int>(batches.size() * modes.size() - (batches.size() - 1));
  int index = 0;
  for (const auto batch : batches) {
    std::map<std::string, gpipe::RunResult> by_mode;
    for (const auto& mode : modes) {
      if (batch != flags.batch && mode == "except_last") {
        continue; // the big batch compares the extremes only
      }
      const std::string label =
          (mode == "plain" ? std::string("plain model") : "gpipe " + mode) +
          ", batch " + std::to_string(batch);
      by_mode[mode] = measure(tour, mode, batch, label, ++index, count);
      if (mode == flags.checkpoint && batch == flags.batch) {
        by_mode[mode].measured_bubble = tour.measured_bubble;
      }
      tour.results.push_back(by_mode[mode]);
    }
    const auto& never = by_mode["never"];
    const auto& always = by_mode["always"];
    const auto ratio = [](int64_t a, int64_t b) {
      char text[32];
      std::snprintf(
          text,
          sizeof(text),
          "%.2fx",
          b > 0 ? static_cast<double>(a) / static_cast<double>(b) : 0.0);
      return std::string(text);
    };
    std::cout << "  batch " << batch << ": never -> always reduces the peak "
              << mib(never.peak_bytes) << " -> " << mib(always.peak_bytes)
              << " (" << ratio(never.peak_bytes, always.peak_bytes)
              << "), activations " << mib(never.activation_bytes) << " -> "
              << mib(always.activation_bytes) << " ("
              << ratio(never.activation_bytes, always.activation_bytes)
              << "); step time "
              << ratio(
                     static_cast<int64_t>(always.step_ms * 1000),
                     static_cast<int64_t>(never.step_ms * 1000))
              << " of never\n";
  }
  if (!one_device) {
    std::cout
        << "  (the plain model is measured only when every partition shares one device)\n";
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
  std::string table = gpipe::summarize_results(tour.results);
  size_t at = 0;
  while (at < table.size()) {
    const auto end = table.find('\n', at);
    std::cout << "  " << table.substr(at, end - at) << "\n";
    at = end + 1;
  }
  const auto path = tour.flags.output + "/results.json";
  std::ofstream file(path);
  file << gpipe::results_json(tour.results);
  TORCH_CHECK(
      file.good(), "giant_mlp: cannot write the summary (path: ", path, ")");
  std::cout << "\n  wrote " << path << "\n";
}

} // namespace

int main(int argc, char** argv) {
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
      usage_error("no CUDA device is present (device: " + flags.device + ")");
    }
    tour.width = flags.width.value_or(on_cpu ? 256 : 1024);
    tour.big_batch = flags.big_batch.value_or(on_cpu ? 1024 : 8192);
    tour.steps = flags.steps.value_or(on_cpu ? 1 : 3);
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
              << " micro-batches, on " << flags.device << "\n";
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
