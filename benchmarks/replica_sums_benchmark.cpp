// What summing the replicas' gradients in buckets during the last backward
// saves against summing them after the drain (Note [Replica sums overlap
// the drain]): two replicas of a 2-stage pipe under torchrun
// (--nproc-per-node 4), one pipe per bucket size on the same ranks, their
// steps interleaved so that whatever the machine does falls on all alike.
// A step's time is the slowest rank's, from a barrier; the figure is the
// median over pairs of each size's step time over the after-the-drain
// one's.
//
//   PYTHONPATH=~/.cache/gpipe/torch-2.11.0 OMP_NUM_THREADS=1 \
//   python3 -m torch.distributed.run --standalone --nproc-per-node 4 \
//     --no-python build/benchmarks/replica_sums_benchmark
#include "bench_support.h"

#include <gpipe/distributed.h>

#include <torch/torch.h>

#include <chrono>
#include <cstdint>
#include <iomanip>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace gd = gpipe::distributed;

namespace {

const char* const kProgram = "replica_sums_benchmark";

const char* const kUsage =
    "replica_sums_benchmark: replicas' gradient sums in buckets during the\n"
    "last backward against after the drain; run under torchrun with a\n"
    "multiple of 2 ranks (2 stages x replicas).\n"
    "  --blocks N        MLP blocks: LayerNorm, Linear, GELU, Linear (default 8)\n"
    "  --width N         (default 128; a block holds 8 * width^2 weights)\n"
    "  --tokens N        per sample (default 16)\n"
    "  --batch N         samples per replica (default 16)\n"
    "  --microbatches N  (default 4)\n"
    "  --schedule NAME   (default 1f1b)\n"
    "  --sizes A,B,...   bucket sizes in bytes, the first the baseline\n"
    "                    (default 0,1048576,65536; 0: after the drain)\n"
    "  --steps N         timed steps per bucket size (default 30)\n"
    "  --warmup N        untimed steps first (default 5)\n"
    "  --quick           tiny sizes and 3 steps (a smoke run)\n";

struct Flags {
  int64_t blocks = 8;
  int64_t width = 128;
  int64_t tokens = 16;
  int64_t batch = 16;
  int64_t microbatches = 4;
  gpipe::Schedule schedule = gpipe::Schedule::OneFOneB;
  int64_t steps = 30;
  int64_t warmup = 5;
  std::vector<int64_t> sizes = {0, 1 << 20, 1 << 16};
};

Flags parse(int argc, char** argv) {
  Flags flags;
  gpipe_bench::for_each_flag(
      argc,
      argv,
      kProgram,
      kUsage,
      {"quick"},
      [&](const std::string& name, const std::string& value) {
        const auto whole = [&](int64_t least = 1) {
          try {
            const int64_t n = std::stoll(value);
            if (n >= least) {
              return n;
            }
          } catch (const std::exception&) {
          }
          gpipe_bench::flag_error(
              kProgram,
              "--" + name + " needs a whole number >= " +
                  std::to_string(least) + " (got: " + value + ")");
        };
        if (name == "quick") {
          flags.blocks = 4;
          flags.width = 16;
          flags.tokens = 4;
          flags.batch = 4;
          flags.microbatches = 2;
          flags.steps = 3;
          flags.warmup = 1;
        } else if (name == "blocks") {
          flags.blocks = whole();
        } else if (name == "width") {
          flags.width = whole();
        } else if (name == "tokens") {
          flags.tokens = whole();
        } else if (name == "batch") {
          flags.batch = whole();
        } else if (name == "microbatches") {
          flags.microbatches = whole();
        } else if (name == "schedule") {
          flags.schedule = gpipe::parse_schedule(value);
        } else if (name == "sizes") {
          flags.sizes.clear();
          std::stringstream items(value);
          std::string item;
          while (std::getline(items, item, ',')) {
            try {
              flags.sizes.push_back(std::stoll(item));
            } catch (const std::exception&) {
              gpipe_bench::flag_error(
                  kProgram, "--sizes needs numbers (got: " + value + ")");
            }
          }
          if (flags.sizes.empty()) {
            gpipe_bench::flag_error(kProgram, "--sizes needs a size");
          }
        } else if (name == "steps") {
          flags.steps = whole();
        } else if (name == "warmup") {
          flags.warmup = whole(0);
        } else {
          gpipe_bench::flag_error(kProgram, "unknown flag --" + name);
        }
      });
  return flags;
}

torch::nn::Sequential make_model(const Flags& flags) {
  torch::manual_seed(0);
  torch::nn::Sequential model;
  for (int64_t b = 0; b < flags.blocks; ++b) {
    model->push_back(
        torch::nn::LayerNorm(torch::nn::LayerNormOptions({flags.width})));
    model->push_back(torch::nn::Linear(flags.width, 4 * flags.width));
    model->push_back(torch::nn::GELU());
    model->push_back(torch::nn::Linear(4 * flags.width, flags.width));
  }
  return model;
}

/// The slowest rank's time of each step, in milliseconds.
std::vector<double> slowest(gd::World& world, const std::vector<double>& ms) {
  std::vector<torch::Tensor> tensors{torch::tensor(ms, torch::kFloat64)};
  c10d::AllreduceOptions max;
  max.reduceOp = c10d::ReduceOp::MAX;
  world.group()->allreduce(tensors, max)->wait();
  const auto& t = tensors.front();
  return {t.data_ptr<double>(), t.data_ptr<double>() + t.numel()};
}

} // namespace

int main(int argc, char** argv) {
  const Flags flags = parse(argc, argv);
  torch::set_num_threads(1);
  auto world = gd::World::connect();
  const int64_t stages = 2;
  const std::vector<int64_t>& sizes = flags.sizes;
  std::vector<gd::DistributedGPipe> pipes;
  for (const int64_t bytes : sizes) {
    pipes.emplace_back(
        world,
        make_model(flags),
        gd::DistributedOptions(stages)
            .microbatches(flags.microbatches)
            .schedule(flags.schedule)
            .checkpoint(gpipe::Checkpoint::Never)
            .replica_bucket_bytes(bytes));
  }
  auto& first = *pipes.front();
  torch::manual_seed(1 + first.replica());
  const auto x = torch::randn({flags.batch, flags.tokens, flags.width});
  const auto y = torch::randn({flags.batch, flags.tokens, flags.width});
  const auto barrier = [&] { world->group()->barrier()->wait(); };
  const auto step = [&](gd::DistributedGPipe& pipe) {
    pipe->zero_grad();
    pipe->step(
        pipe->is_first() ? x : torch::Tensor(),
        pipe->is_last() ? y : torch::Tensor(),
        [](const torch::Tensor& out, const torch::Tensor& target) {
          return torch::mse_loss(out, target);
        });
  };
  for (int64_t w = 0; w < flags.warmup; ++w) {
    for (auto& pipe : pipes) {
      barrier();
      step(pipe);
    }
  }
  std::vector<std::vector<double>> ms(sizes.size());
  for (int64_t s = 0; s < flags.steps; ++s) {
    for (size_t k = 0; k < pipes.size(); ++k) {
      // Each size first in turn, so none always runs on a warmer cache.
      const size_t c = (k + static_cast<size_t>(s)) % pipes.size();
      barrier();
      const auto start = std::chrono::steady_clock::now();
      step(pipes[c]);
      ms[c].push_back(std::chrono::duration<double, std::milli>(
                          std::chrono::steady_clock::now() - start)
                          .count());
    }
  }
  for (auto& times : ms) {
    times = slowest(*world, times);
  }
  // Every rank's bucket counts of the last step, summed over the world.
  std::vector<std::vector<int64_t>> started;
  for (auto& pipe : pipes) {
    const auto sums = pipe->last_step_replica_sums();
    auto counts = torch::tensor(
        std::vector<int64_t>{
            sums.buckets,
            sums.during_backward,
            sums.after_backward,
            sums.after_drain},
        torch::kInt64);
    std::vector<torch::Tensor> tensors{counts};
    world->group()->allreduce(tensors)->wait();
    started.emplace_back(
        counts.data_ptr<int64_t>(), counts.data_ptr<int64_t>() + 4);
  }
  if (world->rank() == 0) {
    int64_t parameters = 0;
    for (const auto& p : first.parameters()) {
      parameters += p.numel();
    }
    std::cout << "replica sums, " << world->size() / stages << " replicas x "
              << stages << " stages, " << gpipe::to_string(flags.schedule)
              << ", " << flags.blocks << " blocks of width " << flags.width
              << " (" << parameters << " weights on rank 0), batch "
              << flags.batch << " x " << flags.tokens << " tokens per replica, "
              << flags.steps << " steps per size, interleaved\n";
    std::cout << "bucket bytes | step ms (median) | / the first size's "
                 "(median of pairs) | buckets: during B / after B / after "
                 "drain (all ranks)\n";
    for (size_t c = 0; c < sizes.size(); ++c) {
      std::cout << std::setw(12) << sizes[c] << " | " << std::setw(16)
                << std::fixed << std::setprecision(2)
                << gpipe_bench::median(ms[c]) << " | " << std::setw(34)
                << std::setprecision(3)
                << gpipe_bench::median_ratio(ms[c], ms[0]) << " | "
                << started[c][1] << " / " << started[c][2] << " / "
                << started[c][3] << " of " << started[c][0] << "\n"
                << std::defaultfloat;
    }
  }
  barrier();
  return 0;
}
