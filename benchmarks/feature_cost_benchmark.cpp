// What carrying several tensors and skip connections costs, side by side in
// one run.
//
// Each row trains two pipes of the same partitions, micro-batches and
// schedule on the same weights: one with the feature, one without it.
//   * "list of 3": every layer takes and returns {hidden, mask, ids} (the
//     mask and the int64 ids ride along untouched) against the same layers
//     on the hidden tensor alone.
//   * "skips": a U-Net of Linear layers whose three skips cross one, two and
//     three partition boundaries, against the same layers with no stash and
//     no pop. The skips' own activations are part of the model (plain
//     training keeps them too), so the memory row also shows plain
//     training's ratio for the same pair.
// Runs are interleaved (with, without, without, with, ...) after warm-up;
// each pair gives one ratio and the table reports medians, so the machine's
// load cancels. Memory is the peak above the step's start (parameters and
// gradients exist beforehand), exact on the CPU through the counting
// allocator.
//
//   feature_cost_benchmark [--device cpu|cuda] [--repeats 15] [--warmup 3]
//                          [--quick]
#include <gpipe/gpipe.h>
#include <gpipe/memory.h>

#include "bench_support.h"

#include <torch/torch.h>

#include <algorithm>
#include <cstdio>
#include <functional>
#include <iostream>
#include <string>
#include <vector>

namespace {

struct Flags {
  std::string device = "cpu";
  int repeats = 15;
  int warmup = 3;
  bool quick = false;
};

using Pipe = gpipe::GPipe<torch::nn::Sequential>;
using gpipe_bench::Step;

/// h + tanh(linear(h)) on the first tensor; the others pass through.
struct ListBlockImpl : torch::nn::Cloneable<ListBlockImpl> {
  explicit ListBlockImpl(int64_t width_) : width(width_) {
    reset();
  }
  void reset() override {
    linear = register_module("linear", torch::nn::Linear(width, width));
  }
  std::vector<torch::Tensor> forward(const std::vector<torch::Tensor>& in) {
    return {in[0] + torch::tanh(linear(in[0])), in[1], in[2]};
  }
  int64_t width;
  torch::nn::Linear linear{nullptr};
};
TORCH_MODULE(ListBlock);

/// The same block on one tensor.
struct TensorBlockImpl : torch::nn::Cloneable<TensorBlockImpl> {
  explicit TensorBlockImpl(int64_t width_) : width(width_) {
    reset();
  }
  void reset() override {
    linear = register_module("linear", torch::nn::Linear(width, width));
  }
  torch::Tensor forward(const torch::Tensor& h) {
    return h + torch::tanh(linear(h));
  }
  int64_t width;
  torch::nn::Linear linear{nullptr};
};
TORCH_MODULE(TensorBlock);

/// A U-Net level's encoder: stashes its activation when `skips` is set.
struct DownImpl : torch::nn::Cloneable<DownImpl>, gpipe::skip::Skippable {
  DownImpl(int64_t width_, bool skips_)
      : Skippable(
            skips_ ? std::vector<std::string>{"down"}
                   : std::vector<std::string>{},
            {}),
        width(width_),
        skips(skips_) {
    reset();
  }
  void reset() override {
    linear = register_module("linear", torch::nn::Linear(width, width));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto y = torch::tanh(linear(x));
    if (skips) {
      stash("down", y);
    }
    return y;
  }
  int64_t width;
  bool skips;
  torch::nn::Linear linear{nullptr};
};
TORCH_MODULE(Down);

/// A U-Net level's decoder: adds its level's activation when `skips` is set.
struct UpImpl : torch::nn::Cloneable<UpImpl>, gpipe::skip::Skippable {
  UpImpl(int64_t width_, bool skips_)
      : Skippable(
            {},
            skips_ ? std::vector<std::string>{"down"}
                   : std::vector<std::string>{}),
        width(width_),
        skips(skips_) {
    reset();
  }
  void reset() override {
    linear = register_module("linear", torch::nn::Linear(width, width));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto y = torch::tanh(linear(x));
    return skips ? y + pop("down") : y;
  }
  int64_t width;
  bool skips;
  torch::nn::Linear linear{nullptr};
};
TORCH_MODULE(Up);

/// 8 layers: Down l1..l3, Linear, Up l3..l1, Linear. Balance {2,2,2,2}
/// puts the skips across one, two and three boundaries.
torch::nn::Sequential unet(int64_t width, bool skips) {
  torch::manual_seed(0);
  torch::nn::Sequential seq;
  for (const char* level : {"l1", "l2", "l3"}) {
    Down down(width, skips);
    gpipe::skip::isolate(down, level);
    seq->push_back(down);
  }
  seq->push_back(torch::nn::Linear(width, width));
  for (const char* level : {"l3", "l2", "l1"}) {
    Up up(width, skips);
    gpipe::skip::isolate(up, level);
    seq->push_back(up);
  }
  seq->push_back(torch::nn::Linear(width, width));
  return seq;
}

torch::nn::Sequential list_stack(int64_t layers, int64_t width, bool list) {
  torch::manual_seed(0);
  torch::nn::Sequential seq;
  for (int64_t l = 0; l < layers; ++l) {
    if (list) {
      seq->push_back(ListBlock(width));
    } else {
      seq->push_back(TensorBlock(width));
    }
  }
  return seq;
}

void zero_grads(const std::vector<torch::Tensor>& parameters) {
  for (const auto& p : parameters) {
    if (!p.grad().defined()) {
      p.mutable_grad() = torch::zeros_like(p);
    }
    p.mutable_grad().zero_();
  }
}

torch::Tensor mse(const torch::Tensor& out, const torch::Tensor& target) {
  return torch::mse_loss(out, target);
}

struct Row {
  std::string name;
  double with_ms = 0;
  double without_ms = 0;
  double time_ratio = 0;
  double with_mb = 0;
  double without_mb = 0;
  double memory_ratio = 0;
  double plain_memory_ratio = 0; // same pair trained plainly; 0: not run
};

/// `with` and `without` side by side: times interleaved, then memory.
Row compare(
    const std::string& name,
    const Step& with,
    const Step& without,
    const torch::Device& device,
    const Flags& flags) {
  const auto times = gpipe_bench::time_pairs(
      with, without, device, flags.warmup, flags.repeats);
  constexpr double kMB = 1024.0 * 1024.0;
  const auto with_bytes =
      gpipe_bench::measure_memory(with, device).activation_bytes;
  const auto without_bytes =
      gpipe_bench::measure_memory(without, device).activation_bytes;
  Row row;
  row.name = name;
  row.with_ms = gpipe_bench::median(times.first_ms);
  row.without_ms = gpipe_bench::median(times.second_ms);
  row.time_ratio = gpipe_bench::median_ratio(times.first_ms, times.second_ms);
  row.with_mb = static_cast<double>(with_bytes) / kMB;
  row.without_mb = static_cast<double>(without_bytes) / kMB;
  row.memory_ratio = without_bytes > 0
      ? static_cast<double>(with_bytes) / static_cast<double>(without_bytes)
      : 0;
  return row;
}

gpipe::GPipeOptions options_for(
    const torch::Device& device,
    int64_t microbatches,
    gpipe::Schedule schedule) {
  return gpipe::GPipeOptions(4)
      .balance({2, 2, 2, 2})
      .microbatches(microbatches)
      .checkpoint(gpipe::Checkpoint::ExceptLast)
      .schedule(schedule)
      .devices(std::vector<torch::Device>(4, device));
}

Row list_row(
    const torch::Device& device,
    int64_t width,
    int64_t batch,
    int64_t microbatches,
    gpipe::Schedule schedule,
    const Flags& flags) {
  constexpr int64_t kTokens = 16;
  const auto on = torch::TensorOptions(device);
  const auto hidden = torch::randn({batch, kTokens, width}, on);
  const auto mask = torch::ones({batch, kTokens}, on);
  const auto ids = torch::arange(kTokens, on.dtype(torch::kLong))
                       .expand({batch, kTokens})
                       .contiguous();
  const auto target = torch::randn({batch, kTokens, width}, on);
  auto with_model = list_stack(8, width, true);
  auto without_model = list_stack(8, width, false);
  Pipe with(with_model, options_for(device, microbatches, schedule));
  Pipe without(without_model, options_for(device, microbatches, schedule));
  const std::vector<torch::Tensor> inputs = {hidden, mask, ids};
  // step() needs one tensor out of the last layer: the list pipe's last
  // layer keeps its list, so both rows run forward() and backward().
  const Step with_step = [=]() mutable {
    zero_grads(with->parameters());
    auto outs = with->forward<std::vector<torch::Tensor>>(inputs);
    torch::mse_loss(outs[0], target).backward();
  };
  const Step without_step = [=]() mutable {
    zero_grads(without->parameters());
    torch::mse_loss(without->forward(hidden), target).backward();
  };
  return compare(
      std::string("list of 3 vs one tensor, forward+backward, M=") +
          std::to_string(microbatches),
      with_step,
      without_step,
      device,
      flags);
}

Row skip_row(
    const torch::Device& device,
    int64_t width,
    int64_t batch,
    int64_t microbatches,
    gpipe::Schedule schedule,
    const Flags& flags) {
  const auto on = torch::TensorOptions(device);
  const auto x = torch::randn({batch, width}, on);
  const auto y = torch::randn({batch, width}, on);
  auto with_model = unet(width, true);
  auto without_model = unet(width, false);
  with_model->to(device);
  without_model->to(device);
  auto plain_with = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(
      with_model->clone(device));
  auto plain_without = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(
      without_model->clone(device));
  Pipe with(with_model, options_for(device, microbatches, schedule));
  Pipe without(without_model, options_for(device, microbatches, schedule));
  const Step with_step = [=]() mutable {
    zero_grads(with->parameters());
    with->step(x, y, mse);
  };
  const Step without_step = [=]() mutable {
    zero_grads(without->parameters());
    without->step(x, y, mse);
  };
  Row row = compare(
      std::string("skips vs none, step ") + gpipe::to_string(schedule) +
          ", M=" + std::to_string(microbatches),
      with_step,
      without_step,
      device,
      flags);
  const Step plain_with_step = [=]() mutable {
    zero_grads(plain_with->parameters());
    mse(plain_with->forward(x), y).backward();
  };
  const Step plain_without_step = [=]() mutable {
    zero_grads(plain_without->parameters());
    mse(plain_without->forward(x), y).backward();
  };
  plain_with_step();
  plain_without_step();
  const auto a =
      gpipe_bench::measure_memory(plain_with_step, device).activation_bytes;
  const auto b =
      gpipe_bench::measure_memory(plain_without_step, device).activation_bytes;
  row.plain_memory_ratio =
      b > 0 ? static_cast<double>(a) / static_cast<double>(b) : 0;
  return row;
}

Flags parse(int argc, char** argv) {
  Flags flags;
  for (int k = 1; k < argc; ++k) {
    const std::string arg = argv[k];
    auto value = [&]() -> std::string {
      TORCH_CHECK(k + 1 < argc, "gpipe: ", arg, " needs a value");
      return argv[++k];
    };
    if (arg == "--device") {
      flags.device = value();
      TORCH_CHECK(
          flags.device == "cpu" || flags.device == "cuda",
          "gpipe: --device is cpu or cuda (got ",
          flags.device,
          ")");
    } else if (arg == "--repeats") {
      flags.repeats = std::stoi(value());
    } else if (arg == "--warmup") {
      flags.warmup = std::stoi(value());
    } else if (arg == "--quick") {
      flags.quick = true;
    } else {
      TORCH_CHECK(
          false,
          "gpipe: unknown flag ",
          arg,
          " (flags: --device cpu|cuda, --repeats N, --warmup N, --quick)");
    }
  }
  TORCH_CHECK(
      flags.repeats >= 1 && flags.warmup >= 0,
      "gpipe: --repeats must be at least 1 and --warmup at least 0 (repeats: ",
      flags.repeats,
      ", warmup: ",
      flags.warmup,
      ")");
  return flags;
}

} // namespace

int main(int argc, char** argv) {
  Flags flags;
  try {
    flags = parse(argc, argv);
  } catch (const c10::Error& e) {
    std::cerr << e.what_without_backtrace() << "\n";
    return 2;
  }
  gpipe::track_cpu_memory();
  if (flags.quick) {
    flags.repeats = std::min(flags.repeats, 3);
    flags.warmup = std::min(flags.warmup, 1);
    torch::set_num_threads(1);
  }
  if (flags.device == "cuda" && !torch::cuda::is_available()) {
    std::cout << "(no CUDA device: nothing to measure)\n";
    return 0;
  }
  const torch::Device device =
      flags.device == "cuda" ? torch::Device("cuda:0") : torch::kCPU;
  const int64_t width = flags.quick ? 16 : (device.is_cuda() ? 1024 : 256);
  const int64_t batch = flags.quick ? 8 : (device.is_cuda() ? 512 : 128);
  std::cout << "gpipe " << gpipe::kVersion << " feature costs on " << device
            << ", " << flags.repeats << " interleaved pairs after "
            << flags.warmup << " warm-ups, K=4, checkpoint except_last\n";
  char header[256];
  std::snprintf(
      header,
      sizeof(header),
      "%-46s %9s %9s %6s %9s %9s %6s %9s",
      "feature vs without",
      "with ms",
      "w/o ms",
      "ratio",
      "with act",
      "w/o act",
      "ratio",
      "plain");
  std::cout << header << "\n" << std::string(110, '-') << std::endl;
  std::vector<Row> rows;
  rows.push_back(
      list_row(device, width, batch, 8, gpipe::Schedule::FillDrain, flags));
  for (const auto schedule :
       {gpipe::Schedule::FillDrain, gpipe::Schedule::OneFOneB}) {
    rows.push_back(skip_row(device, width, batch * 8, 8, schedule, flags));
  }
  for (const auto& r : rows) {
    char line[256];
    std::snprintf(
        line,
        sizeof(line),
        "%-46s %9.2f %9.2f %6.3f %9.2f %9.2f %6.3f %9s",
        r.name.c_str(),
        r.with_ms,
        r.without_ms,
        r.time_ratio,
        r.with_mb,
        r.without_mb,
        r.memory_ratio,
        r.plain_memory_ratio > 0
            ? (std::to_string(r.plain_memory_ratio).substr(0, 5)).c_str()
            : "-");
    std::cout << line << std::endl;
  }
  std::cout << "(act: activation MB, the peak above the step's start; plain: "
               "the memory ratio of the same pair trained without a pipe)\n";
  return 0;
}
