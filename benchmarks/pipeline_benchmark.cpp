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
// Rows under `step` run every schedule (fill-drain, 1F1B, interleaved 1F1B,
// ZB-H1) against plain training, and ZB-H1 against 1F1B. A second table sets
// the backward split into I and W (ZB-H1) against the whole backward B
// (1F1B) on the same weights: the summed durations of a step's slices from a
// gpipe::Timeline, paired and interleaved the same way.
//
//   pipeline_benchmark [--device cpu|cuda|all] [--repeats 15] [--warmup 3]
//                      [--output benchmark.json] [--quick]
#include <gpipe/gpipe.h>
#include <gpipe/memory.h>
#include <gpipe/trace.h>

#include "bench_support.h"

#include <torch/torch.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace {

using gpipe_bench::measure_memory;
using gpipe_bench::median;
using gpipe_bench::median_ratio;
using gpipe_bench::Step;
using gpipe_bench::synchronize;
using gpipe_bench::time_pairs;

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
  /// The lane of each partition (GPipeOptions::lanes); empty: the default,
  /// one lane per device (what a CUDA device must have).
  std::vector<int64_t> lanes;
  /// Compare with the same pipe on this schedule instead of plain training.
  std::optional<gpipe::Schedule> against_schedule;
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

torch::nn::Sequential linear_tanh(int64_t layers, int64_t width) {
  torch::nn::Sequential seq;
  for (int64_t l = 0; l < layers; ++l) {
    seq->push_back(torch::nn::Linear(width, width));
    seq->push_back(torch::nn::Tanh());
  }
  return seq;
}

torch::nn::Sequential linear_relu(int64_t layers, int64_t width) {
  torch::nn::Sequential seq;
  for (int64_t l = 0; l < layers; ++l) {
    seq->push_back(torch::nn::Linear(width, width));
    seq->push_back(torch::nn::ReLU());
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

void allocate_grads(const std::vector<torch::Tensor>& parameters) {
  for (const auto& p : parameters) {
    p.mutable_grad() = torch::zeros_like(p);
  }
}

/// The pipe a row describes, on `schedule`, all partitions on its device.
gpipe::GPipe<torch::nn::Sequential> make_pipe(
    torch::nn::Sequential model,
    const Config& config,
    gpipe::Schedule schedule) {
  return gpipe::GPipe<torch::nn::Sequential>(
      std::move(model),
      gpipe::GPipeOptions(config.partitions)
          .microbatches(config.microbatches)
          .checkpoint(config.checkpoint)
          .schedule(schedule)
          .lanes(config.lanes)
          .devices(std::vector<torch::Device>(
              static_cast<size_t>(config.partitions), config.device)));
}

/// " lanes 0123" for a row's name; "" for the default lanes.
std::string lanes_name(const std::vector<int64_t>& lanes) {
  if (lanes.empty()) {
    return "";
  }
  std::string name = " lanes ";
  for (const auto lane : lanes) {
    name += std::to_string(lane);
  }
  return name;
}

Result run(const Config& config, const Flags& flags) {
  torch::manual_seed(0);
  auto model = config.model();
  model->to(config.device);
  auto reference = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(
      model->clone(config.device));
  auto pipe = make_pipe(model, config, config.schedule);
  allocate_grads(model->parameters());
  allocate_grads(reference->parameters());
  const auto x = torch::randn(
      {config.batch, config.width}, torch::TensorOptions(config.device));
  const auto y = torch::randn(
      {config.batch, config.width}, torch::TensorOptions(config.device));

  Step baseline;
  if (config.against_schedule) {
    Config other_config = config;
    other_config.schedule = *config.against_schedule;
    baseline = pipe_step(
        make_pipe(reference, config, other_config.schedule),
        other_config,
        x,
        y);
  } else if (config.against_plain_microbatched) {
    baseline = plain_microbatched_step(reference, config.microbatches, x, y);
  } else {
    baseline = plain_step(reference, x, y);
  }
  const Step candidate = pipe_step(pipe, config, x, y);

  const auto times = time_pairs(
      baseline, candidate, config.device, flags.warmup, flags.repeats);
  const auto [baseline_activation, baseline_peak] =
      measure_memory(baseline, config.device);
  const auto [candidate_activation, candidate_peak] =
      measure_memory(candidate, config.device);
  (void)baseline_peak;
  constexpr double kMB = 1024.0 * 1024.0;
  Result result;
  result.config = config;
  result.baseline_ms = median(times.first_ms);
  result.gpipe_ms = median(times.second_ms);
  result.time_ratio = median_ratio(times.second_ms, times.first_ms);
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
  versus.against_schedule = gpipe::Schedule::FillDrain;
  versus.time_target = 1.05;
  versus.memory_target = 0.35;
  configs.push_back(versus);

  // Every schedule through step() against plain training, on a Linear/ReLU
  // MLP with one lane (thread) per partition; interleaved 1F1B on 8
  // partitions, two per lane (partition j on lane j mod 4). Eight partitions
  // need eight layers, so --quick has eight here.
  const int64_t relu_layers = quick ? 8 : layers;
  auto relu_model = [=] { return linear_relu(relu_layers, width); };
  for (const auto schedule :
       {gpipe::Schedule::FillDrain,
        gpipe::Schedule::OneFOneB,
        gpipe::Schedule::Interleaved1F1B,
        gpipe::Schedule::ZeroBubbleH1}) {
    const bool interleaved = schedule == gpipe::Schedule::Interleaved1F1B;
    Config c;
    c.model = relu_model;
    c.width = width;
    c.batch = batch;
    c.partitions = interleaved ? 8 : 4;
    c.lanes = interleaved ? std::vector<int64_t>{0, 1, 2, 3, 0, 1, 2, 3}
                          : std::vector<int64_t>{0, 1, 2, 3};
    c.microbatches = 8;
    c.use_step = true;
    c.schedule = schedule;
    c.name = "cpu step relu K=" + std::to_string(c.partitions) + " M=8" +
        lanes_name(c.lanes) + " " + gpipe::to_string(schedule);
    configs.push_back(c);
  }
  // ZB-H1 against 1F1B, same pipe and lanes otherwise: W fills the bubbles,
  // and a micro-batch waiting for its W holds its activations longer.
  Config zero_bubble = configs.back();
  zero_bubble.name =
      "cpu step relu zero_bubble_h1 vs 1f1b" + lanes_name(zero_bubble.lanes);
  zero_bubble.against_schedule = gpipe::Schedule::OneFOneB;
  configs.push_back(zero_bubble);
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
    // The other two schedules on the same pipe. One GPU runs one lane, so
    // the lanes stay the default; interleaved 1F1B has 8 partitions on it.
    for (const auto schedule :
         {gpipe::Schedule::Interleaved1F1B, gpipe::Schedule::ZeroBubbleH1}) {
      const bool interleaved = schedule == gpipe::Schedule::Interleaved1F1B;
      Config c = configs.back();
      c.partitions = interleaved ? 8 : 4;
      c.model = [=] {
        return linears(
            interleaved ? std::max<int64_t>(layers, 8) : layers, width);
      };
      c.schedule = schedule;
      c.name = "cuda b=" + std::to_string(batch) +
          " step K=" + std::to_string(c.partitions) + " M=8 never " +
          gpipe::to_string(schedule);
      configs.push_back(c);
    }
    Config versus = configs.back();
    versus.name =
        "cuda b=" + std::to_string(batch) + " step zero_bubble_h1 vs 1f1b";
    versus.against_schedule = gpipe::Schedule::OneFOneB;
    configs.push_back(versus);
  }
  return configs;
}

/// The "I + W against B" row: the same pipe's backward, whole under 1F1B
/// (Phase::Backward) and split under ZB-H1 (Phase::BackwardInput, then
/// Phase::BackwardWeight), summed over a step's slices from a Timeline.
/// Splitting must not make the backward itself much dearer, or ZB-H1 loses
/// in work what it wins in bubble.
struct SplitConfig {
  std::string name;
  torch::Device device = torch::kCPU;
  int64_t layers = 8;
  int64_t width = 1024;
  int64_t batch = 256;
  int64_t partitions = 2;
  int64_t microbatches = 4;
  std::vector<int64_t> lanes;
  double target = 0; // ratio of I + W to B; 0: none
};

struct SplitResult {
  SplitConfig config;
  double backward_ms = 0; // median over steps of the summed B slices
  double input_ms = 0; // ... of the summed I slices
  double weight_ms = 0; // ... of the summed W slices
  double split_ms = 0; // ... of I + W
  double ratio = 0; // median of the per-pair ratios (I + W) / B
  // Slices in one step: B under 1F1B; B, I and W under ZB-H1 (its B should
  // be 0, or the sums would not compare like with like).
  int64_t backward_slices = 0;
  int64_t split_backward_slices = 0;
  int64_t input_slices = 0;
  int64_t weight_slices = 0;
};

/// Summed milliseconds and counts of one step's slices, per phase.
struct PhaseSums {
  double backward_ms = 0, input_ms = 0, weight_ms = 0;
  int64_t backward = 0, input = 0, weight = 0;
};

PhaseSums phase_sums(const std::vector<gpipe::TimelineEvent>& events) {
  PhaseSums sums;
  for (const auto& event : events) {
    const double ms = (event.end_us - event.start_us) / 1000.0;
    if (event.phase == gpipe::Phase::Backward) {
      sums.backward_ms += ms;
      ++sums.backward;
    } else if (event.phase == gpipe::Phase::BackwardInput) {
      sums.input_ms += ms;
      ++sums.input;
    } else if (event.phase == gpipe::Phase::BackwardWeight) {
      sums.weight_ms += ms;
      ++sums.weight;
    }
  }
  return sums;
}

SplitResult run_split(const SplitConfig& split, const Flags& flags) {
  torch::manual_seed(0);
  Config config;
  config.device = split.device;
  config.partitions = split.partitions;
  config.microbatches = split.microbatches;
  config.checkpoint = gpipe::Checkpoint::Never;
  config.lanes = split.lanes;
  config.use_step = true;
  auto model = linear_relu(split.layers, split.width);
  model->to(split.device);
  auto copy = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(
      model->clone(split.device));
  auto whole = make_pipe(model, config, gpipe::Schedule::OneFOneB);
  auto halves = make_pipe(copy, config, gpipe::Schedule::ZeroBubbleH1);
  allocate_grads(model->parameters());
  allocate_grads(copy->parameters());
  auto whole_timeline = std::make_shared<gpipe::Timeline>();
  auto halves_timeline = std::make_shared<gpipe::Timeline>();
  whole->set_timeline(whole_timeline);
  halves->set_timeline(halves_timeline);
  const auto x = torch::randn(
      {split.batch, split.width}, torch::TensorOptions(split.device));
  const auto y = torch::randn(
      {split.batch, split.width}, torch::TensorOptions(split.device));
  const Step whole_step = pipe_step(whole, config, x, y);
  const Step halves_step = pipe_step(halves, config, x, y);
  auto measure = [&](const Step& step, gpipe::Timeline& timeline) {
    synchronize(split.device);
    timeline.clear();
    step();
    synchronize(split.device);
    return phase_sums(timeline.events());
  };

  for (int w = 0; w < flags.warmup; ++w) {
    whole_step();
    halves_step();
  }
  std::vector<double> backward, input, weight, both, ratios;
  SplitResult result;
  result.config = split;
  for (int r = 0; r < flags.repeats; ++r) {
    PhaseSums b, iw;
    if (r % 2 == 0) {
      b = measure(whole_step, *whole_timeline);
      iw = measure(halves_step, *halves_timeline);
    } else {
      iw = measure(halves_step, *halves_timeline);
      b = measure(whole_step, *whole_timeline);
    }
    backward.push_back(b.backward_ms);
    input.push_back(iw.input_ms);
    weight.push_back(iw.weight_ms);
    both.push_back(iw.input_ms + iw.weight_ms);
    ratios.push_back((iw.input_ms + iw.weight_ms) / b.backward_ms);
    result.backward_slices = b.backward;
    result.split_backward_slices = iw.backward;
    result.input_slices = iw.input;
    result.weight_slices = iw.weight;
  }
  result.backward_ms = median(backward);
  result.input_ms = median(input);
  result.weight_ms = median(weight);
  result.split_ms = median(both);
  result.ratio = median(ratios);
  return result;
}

std::vector<SplitConfig> split_configs(
    const torch::Device& device,
    bool quick) {
  SplitConfig c;
  c.device = device;
  c.layers = quick ? 4 : 8;
  c.width = quick ? 128 : 1024;
  c.batch = quick ? 64 : 256;
  c.partitions = 2;
  c.microbatches = 4;
  c.target = 1.15;
  // On the CPU one lane (the default) runs the slices one at a time, so a
  // slice's duration is its own work, not a share of cores with the other
  // lane's; a CUDA device has one lane anyway.
  c.name = std::string(device.is_cuda() ? "cuda" : "cpu") + " relu " +
      std::to_string(c.layers) + "x" + std::to_string(c.width) +
      " b=" + std::to_string(c.batch) + " K=" + std::to_string(c.partitions) +
      " M=" + std::to_string(c.microbatches) + " never one lane";
  return {c};
}

std::string json_lanes(const std::vector<int64_t>& lanes) {
  std::string json = "[";
  for (size_t k = 0; k < lanes.size(); ++k) {
    json += (k ? ", " : "") + std::to_string(lanes[k]);
  }
  return json + "]";
}

/// The results as JSON, strings escaped and numbers written by the
/// library's own JSON helpers (trace.h), as its traces and summaries are.
void write_json(
    const std::vector<Result>& results,
    const std::vector<SplitResult>& splits,
    const Flags& flags) {
  using gpipe::detail::json_number;
  using gpipe::detail::json_string;
  std::string json = "{\n  \"repeats\": " + std::to_string(flags.repeats) +
      ",\n  \"warmup\": " + std::to_string(flags.warmup) +
      ",\n  \"results\": [\n";
  for (size_t k = 0; k < results.size(); ++k) {
    const auto& r = results[k];
    const std::string baseline = r.config.against_schedule
        ? std::string("gpipe ") + gpipe::to_string(*r.config.against_schedule)
        : r.config.against_plain_microbatched ? "plain micro-batched"
                                              : "plain";
    json += "    {\"name\": " + json_string(r.config.name) +
        ", \"device\": " + json_string(r.config.device.str()) +
        ", \"batch\": " + std::to_string(r.config.batch) +
        ", \"partitions\": " + std::to_string(r.config.partitions) +
        ", \"lanes\": " + json_lanes(r.config.lanes) +
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
  json += "  ],\n  \"backward_split\": [\n";
  for (size_t k = 0; k < splits.size(); ++k) {
    const auto& r = splits[k];
    json += "    {\"name\": " + json_string(r.config.name) +
        ", \"device\": " + json_string(r.config.device.str()) +
        ", \"layers\": " + std::to_string(r.config.layers) +
        ", \"width\": " + std::to_string(r.config.width) +
        ", \"batch\": " + std::to_string(r.config.batch) +
        ", \"partitions\": " + std::to_string(r.config.partitions) +
        ", \"lanes\": " + json_lanes(r.config.lanes) +
        ", \"microbatches\": " + std::to_string(r.config.microbatches) +
        ", \"backward_ms\": " + json_number(r.backward_ms) +
        ", \"backward_input_ms\": " + json_number(r.input_ms) +
        ", \"backward_weight_ms\": " + json_number(r.weight_ms) +
        ", \"input_plus_weight_ms\": " + json_number(r.split_ms) +
        ", \"ratio\": " + json_number(r.ratio) +
        ", \"backward_slices\": " + std::to_string(r.backward_slices) +
        ", \"zero_bubble_backward_slices\": " +
        std::to_string(r.split_backward_slices) +
        ", \"backward_input_slices\": " + std::to_string(r.input_slices) +
        ", \"backward_weight_slices\": " + std::to_string(r.weight_slices) +
        ", \"target\": " + json_number(r.config.target) + "}" +
        (k + 1 < splits.size() ? "," : "") + "\n";
  }
  json += "  ]\n}\n";
  gpipe::detail::write_text_file(flags.output, json, "benchmark JSON");
}

void print_row(const Result& r) {
  char line[512];
  std::snprintf(
      line,
      sizeof(line),
      "%-54s %9.2f %9.2f %6.3f %-12s %9.2f %9.2f %6.3f %-12s %9.1f %s",
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

void print_split_header() {
  char header[512];
  std::snprintf(
      header,
      sizeof(header),
      "%-54s %9s %9s %9s %9s %6s %-14s %s",
      "backward split (I + W against B)",
      "B ms",
      "I ms",
      "W ms",
      "I+W ms",
      "ratio",
      "target",
      "slices B | B/I/W");
  std::cout << header << "\n" << std::string(158, '-') << std::endl;
}

void print_split_row(const SplitResult& r) {
  char line[512];
  std::snprintf(
      line,
      sizeof(line),
      "%-54s %9.2f %9.2f %9.2f %9.2f %6.3f %-14s %lld | %lld/%lld/%lld",
      r.config.name.c_str(),
      r.backward_ms,
      r.input_ms,
      r.weight_ms,
      r.split_ms,
      r.ratio,
      verdict(r.ratio, r.config.target).c_str(),
      static_cast<long long>(r.backward_slices),
      static_cast<long long>(r.split_backward_slices),
      static_cast<long long>(r.input_slices),
      static_cast<long long>(r.weight_slices));
  std::cout << line << std::endl;
}

Flags parse(int argc, char** argv) {
  Flags flags;
  gpipe_bench::for_each_flag(
      argc,
      argv,
      "pipeline_benchmark",
      "pipeline_benchmark [--device cpu|cuda|all] [--repeats N] [--warmup N] "
      "[--output FILE] [--quick]\n",
      {"quick"},
      [&](const std::string& name, const std::string& value) {
        if (name == "device") {
          flags.device = value;
        } else if (name == "repeats") {
          flags.repeats = std::stoi(value);
        } else if (name == "warmup") {
          flags.warmup = std::stoi(value);
        } else if (name == "output") {
          flags.output = value;
        } else if (name == "quick") {
          flags.quick = true;
          flags.repeats = 3;
          flags.warmup = 1;
        } else {
          gpipe_bench::flag_error(
              "pipeline_benchmark", "unknown flag --" + name);
        }
      });
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
  if (flags.quick) {
    // The smoke run's GEMMs are tiny: one intra-op thread, so that on a
    // loaded machine no OpenMP barrier waits for a descheduled worker on
    // every GEMM (which made --quick take a minute on two busy cores).
    torch::set_num_threads(1);
  }
  std::vector<Config> configs;
  std::vector<SplitConfig> splits;
  if (flags.device != "cuda") {
    configs = cpu_configs(flags.quick);
    splits = split_configs(torch::kCPU, flags.quick);
  }
  if (flags.device != "cpu") {
    if (torch::cuda::is_available()) {
      // The plain step on the default stream is the baseline of every row.
      at::globalContext().setAllowTF32CuBLAS(false);
      const auto more = cuda_configs(flags.quick);
      configs.insert(configs.end(), more.begin(), more.end());
      const auto more_splits =
          split_configs(torch::Device(torch::kCUDA, 0), flags.quick);
      splits.insert(splits.end(), more_splits.begin(), more_splits.end());
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
      "%-54s %9s %9s %6s %-12s %9s %9s %6s %-12s %9s",
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
  std::cout << header << "\n" << std::string(158, '-') << std::endl;
  std::vector<Result> results;
  for (const auto& config : configs) {
    results.push_back(run(config, flags));
    print_row(results.back());
  }
  std::cout << std::endl;
  print_split_header();
  std::vector<SplitResult> split_results;
  for (const auto& split : splits) {
    split_results.push_back(run_split(split, flags));
    print_split_row(split_results.back());
  }
  write_json(results, split_results, flags);
  std::cout
      << "(act: activation MB, the peak above the step's start; base: plain LibTorch on the whole batch, or what "
         "a 'vs' names; 'relu' rows: Linear/ReLU, checkpoint never)\n"
         "(backward split: summed slice durations of one step from a Timeline, B under 1f1b, I and W under "
         "zero_bubble_h1, same weights; ratio: median of per-pair (I+W)/B)\nwrote "
      << flags.output << std::endl;
  return 0;
}
