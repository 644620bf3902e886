// gpipe against plain LibTorch, side by side in one run.
//
// Every configuration trains the same Sequential twice: plainly, and through
// a pipe over a copy with the same weights. Runs are interleaved (plain,
// gpipe, plain, gpipe, ...) after warm-up, and each pair gives one ratio, so
// whatever the machine is doing to both cancels out; the table reports the
// median time of each and the median of the per-pair ratios. Activation
// memory is measured per configuration as the peak above what was live
// before the step (parameters and gradients are allocated beforehand), exact
// on the CPU through the counting allocator and from the caching
// allocator's peaks on CUDA.
//
//   pipeline_benchmark [--device cpu|cuda|all] [--repeats 15] [--warmup 3]
//                      [--output benchmark.json] [--quick]
#include <gpipe/gpipe.h>
#include <gpipe/memory.h>

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <iostream>
#include <string>
#include <vector>

namespace {

struct Flags {
  std::string device = "all";
  int repeats = 15;
  int warmup = 3;
  std::string output = "benchmark.json";
  bool quick = false;
};

/// One row of the table.
struct Config {
  std::string name;
  torch::Device device = torch::kCPU;
  std::function<torch::nn::Sequential()> model;
  int64_t width = 0;
  int64_t batch = 0;
  int64_t partitions = 4;
  int64_t microbatches = 1;
  gpipe::Checkpoint checkpoint = gpipe::Checkpoint::Never;
  /// Train through `step` on this schedule instead of forward + backward.
  bool use_step = false;
  gpipe::Schedule schedule = gpipe::Schedule::FillDrain;
  /// Compare with this pipe configuration instead of plain training.
  bool against_fill_drain = false;
  /// Compare with plain training that loops over the same micro-batches,
  /// to separate the cost of small micro-batches from gpipe's own.
  bool against_plain_microbatched = false;
  double time_target = 0; // ratio; 0: none
  double memory_target = 0; // ratio; 0: none
  double total_peak_target_mb = 0; // absolute; 0: none
};

struct Result {
  Config config;
  double baseline_ms = 0;
  double gpipe_ms = 0;
  double time_ratio = 0;
  double baseline_activation_mb = 0;
  double gpipe_activation_mb = 0;
  double gpipe_total_peak_mb = 0;
  double memory_ratio = 0;
};

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

void synchronize(const torch::Device& device) {
  if (device.is_cuda()) {
    torch::cuda::synchronize(device.index());
  }
}

torch::nn::Sequential linear_tanh(int64_t layers, int64_t width) {
  torch::nn::Sequential seq;
  for (int64_t l = 0; l < layers; ++l) {
    seq->push_back(torch::nn::Linear(width, width));
    seq->push_back(torch::nn::Tanh());
  }
  return seq;
}

torch::nn::Sequential linears(int64_t layers, int64_t width) {
  torch::nn::Sequential seq;
  for (int64_t l = 0; l < layers; ++l) {
    seq->push_back(torch::nn::Linear(width, width));
  }
  return seq;
}

/// A training step to time: zero_grad keeps the gradient buffers, so a
/// step's peak above its start is activations and temporaries alone.
using Step = std::function<void()>;

Step plain_step(torch::nn::Sequential model, torch::Tensor x, torch::Tensor y) {
  return [=]() mutable {
    for (auto& p : model->parameters()) {
      p.mutable_grad().zero_();
    }
    torch::mse_loss(model->forward(x), y).backward();
  };
}

/// Plain training over `m` micro-batches by hand, gradients accumulated.
Step plain_microbatched_step(
    torch::nn::Sequential model,
    int64_t m,
    torch::Tensor x,
    torch::Tensor y) {
  return [=]() mutable {
    for (auto& p : model->parameters()) {
      p.mutable_grad().zero_();
    }
    const auto xs = torch::tensor_split(x, m);
    const auto ys = torch::tensor_split(y, m);
    for (int64_t i = 0; i < m; ++i) {
      const double share =
          static_cast<double>(xs[static_cast<size_t>(i)].size(0)) /
          static_cast<double>(x.size(0));
      (torch::mse_loss(
           model->forward(xs[static_cast<size_t>(i)]),
           ys[static_cast<size_t>(i)]) *
       share)
          .backward();
    }
  };
}

Step pipe_step(
    gpipe::GPipe<torch::nn::Sequential> pipe,
    const Config& config,
    torch::Tensor x,
    torch::Tensor y) {
  if (config.use_step) {
    return [=]() mutable {
      for (auto& p : pipe->parameters()) {
        p.mutable_grad().zero_();
      }
      pipe->step(
          x, y, [](const torch::Tensor& out, const torch::Tensor& target) {
            return torch::mse_loss(out, target);
          });
    };
  }
  return [=]() mutable {
    for (auto& p : pipe->parameters()) {
      p.mutable_grad().zero_();
    }
    torch::mse_loss(pipe(x), y).backward();
  };
}

double time_ms(const Step& step, const torch::Device& device) {
  synchronize(device);
  const auto start = std::chrono::steady_clock::now();
  step();
  synchronize(device);
  return std::chrono::duration<double, std::milli>(
             std::chrono::steady_clock::now() - start)
      .count();
}

/// Peak bytes above the start of one step, and the total peak.
std::pair<int64_t, int64_t> measure_memory(
    const Step& step,
    const torch::Device& device) {
  synchronize(device);
  gpipe::MemoryMeter meter({device});
  step();
  synchronize(device);
  return {meter.peak_increase_bytes(device), meter.peak_bytes(device)};
}

void allocate_grads(const std::vector<torch::Tensor>& parameters) {
  for (const auto& p : parameters) {
    p.mutable_grad() = torch::zeros_like(p);
  }
}

Result run(const Config& config, const Flags& flags) {
  torch::manual_seed(0);
  auto model = config.model();
  model->to(config.device);
  auto reference = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(
      model->clone(config.device));
  gpipe::GPipe<torch::nn::Sequential> pipe(
      model,
      gpipe::GPipeOptions(config.partitions)
          .microbatches(config.microbatches)
          .checkpoint(config.checkpoint)
          .schedule(config.schedule)
          .devices(std::vector<torch::Device>(
              static_cast<size_t>(config.partitions), config.device)));
  allocate_grads(model->parameters());
  allocate_grads(reference->parameters());
  const auto x = torch::randn(
      {config.batch, config.width}, torch::TensorOptions(config.device));
  const auto y = torch::randn(
      {config.batch, config.width}, torch::TensorOptions(config.device));

  Step baseline;
  if (config.against_fill_drain) {
    Config fill_drain = config;
    fill_drain.schedule = gpipe::Schedule::FillDrain;
    gpipe::GPipe<torch::nn::Sequential> other(
        reference,
        gpipe::GPipeOptions(config.partitions)
            .microbatches(config.microbatches)
            .checkpoint(config.checkpoint)
            .schedule(gpipe::Schedule::FillDrain)
            .devices(std::vector<torch::Device>(
                static_cast<size_t>(config.partitions), config.device)));
    baseline = pipe_step(other, fill_drain, x, y);
  } else if (config.against_plain_microbatched) {
    baseline = plain_microbatched_step(reference, config.microbatches, x, y);
  } else {
    baseline = plain_step(reference, x, y);
  }
  const Step candidate = pipe_step(pipe, config, x, y);

  for (int w = 0; w < flags.warmup; ++w) {
    baseline();
    candidate();
  }
  std::vector<double> baseline_times, candidate_times, ratios;
  for (int r = 0; r < flags.repeats; ++r) {
    // Alternate who goes first, so neither always runs on a warmer cache.
    double b = 0, c = 0;
    if (r % 2 == 0) {
      b = time_ms(baseline, config.device);
      c = time_ms(candidate, config.device);
    } else {
      c = time_ms(candidate, config.device);
      b = time_ms(baseline, config.device);
    }
    baseline_times.push_back(b);
    candidate_times.push_back(c);
    ratios.push_back(c / b);
  }
  const auto [baseline_activation, baseline_peak] =
      measure_memory(baseline, config.device);
  const auto [candidate_activation, candidate_peak] =
      measure_memory(candidate, config.device);
  (void)baseline_peak;
  constexpr double kMB = 1024.0 * 1024.0;
  Result result;
  result.config = config;
  result.baseline_ms = median(baseline_times);
  result.gpipe_ms = median(candidate_times);
  result.time_ratio = median(ratios);
  result.baseline_activation_mb =
      static_cast<double>(baseline_activation) / kMB;
  result.gpipe_activation_mb = static_cast<double>(candidate_activation) / kMB;
  result.gpipe_total_peak_mb = static_cast<double>(candidate_peak) / kMB;
  result.memory_ratio = baseline_activation > 0
      ? static_cast<double>(candidate_activation) / baseline_activation
      : 0;
  return result;
}

std::string verdict(double value, double target) {
  if (target <= 0) {
    return "";
  }
  char text[64];
  std::snprintf(
      text,
      sizeof(text),
      "%s <=%.2f",
      value <= target ? "met" : "MISSED",
      target);
  return text;
}

std::vector<Config> cpu_configs(bool quick) {
  const int64_t layers = quick ? 4 : 32;
  const int64_t width = quick ? 32 : 256;
  const int64_t batch = quick ? 64 : 512;
  auto model = [=] { return linear_tanh(layers, width); };
  std::vector<Config> configs;
  auto add = [&](const std::string& name,
                 int64_t m,
                 gpipe::Checkpoint mode,
                 double time_target,
                 double memory_target) {
    Config c;
    c.name = name;
    c.model = model;
    c.width = width;
    c.batch = batch;
    c.microbatches = m;
    c.checkpoint = mode;
    c.time_target = time_target;
    c.memory_target = memory_target;
    configs.push_back(c);
  };
  add("cpu K=4 M=1 never", 1, gpipe::Checkpoint::Never, 1.03, 1.05);
  add("cpu K=4 M=8 never", 8, gpipe::Checkpoint::Never, 1.10, 1.10);
  add("cpu K=4 M=8 except_last", 8, gpipe::Checkpoint::ExceptLast, 0, 0);
  add("cpu K=4 M=8 always", 8, gpipe::Checkpoint::Always, 1.40, 0.25);
  // The same pipes against plain training looping over the same 8
  // micro-batches: what gpipe itself costs, without the small-GEMM penalty.
  for (const auto mode :
       {gpipe::Checkpoint::Never, gpipe::Checkpoint::Always}) {
    add(std::string("cpu K=4 M=8 ") + gpipe::to_string(mode) + " vs plain M=8",
        8,
        mode,
        0,
        0);
    configs.back().against_plain_microbatched = true;
  }

  // The schedules under step(): 1F1B against FillDrain, same pipe otherwise.
  const int64_t step_batch = quick ? 64 : 1024;
  for (const auto schedule :
       {gpipe::Schedule::FillDrain, gpipe::Schedule::OneFOneB}) {
    Config c;
    c.name =
        std::string("cpu step K=4 M=16 never ") + gpipe::to_string(schedule);
    c.model = model;
    c.width = width;
    c.batch = step_batch;
    c.microbatches = 16;
    c.use_step = true;
    c.schedule = schedule;
    configs.push_back(c);
  }
  Config versus = configs.back();
  versus.name = "cpu step 1f1b vs fill_drain";
  versus.against_fill_drain = true;
  versus.time_target = 1.05;
  versus.memory_target = 0.35;
  configs.push_back(versus);
  return configs;
}

std::vector<Config> cuda_configs(bool quick) {
  const int64_t layers = quick ? 4 : 60;
  const int64_t width = quick ? 256 : 1024;
  std::vector<Config> configs;
  for (const int64_t batch : {int64_t{64}, int64_t{8192}}) {
    auto add = [&](int64_t m,
                   gpipe::Checkpoint mode,
                   double time_target,
                   double memory_target,
                   double total_mb) {
      Config c;
      c.name = "cuda b=" + std::to_string(batch) +
          " K=4 M=" + std::to_string(m) + " " + gpipe::to_string(mode);
      c.device = torch::Device(torch::kCUDA, 0);
      c.model = [=] { return linears(layers, width); };
      c.width = width;
      c.batch = quick ? batch / 8 : batch;
      c.microbatches = m;
      c.checkpoint = mode;
      c.time_target = time_target;
      c.memory_target = memory_target;
      c.total_peak_target_mb = total_mb;
      configs.push_back(c);
    };
    const bool big = batch == 8192;
    add(1, gpipe::Checkpoint::Never, big ? 0 : 1.10, 0, 0);
    add(8, gpipe::Checkpoint::Never, big ? 1.03 : 0, big ? 1.05 : 0, 0);
    add(8, gpipe::Checkpoint::ExceptLast, 0, 0, 0);
    add(8, gpipe::Checkpoint::Always, big ? 1.30 : 0, 0, big ? 800 : 0);
    for (const auto schedule :
         {gpipe::Schedule::FillDrain, gpipe::Schedule::OneFOneB}) {
      Config c = configs.back();
      c.name = "cuda b=" + std::to_string(batch) + " step K=4 M=8 never " +
          gpipe::to_string(schedule);
      c.checkpoint = gpipe::Checkpoint::Never;
      c.use_step = true;
      c.schedule = schedule;
      c.time_target = c.memory_target = c.total_peak_target_mb = 0;
      configs.push_back(c);
    }
  }
  return configs;
}

/// The results as JSON, strings escaped and numbers written by the
/// library's own JSON helpers (trace.h), as its traces and summaries are.
void write_json(const std::vector<Result>& results, const Flags& flags) {
  using gpipe::detail::json_number;
  using gpipe::detail::json_string;
  std::string json = "{\n  \"repeats\": " + std::to_string(flags.repeats) +
      ",\n  \"warmup\": " + std::to_string(flags.warmup) +
      ",\n  \"results\": [\n";
  for (size_t k = 0; k < results.size(); ++k) {
    const auto& r = results[k];
    const char* baseline = r.config.against_fill_drain ? "gpipe fill_drain"
        : r.config.against_plain_microbatched          ? "plain micro-batched"
                                                       : "plain";
    json += "    {\"name\": " + json_string(r.config.name) +
        ", \"device\": " + json_string(r.config.device.str()) +
        ", \"batch\": " + std::to_string(r.config.batch) +
        ", \"partitions\": " + std::to_string(r.config.partitions) +
        ", \"microbatches\": " + std::to_string(r.config.microbatches) +
        ", \"checkpoint\": " +
        json_string(gpipe::to_string(r.config.checkpoint)) +
        ", \"step\": " + (r.config.use_step ? "true" : "false") +
        ", \"schedule\": " + json_string(gpipe::to_string(r.config.schedule)) +
        ", \"baseline\": " + json_string(baseline) +
        ", \"baseline_ms\": " + json_number(r.baseline_ms) +
        ", \"gpipe_ms\": " + json_number(r.gpipe_ms) +
        ", \"time_ratio\": " + json_number(r.time_ratio) +
        ", \"baseline_activation_mb\": " +
        json_number(r.baseline_activation_mb) +
        ", \"gpipe_activation_mb\": " + json_number(r.gpipe_activation_mb) +
        ", \"gpipe_total_peak_mb\": " + json_number(r.gpipe_total_peak_mb) +
        ", \"memory_ratio\": " + json_number(r.memory_ratio) +
        ", \"time_target\": " + json_number(r.config.time_target) +
        ", \"memory_target\": " + json_number(r.config.memory_target) +
        ", \"total_peak_target_mb\": " +
        json_number(r.config.total_peak_target_mb) + "}" +
        (k + 1 < results.size() ? "," : "") + "\n";
  }
  json += "  ]\n}\n";
  gpipe::detail::write_text_file(flags.output, json, "benchmark JSON");
}

void print_row(const Result& r) {
  char line[512];
  std::snprintf(
      line,
      sizeof(line),
      "%-36s %9.2f %9.2f %6.3f %-12s %9.2f %9.2f %6.3f %-12s %9.1f %s",
      r.config.name.c_str(),
      r.baseline_ms,
      r.gpipe_ms,
      r.time_ratio,
      verdict(r.time_ratio, r.config.time_target).c_str(),
      r.baseline_activation_mb,
      r.gpipe_activation_mb,
      r.memory_ratio,
      verdict(r.memory_ratio, r.config.memory_target).c_str(),
      r.gpipe_total_peak_mb,
      r.config.total_peak_target_mb > 0
          ? verdict(r.gpipe_total_peak_mb, r.config.total_peak_target_mb)
                .c_str()
          : "");
  std::cout << line << std::endl;
}

Flags parse(int argc, char** argv) {
  Flags flags;
  for (int a = 1; a < argc; ++a) {
    const std::string arg = argv[a];
    auto value = [&]() -> std::string {
      if (a + 1 >= argc) {
        std::cerr << "pipeline_benchmark: " << arg << " needs a value\n";
        std::exit(2);
      }
      return argv[++a];
    };
    if (arg == "--device") {
      flags.device = value();
    } else if (arg == "--repeats") {
      flags.repeats = std::stoi(value());
    } else if (arg == "--warmup") {
      flags.warmup = std::stoi(value());
    } else if (arg == "--output") {
      flags.output = value();
    } else if (arg == "--quick") {
      flags.quick = true;
      flags.repeats = 3;
      flags.warmup = 1;
    } else if (arg == "--help" || arg == "-h") {
      std::cout
          << "pipeline_benchmark [--device cpu|cuda|all] [--repeats N] [--warmup N] [--output FILE] [--quick]\n";
      std::exit(0);
    } else {
      std::cerr << "pipeline_benchmark: unknown flag " << arg
                << " (see --help)\n";
      std::exit(2);
    }
  }
  if (flags.repeats < 1 || flags.warmup < 0 ||
      (flags.device != "cpu" && flags.device != "cuda" &&
       flags.device != "all")) {
    std::cerr
        << "pipeline_benchmark: bad flags (repeats >= 1, warmup >= 0, device cpu|cuda|all)\n";
    std::exit(2);
  }
  return flags;
}

} // namespace

int main(int argc, char** argv) {
  const Flags flags = parse(argc, argv);
  gpipe::track_cpu_memory();
  std::vector<Config> configs;
  if (flags.device != "cuda") {
    configs = cpu_configs(flags.quick);
  }
  if (flags.device != "cpu") {
    if (torch::cuda::is_available()) {
      // The plain step on the default stream is the baseline of every row.
      at::globalContext().setAllowTF32CuBLAS(false);
      const auto more = cuda_configs(flags.quick);
      configs.insert(configs.end(), more.begin(), more.end());
    } else {
      std::cout << "(no CUDA device: CUDA configurations skipped)\n";
    }
  }
  std::cout
      << "gpipe " << gpipe::kVersion << " vs plain LibTorch, " << flags.repeats
      << " interleaved pairs after " << flags.warmup
      << " warm-ups; times are medians, ratios the median of per-pair ratios\n";
  char header[512];
  std::snprintf(
      header,
      sizeof(header),
      "%-36s %9s %9s %6s %-12s %9s %9s %6s %-12s %9s",
      "configuration",
      "base ms",
      "gpipe ms",
      "ratio",
      "time target",
      "base act",
      "gpipe act",
      "ratio",
      "mem target",
      "peak MB");
  std::cout << header << "\n" << std::string(140, '-') << std::endl;
  std::vector<Result> results;
  for (const auto& config : configs) {
    results.push_back(run(config, flags));
    print_row(results.back());
  }
  write_json(results, flags);
  std::cout
      << "(act: activation MB, the peak above the step's start; base: plain LibTorch on the whole batch, or what "
         "a 'vs' names)\nwrote "
      << flags.output << std::endl;
  return 0;
}
