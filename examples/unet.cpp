// unet: skip connections across partitions (gpipe/skip.h), told by a
// program.
//
// A small denoising U-Net of Linear layers: three encoder levels (Down) each
// stash their activation, a middle layer, three decoder levels (Up) each pop
// the activation of their own level, and a head. The same Down and Up
// classes serve every level: `gpipe::skip::isolate` puts each level's pair
// in a namespace of its own ("l1/skip", "l2/skip", "l3/skip"). The pipe cuts
// the eight layers into four partitions so that the skips cross one, two
// and three partition boundaries, and routes each one straight from the
// stashing partition's device to the popping partition's.
//
// The program prints the layout, then trains one step with forward() and
// backward() and one step() per schedule, each against plain training of a
// clone of the model (where stash and pop work through a per-thread store):
// the loss and the largest gradient difference. It exits with status 1 if a
// difference is above 1e-4 of the largest gradient.
// Run `unet --help` for the flags.
#include <gpipe/gpipe.h>
#include <gpipe/skip.h>

#include "flags.h"

#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace {

using gpipe_example::checkpoint_of;
using gpipe_example::for_each_flag;
using gpipe_example::parse_int;
using gpipe_example::usage_error;

struct Flags {
  int64_t width = 64;
  int64_t batch = 32;
  int64_t microbatches = 4;
  std::string device; // default: cuda when present, else cpu
  std::string checkpoint = "except_last";
  uint64_t seed = 0;
};

constexpr int64_t kPartitions = 4;

const char* const kProgram = "unet";

const char* const kUsage = R"(usage: unet [flags]

Trains a small denoising U-Net whose skip connections cross one, two and
three partition boundaries of a 4-partition pipe: one step with forward()
and backward(), then one step() per schedule, each checked against plain
training of the same weights. Exits with status 1 if a gradient differs by
more than 1e-4 of the largest gradient.

flags (--name value or --name=value):
  --width N          features of the input; the levels have 3/4, 1/2 and
                     1/4 of them (default 64, at least 4)
  --batch N          batch size (default 32)
  --microbatches N   M, micro-batches per batch (default 4)
  --checkpoint MODE  never, except_last or always (default except_last)
  --device D         cpu, cuda (partition j on GPU j mod count) or cuda:N
                     (default cuda when present, else cpu)
  --seed N           seed of weights and data (default 0)
  --help             this text
)";

Flags parse_flags(int argc, char** argv) {
  Flags flags;
  for_each_flag(
      argc,
      argv,
      kProgram,
      kUsage,
      [&](const std::string& name, const std::string& value) {
        if (name == "width") {
          flags.width = parse_int(kProgram, name, value, 4);
        } else if (name == "batch") {
          flags.batch = parse_int(kProgram, name, value, 1);
        } else if (name == "microbatches") {
          flags.microbatches = parse_int(kProgram, name, value, 1);
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
        } else {
          usage_error(kProgram, "unknown flag (got: --" + name + ")");
        }
      });
  return flags;
}

/// An encoder level: Linear(in, out) and tanh. Stashes its output as
/// "skip" for the decoder level of its namespace. Cloneable, so that the
/// plain reference can be a deep copy (namespace included).
struct DownImpl : torch::nn::Cloneable<DownImpl>, gpipe::skip::Skippable {
  DownImpl(int64_t in_, int64_t out_)
      : Skippable(/*stashes=*/{"skip"}, /*pops=*/{}), in(in_), out(out_) {
    reset();
  }
  void reset() override {
    linear = register_module("linear", torch::nn::Linear(in, out));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto y = torch::tanh(linear(x));
    stash("skip", y);
    return y;
  }
  int64_t in;
  int64_t out;
  torch::nn::Linear linear{nullptr};
};
TORCH_MODULE(Down);

/// A decoder level: Linear(in, out) and tanh, plus the "skip" its encoder
/// level stashed (of width `out`).
struct UpImpl : torch::nn::Cloneable<UpImpl>, gpipe::skip::Skippable {
  UpImpl(int64_t in_, int64_t out_)
      : Skippable(/*stashes=*/{}, /*pops=*/{"skip"}), in(in_), out(out_) {
    reset();
  }
  void reset() override {
    linear = register_module("linear", torch::nn::Linear(in, out));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return torch::tanh(linear(x)) + pop("skip");
  }
  int64_t in;
  int64_t out;
  torch::nn::Linear linear{nullptr};
};
TORCH_MODULE(Up);

struct Model {
  torch::nn::Sequential seq;
  std::vector<std::string> labels; // per layer, for the layout
};

std::string linear_label(const char* kind, int64_t in, int64_t out) {
  return std::string(kind) + "(" + std::to_string(in) + " -> " +
      std::to_string(out) + ")";
}

/// Widths w, 3w/4, w/2, w/4:
///   layer 0 Down(l1)  1 Down(l2)  2 Down(l3)  3 Mid
///         4 Up(l3)    5 Up(l2)    6 Up(l1)    7 Head
Model make_unet(int64_t width, uint64_t seed) {
  torch::manual_seed(seed);
  const std::vector<int64_t> w = {width, width * 3 / 4, width / 2, width / 4};
  Model model{torch::nn::Sequential(), {}};
  for (size_t level = 1; level <= 3; ++level) {
    Down down(w[level - 1], w[level]);
    gpipe::skip::isolate(down, "l" + std::to_string(level));
    model.seq->push_back(down);
    model.labels.push_back(linear_label("Down", w[level - 1], w[level]));
  }
  model.seq->push_back(torch::nn::Linear(w[3], w[3]));
  model.labels.push_back(linear_label("Mid", w[3], w[3]));
  for (size_t level = 3; level >= 1; --level) {
    // The input of Up(l) is the output of the level below (Mid for l3).
    const int64_t in = level == 3 ? w[3] : w[level + 1];
    Up up(in, w[level]);
    gpipe::skip::isolate(up, "l" + std::to_string(level));
    model.seq->push_back(up);
    model.labels.push_back(linear_label("Up", in, w[level]));
  }
  model.seq->push_back(torch::nn::Linear(w[1], w[0]));
  model.labels.push_back(linear_label("Head", w[1], w[0]));
  return model;
}

/// The layers, their partitions and devices, and where each skip goes.
void print_layout(
    const Model& model,
    const std::vector<int64_t>& balance,
    const std::vector<torch::Device>& devices) {
  std::vector<int64_t> partition_of;
  for (size_t j = 0; j < balance.size(); ++j) {
    partition_of.insert(
        partition_of.end(),
        static_cast<size_t>(balance[j]),
        static_cast<int64_t>(j));
  }
  struct Ends {
    std::string name;
    int64_t stashed_by = -1;
    int64_t popped_by = -1;
  };
  std::vector<Ends> skips;
  std::cout << "\nLayers:\n";
  for (size_t k = 0; k < model.seq->size(); ++k) {
    const auto j = static_cast<size_t>(partition_of[k]);
    std::string role;
    if (const auto* skippable = dynamic_cast<const gpipe::skip::Skippable*>(
            model.seq->ptr(k).get())) {
      for (const auto& name : skippable->stashes()) {
        role += "  stashes '" + skippable->qualified(name) + "'";
        skips.push_back(
            {skippable->qualified(name), static_cast<int64_t>(k), -1});
      }
      for (const auto& name : skippable->pops()) {
        role += "  pops '" + skippable->qualified(name) + "'";
        for (auto& ends : skips) {
          if (ends.name == skippable->qualified(name)) {
            ends.popped_by = static_cast<int64_t>(k);
          }
        }
      }
    }
    char line[160];
    std::snprintf(
        line,
        sizeof(line),
        "  layer %zu  partition %zu (%s)  %-18s%s\n",
        k,
        j,
        devices[j].str().c_str(),
        model.labels[k].c_str(),
        role.c_str());
    std::cout << line;
  }
  std::cout << "Skips, each sent straight from its stashing partition to its "
               "popping one:\n";
  for (const auto& ends : skips) {
    const int64_t from = partition_of[static_cast<size_t>(ends.stashed_by)];
    const int64_t to = partition_of[static_cast<size_t>(ends.popped_by)];
    std::cout << "  '" << ends.name << "': layer " << ends.stashed_by
              << " -> layer " << ends.popped_by << ", partition " << from
              << " -> " << to << ", crosses " << (to - from) << " boundar"
              << (to - from == 1 ? "y" : "ies") << "\n";
  }
}

/// The largest |difference| between the gradients of two models' parameters
/// (same order), on the CPU.
double largest_difference(
    const std::vector<torch::Tensor>& actual,
    const std::vector<torch::Tensor>& expected) {
  double difference = 0;
  for (size_t k = 0; k < actual.size(); ++k) {
    difference = std::max(
        difference,
        (actual[k].grad().to(torch::kCPU) - expected[k].grad().to(torch::kCPU))
            .abs()
            .max()
            .item<double>());
  }
  return difference;
}

} // namespace

int main(int argc, char** argv) {
  const Flags flags = parse_flags(argc, argv);
  try {
    const std::string device_flag = flags.device.empty()
        ? (torch::cuda::is_available() ? "cuda" : "cpu")
        : flags.device;
    if (device_flag != "cpu" && !torch::cuda::is_available()) {
      usage_error(
          kProgram, "no CUDA device is present (device: " + device_flag + ")");
    }
    std::vector<torch::Device> devices;
    for (int64_t j = 0; j < kPartitions; ++j) {
      if (device_flag == "cuda") {
        devices.emplace_back(
            torch::kCUDA,
            static_cast<c10::DeviceIndex>(j % torch::cuda::device_count()));
      } else {
        devices.emplace_back(device_flag);
      }
    }
    // Lanes: one per CUDA device, one for all CPU partitions.
    std::vector<torch::Device> unique_devices;
    for (const auto& device : devices) {
      if (std::find(unique_devices.begin(), unique_devices.end(), device) ==
          unique_devices.end()) {
        unique_devices.push_back(device);
      }
    }
    const auto lanes = static_cast<int64_t>(unique_devices.size());

    // Partition 0: Down(l1), Down(l2)   partition 1: Down(l3), Mid
    // partition 2: Up(l3), Up(l2)       partition 3: Up(l1), Head
    const std::vector<int64_t> balance = {2, 2, 2, 2};
    const auto mode = checkpoint_of(flags.checkpoint);
    Model model = make_unet(flags.width, flags.seed);
    std::cout << "A U-Net of Linear layers through GPipe: width " << flags.width
              << ", batch " << flags.batch << ", K=" << kPartitions
              << " partitions, M=" << flags.microbatches
              << " micro-batches, checkpoint " << flags.checkpoint << ", on "
              << device_flag << "\n";
    print_layout(model, balance, devices);

    // The plain reference: a deep copy (namespaces included), on the CPU,
    // trained once on the whole batch.
    auto plain = std::dynamic_pointer_cast<torch::nn::SequentialImpl>(
        model.seq->clone());
    torch::manual_seed(flags.seed + 1);
    const auto clean = torch::randn({flags.batch, flags.width});
    const auto noisy = clean + 0.1 * torch::randn({flags.batch, flags.width});
    const auto plain_loss = torch::mse_loss(plain->forward(noisy), clean);
    plain_loss.backward();
    const auto plain_parameters = plain->parameters();
    double largest_grad = 0;
    for (const auto& p : plain_parameters) {
      largest_grad =
          std::max(largest_grad, p.grad().abs().max().item<double>());
    }
    const double tolerance = 1e-4 * std::max(largest_grad, 1e-30);

    gpipe::GPipe<torch::nn::Sequential> pipe(
        model.seq,
        gpipe::GPipeOptions(kPartitions)
            .balance(balance)
            .microbatches(flags.microbatches)
            .checkpoint(mode)
            .devices(devices));
    auto loss_fn = [](const torch::Tensor& out, const torch::Tensor& target) {
      return torch::mse_loss(out, target);
    };

    std::cout << "\nOne training step each, against plain training (loss "
              << plain_loss.item<double>() << ", largest |grad| "
              << largest_grad << "):\n";
    bool all_pass = true;
    const std::vector<std::optional<gpipe::Schedule>> runs = {
        std::nullopt,
        gpipe::Schedule::FillDrain,
        gpipe::Schedule::OneFOneB,
        gpipe::Schedule::Interleaved1F1B,
        gpipe::Schedule::ZeroBubbleH1,
        gpipe::Schedule::LoopedBFS};
    for (const auto& schedule : runs) {
      const std::string name = schedule
          ? std::string("step() ") + gpipe::to_string(*schedule)
          : std::string("forward()+backward()");
      if (schedule == gpipe::Schedule::Interleaved1F1B &&
          kPartitions % lanes != 0) {
        std::cout << "  " << name << ": skipped (interleaved 1F1B needs the "
                  << "same number of partitions on each of the " << lanes
                  << " lanes)\n";
        continue;
      }
      model.seq->zero_grad();
      double loss = 0;
      if (schedule) {
        pipe->options.schedule(*schedule);
        loss = pipe->step(noisy, clean, loss_fn).item<double>();
      } else {
        const auto out = pipe->forward(noisy);
        const auto batch_loss = loss_fn(out, clean.to(out.device()));
        batch_loss.backward();
        loss = batch_loss.item<double>();
      }
      const double difference =
          largest_difference(model.seq->parameters(), plain_parameters);
      const bool pass = difference <= tolerance;
      all_pass &= pass;
      char line[200];
      std::snprintf(
          line,
          sizeof(line),
          "  %-26s loss %.6f   largest |grad difference| %.3e (tolerance %.1e)  %s\n",
          name.c_str(),
          loss,
          difference,
          tolerance,
          pass ? "PASS" : "FAIL");
      std::cout << line;
    }
    if (!all_pass) {
      std::cerr << "unet: the pipe's gradients differ from plain training\n";
      return 1;
    }
    std::cout << "\nEvery run trains like plain training.\n";
  } catch (const c10::Error& e) {
    std::cerr << "unet: " << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "unet: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
