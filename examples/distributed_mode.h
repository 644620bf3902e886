// The giant MLP across processes, launched by torchrun: `giant_mlp
// --distributed [flags]` and `distributed_mlp [flags]` both run it.
//
//   PYTHONPATH=~/.cache/gpipe/torch-2.11.0 python3 -m torch.distributed.run \
//       --standalone --nproc-per-node 4 --no-python
//       ./build/examples/giant_mlp --distributed
//
// Every rank builds the same seeded model and keeps its stage; the first
// step's gradients are checked against single-process plain training of the
// global batch (each rank checks its own stage); then it trains and prints
// per-rank step times. Rank 0 ends with one JSON line, the format that
// benchmarks/distributed_vs_pipelining.py reads. Exits 1 when a gradient
// differs from plain training.
#pragma once

#include "flags.h"

#include <gpipe/chart.h>
#include <gpipe/distributed.h>

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <functional>
#include <iomanip>
#include <iostream>
#include <memory>
#include <numeric>
#include <sstream>
#include <string>
#include <sys/resource.h>
#include <vector>

namespace gpipe_example::distributed_mode {

constexpr const char* kProgram = "distributed_mlp";
constexpr const char* kUsage =
    "usage: giant_mlp --distributed [flags], or distributed_mlp [flags],\n"
    "under torchrun (one process per rank)\n"
    "  --schedule NAME      fill_drain (or gpipe), 1f1b, interleaved, zero_bubble,\n"
    "                       looped_bfs, interleaved_zero_bubble, zero_bubble_v,\n"
    "                       dual_pipe_v (the last four and interleaved: 2 stages\n"
    "                       per rank), auto (searched for the costs the first\n"
    "                       step measures)\n"
    "  --layers N           Linear+ReLU blocks (default 8)\n"
    "  --width N            features (default 256)\n"
    "  --batch N            samples per replica and step (default 64)\n"
    "  --microbatches N     (default 8)\n"
    "  --stages N           ranks per pipeline; 0: the world size (default 0)\n"
    "  --checkpoint MODE    never, except_last, always (default never)\n"
    "  --steps N            timed steps (default 5)\n"
    "  --warmup N           untimed steps first (default 1)\n"
    "  --check 0|1          check the first step's gradients (default 1)\n"
    "  --device cpu|cuda    where each rank computes; cuda is cuda:LOCAL_RANK\n"
    "                       (default cpu)\n"
    "  --backend NAME       auto (NCCL for CUDA, else the pipe's own\n"
    "                       sockets), gloo, nccl, sockets (the pipe's own\n"
    "                       TCP connections)\n"
    "                       (default auto)\n"
    "  --match-by-order 0|1 Gloo on CPUs: match messages by order, as NCCL\n"
    "                       does, once a batch shape is known (default 0)\n"
    "  --picture FILE       the last step's schedule, gathered from every rank\n"
    "                       (SVG, written by rank 0; none: no picture;\n"
    "                       default distributed_mlp_schedule.svg)\n"
    "  --compare-in-process 0|1\n"
    "                       rank 0 also times the same pipe in one process, a\n"
    "                       thread per stage: what crossing processes costs\n"
    "  --ping-pong N        before training, bounce one micro-batch's\n"
    "                       activation N times (receives posted first):\n"
    "                       ranks 0 and 1 alone, then every pair of ranks at\n"
    "                       once; report both one-way latencies and the\n"
    "                       step's critical path in messages (default 0)\n"
    "  --fail-in-first-attempt 0|1\n"
    "                       the last rank's loss function throws in torchrun's\n"
    "                       first attempt (shows a restart; default 0)\n";

struct Flags {
  gpipe::Schedule schedule = gpipe::Schedule::FillDrain;
  std::string schedule_name = "gpipe";
  int64_t layers = 8;
  int64_t width = 256;
  int64_t batch = 64;
  int64_t microbatches = 8;
  int64_t stages = 0;
  gpipe::Checkpoint checkpoint = gpipe::Checkpoint::Never;
  int64_t steps = 5;
  int64_t warmup = 1;
  bool check = true;
  bool fail_in_first_attempt = false;
  std::string picture = "distributed_mlp_schedule.svg";
  bool compare_in_process = false;
  torch::DeviceType device = torch::kCPU;
  gpipe::distributed::Backend backend = gpipe::distributed::Backend::Auto;
  bool match_by_order = false;
  int64_t ping_pong = 0;
};

inline Flags parse_flags(int argc, char** argv) {
  using gpipe_example::parse_int;
  Flags flags;
  gpipe_example::for_each_flag(
      argc,
      argv,
      kProgram,
      kUsage,
      [&](const std::string& name, const std::string& value) {
        if (name == "schedule") {
          flags.schedule_name = value;
          if (value == "fill_drain" || value == "gpipe") {
            flags.schedule = gpipe::Schedule::FillDrain;
          } else if (value == "1f1b") {
            flags.schedule = gpipe::Schedule::OneFOneB;
          } else if (value == "interleaved") {
            flags.schedule = gpipe::Schedule::Interleaved1F1B;
          } else if (value == "zero_bubble") {
            flags.schedule = gpipe::Schedule::ZeroBubbleH1;
          } else {
            try {
              flags.schedule = gpipe::parse_schedule(value);
            } catch (const c10::Error&) {
              gpipe_example::usage_error(
                  kProgram, "unknown --schedule (got: " + value + ")");
            }
          }
        } else if (name == "layers") {
          flags.layers = parse_int(kProgram, name, value, 1);
        } else if (name == "width") {
          flags.width = parse_int(kProgram, name, value, 1);
        } else if (name == "batch") {
          flags.batch = parse_int(kProgram, name, value, 1);
        } else if (name == "microbatches") {
          flags.microbatches = parse_int(kProgram, name, value, 1);
        } else if (name == "stages") {
          flags.stages = parse_int(kProgram, name, value, 0);
        } else if (name == "checkpoint") {
          if (value != "never" && value != "except_last" && value != "always") {
            gpipe_example::usage_error(
                kProgram, "unknown --checkpoint (got: " + value + ")");
          }
          flags.checkpoint = gpipe_example::checkpoint_of(value);
        } else if (name == "steps") {
          flags.steps = parse_int(kProgram, name, value, 1);
        } else if (name == "warmup") {
          flags.warmup = parse_int(kProgram, name, value, 0);
        } else if (name == "check") {
          flags.check = parse_int(kProgram, name, value, 0) != 0;
        } else if (name == "compare-in-process") {
          flags.compare_in_process = parse_int(kProgram, name, value, 0) != 0;
        } else if (name == "device") {
          if (value != "cpu" && value != "cuda") {
            gpipe_example::usage_error(
                kProgram, "unknown --device (got: " + value + ")");
          }
          flags.device = value == "cuda" ? torch::kCUDA : torch::kCPU;
        } else if (name == "backend") {
          using gpipe::distributed::Backend;
          if (value == "auto") {
            flags.backend = Backend::Auto;
          } else if (value == "gloo") {
            flags.backend = Backend::Gloo;
          } else if (value == "nccl") {
            flags.backend = Backend::Nccl;
          } else if (value == "sockets") {
            flags.backend = Backend::Sockets;
          } else {
            gpipe_example::usage_error(
                kProgram, "unknown --backend (got: " + value + ")");
          }
        } else if (name == "ping-pong") {
          flags.ping_pong = parse_int(kProgram, name, value, 0);
        } else if (name == "match-by-order") {
          flags.match_by_order = parse_int(kProgram, name, value, 0) != 0;
        } else if (name == "picture") {
          flags.picture = value;
        } else if (name == "fail-in-first-attempt") {
          flags.fail_in_first_attempt =
              parse_int(kProgram, name, value, 0) != 0;
        } else {
          gpipe_example::usage_error(
              kProgram, "unknown flag (got: --" + name + ")");
        }
      });
  return flags;
}

inline torch::nn::Sequential make_model(const Flags& flags) {
  torch::manual_seed(0);
  torch::nn::Sequential seq;
  for (int64_t l = 0; l < flags.layers; ++l) {
    seq->push_back(torch::nn::Linear(flags.width, flags.width));
    seq->push_back(torch::nn::ReLU());
  }
  return seq;
}

inline double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

/// Point-to-point messages between two ranks, as the pipe sends them.
struct PointToPoint {
  std::function<c10::intrusive_ptr<c10d::Work>(torch::Tensor&, int, int)> send;
  std::function<c10::intrusive_ptr<c10d::Work>(torch::Tensor&, int, int)> recv;
};

/// Messages over the World's Gloo group, or, for --backend sockets, over
/// connections like the pipe's own (Note [Messages over the pipe's own
/// sockets]) between ranks 2r and 2r + 1.
inline PointToPoint point_to_point(
    gpipe::distributed::World& world,
    const Flags& flags) {
  if (flags.backend != gpipe::distributed::Backend::Sockets) {
    auto group = world.group();
    return {
        [group](torch::Tensor& t, int peer, int tag) {
          std::vector<torch::Tensor> tensors{t};
          return group->send(tensors, peer, tag);
        },
        [group](torch::Tensor& t, int peer, int tag) {
          std::vector<torch::Tensor> tensors{t};
          return group->recv(tensors, peer, tag);
        }};
  }
  const int64_t peer = world.rank() ^ 1;
  auto sockets = std::make_shared<gpipe::distributed::detail::PeerSockets>(
      world,
      "distributed_mlp/ping_pong/",
      peer < world.size() ? std::vector<int64_t>{peer}
                          : std::vector<int64_t>{});
  return {
      [sockets](torch::Tensor& t, int to, int tag) {
        return sockets->send(t, to, tag);
      },
      [sockets](torch::Tensor& t, int from, int tag) {
        return sockets->recv(t, from, tag);
      }};
}

/// The one-way latency of one micro-batch's activation between two ranks
/// over `messages`, in microseconds (median over `rounds` round trips,
/// halved), with each receive posted before its message is sent: the least
/// a message of the pipe can cost. Ranks 0 and 1 bounce it while the others
/// wait, or, with `every_pair`, ranks 2r and 2r + 1 all at once, as busy as
/// a step keeps the machine. Rank 0's figure is returned (0 elsewhere).
inline double one_way_latency_us(
    gpipe::distributed::World& world,
    const PointToPoint& messages,
    const Flags& flags,
    int64_t rounds,
    bool every_pair) {
  const int64_t rows = std::max<int64_t>(1, flags.batch / flags.microbatches);
  auto group = world.group();
  const int64_t rank = world.rank();
  const int peer = static_cast<int>(rank ^ 1);
  const bool bounces = peer < world.size() && (every_pair || rank <= 1);
  std::vector<double> trips;
  if (bounces) {
    const bool first = rank % 2 == 0;
    auto out = torch::ones({rows, flags.width});
    auto in = torch::empty({rows, flags.width});
    constexpr int kTag = 4242;
    auto pending = messages.recv(in, peer, kTag);
    group->barrier()->wait();
    // Each end posts its next receive before it sends, and the last round
    // receives without posting another, so none is left posted.
    for (int64_t k = 0; k < rounds + 5; ++k) {
      const bool last = k + 1 == rounds + 5;
      const auto start = std::chrono::steady_clock::now();
      if (first) {
        messages.send(out, peer, kTag)->wait();
        pending->wait();
        if (!last) {
          pending = messages.recv(in, peer, kTag);
        }
      } else {
        pending->wait();
        if (!last) {
          pending = messages.recv(in, peer, kTag);
        }
        messages.send(out, peer, kTag)->wait();
      }
      if (k >= 5) { // after warm-up
        trips.push_back(std::chrono::duration<double, std::micro>(
                            std::chrono::steady_clock::now() - start)
                            .count());
      }
    }
  } else {
    group->barrier()->wait();
  }
  group->barrier()->wait();
  return rank == 0 && !trips.empty() ? median(trips) / 2.0 : 0.0;
}

inline std::string get(c10d::Store& store, const std::string& key) {
  const auto value = store.get(key);
  return {value.begin(), value.end()};
}

inline void set(
    c10d::Store& store,
    const std::string& key,
    const std::string& text) {
  store.set(key, std::vector<uint8_t>(text.begin(), text.end()));
}

/// The median step of the same model and batch as one process's pipe, a
/// lane (thread) per stage: the in-process baseline of a distributed step.
inline double in_process_step_ms(
    const Flags& flags,
    int64_t stages,
    int64_t steps) {
  auto model = make_model(flags);
  // The ranks' placement on lanes: a lane per rank, each running its
  // stages.
  const int64_t n = stages * gpipe::stages_per_lane(flags.schedule);
  gpipe::GPipe<torch::nn::Sequential> pipe(
      model,
      gpipe::GPipeOptions(n)
          .microbatches(flags.microbatches)
          .schedule(flags.schedule)
          .checkpoint(flags.checkpoint)
          .concurrent_cpu_partitions(true)
          .lanes(gpipe::schedule_placement(flags.schedule, n, stages)));
  torch::manual_seed(1);
  const auto x = torch::randn({flags.batch, flags.width});
  const auto y = torch::randn({flags.batch, flags.width});
  const auto loss_fn = [](const torch::Tensor& out, const torch::Tensor& t) {
    return torch::mse_loss(out, t);
  };
  std::vector<double> times;
  for (int64_t k = 0; k < flags.warmup + steps; ++k) {
    pipe->zero_grad();
    const auto start = std::chrono::steady_clock::now();
    pipe->step(x, y, loss_fn);
    if (k >= flags.warmup) {
      times.push_back(std::chrono::duration<double, std::milli>(
                          std::chrono::steady_clock::now() - start)
                          .count());
    }
  }
  return median(times);
}

/// Rank 0: every rank's events of the last step (replica 0's pipeline)
/// drawn next to the schedule's theory, into `flags.picture`.
inline void draw_schedule(
    gpipe::distributed::World& world,
    gpipe::distributed::DistributedGPipeImpl& pipe,
    const Flags& flags) {
  std::vector<gpipe::TimelineEvent> events;
  for (int64_t r = 0; r < pipe.stages(); ++r) {
    std::istringstream lines(
        get(*world.store(), "distributed_mlp/timeline/" + std::to_string(r)));
    gpipe::TimelineEvent event;
    int phase = 0;
    while (lines >> event.partition >> event.microbatch >> phase >>
           event.start_us >> event.end_us) {
      event.phase = static_cast<gpipe::Phase>(phase);
      events.push_back(event);
    }
  }
  const int64_t n = pipe.stages() * pipe.options.stages_per_rank();
  auto measured = gpipe::measured_schedule(
      events,
      "Measured step, " + std::to_string(pipe.stages()) + " ranks (" +
          flags.schedule_name + ", M=" + std::to_string(flags.microbatches) +
          ")");
  for (int64_t s = 0; s < static_cast<int64_t>(measured.row_labels.size());
       ++s) {
    measured.row_labels[static_cast<size_t>(s)] = "stage " + std::to_string(s) +
        " (rank " + std::to_string(s % pipe.stages()) + ")";
  }
  const auto theory =
      gpipe::theoretical_schedule(flags.schedule, n, flags.microbatches);
  std::ofstream(flags.picture) << gpipe::render_svg({theory, measured});
  std::cout << "schedule of the last step (theory and measured): "
            << flags.picture << " (measured bubble " << std::setprecision(3)
            << gpipe::bubble_fraction(measured) << ")\n";
}

inline int train(const Flags& flags) {
  auto world = gpipe::distributed::World::connect();
  std::cout << "rank " << world->rank() << " of " << world->size()
            << ": attempt " << world->attempt() << std::endl;
  const int64_t stages = flags.stages == 0 ? world->size() : flags.stages;
  auto model = make_model(flags);
  auto reference =
      std::dynamic_pointer_cast<torch::nn::SequentialImpl>(model->clone());
  gpipe::distributed::DistributedGPipe pipe(
      world,
      model,
      gpipe::distributed::DistributedOptions(stages)
          .microbatches(flags.microbatches)
          .schedule(flags.schedule)
          .stages_per_rank(gpipe::stages_per_lane(flags.schedule))
          .checkpoint(flags.checkpoint)
          .device(flags.device)
          .backend(flags.backend)
          .match_by_order(flags.match_by_order));
  model = nullptr; // this rank keeps only its own stages
  const bool inject = flags.fail_in_first_attempt && world->attempt() == 0 &&
      world->rank() == world->size() - 1;
  int64_t losses = 0;
  const auto loss_fn = [&](const torch::Tensor& out, const torch::Tensor& y) {
    if (inject && ++losses > flags.microbatches) { // after the first step
      throw std::runtime_error("injected failure (--fail-in-first-attempt)");
    }
    return torch::mse_loss(out, y);
  };
  torch::manual_seed(1);
  const int64_t global = flags.batch * pipe->replicas();
  const auto x = torch::randn({global, flags.width});
  const auto y = torch::randn({global, flags.width});
  const auto shard_x = x.narrow(0, pipe->replica() * flags.batch, flags.batch);
  const auto shard_y = y.narrow(0, pipe->replica() * flags.batch, flags.batch);
  const auto step = [&] {
    pipe->zero_grad();
    return pipe->step(
        pipe->is_first() ? shard_x : torch::Tensor(),
        pipe->is_last() ? shard_y : torch::Tensor(),
        loss_fn);
  };

  // The floor of a step: its critical path in messages (the program run
  // with free computation and unit messages) times one message's latency.
  double one_way_us = 0;
  double one_way_busy_us = 0;
  double critical_messages = 0;
  if (flags.ping_pong > 0 && world->size() >= 2) {
    const auto messages = point_to_point(*world, flags);
    one_way_us =
        one_way_latency_us(*world, messages, flags, flags.ping_pong, false);
    one_way_busy_us =
        one_way_latency_us(*world, messages, flags, flags.ping_pong, true);
    gpipe::Costs costs;
    costs.F = costs.B = costs.I = costs.W = 0;
    costs.comm = 1;
    critical_messages =
        gpipe::simulate(
            pipe->program_for(std::min(flags.microbatches, flags.batch)), costs)
            .makespan;
  }

  bool matches = true;
  if (flags.check) {
    const auto loss = step();
    loss_fn(reference->forward(x), y).backward();
    auto want = reference->named_parameters();
    double worst = 0;
    double scale = 0;
    for (const auto& p : pipe->named_parameters()) {
      const auto& q = want[p.key()].grad();
      worst = std::max(
          worst,
          (p.value().grad().to(torch::kCPU) - q).abs().max().item<double>());
      scale = std::max(scale, q.abs().max().item<double>());
    }
    const double tolerance = 1e-5 * std::max(1.0, scale);
    matches = worst <= tolerance;
    std::cout << "rank " << world->rank() << ": gradients of stages ["
              << c10::Join(", ", pipe->my_stages())
              << "] against plain training of the global batch: largest "
              << "difference " << worst << " (tolerance " << tolerance << ") "
              << (matches ? "OK" : "FAIL") << std::endl;
  }
  reference = nullptr;

  for (int64_t k = 0; k < flags.warmup; ++k) {
    step();
  }
  world->group()->barrier()->wait();
  std::vector<double> times;
  torch::Tensor loss;
  const auto begin = std::chrono::steady_clock::now();
  const bool draw = flags.picture != "none";
  auto timeline = std::make_shared<gpipe::Timeline>();
  for (int64_t k = 0; k < flags.steps; ++k) {
    if (draw && k + 1 == flags.steps) {
      // The last step is recorded; the barrier aligns the ranks' clocks.
      world->group()->barrier()->wait();
      timeline->clear();
      pipe->set_timeline(timeline);
    }
    const auto start = std::chrono::steady_clock::now();
    loss = step();
    times.push_back(std::chrono::duration<double, std::milli>(
                        std::chrono::steady_clock::now() - start)
                        .count());
  }
  const double mean = std::chrono::duration<double, std::milli>(
                          std::chrono::steady_clock::now() - begin)
                          .count() /
      static_cast<double>(flags.steps);
  pipe->set_timeline(nullptr);
  if (draw) {
    std::ostringstream events;
    for (const auto& event : timeline->events()) {
      events << event.partition << " " << event.microbatch << " "
             << static_cast<int>(event.phase) << " " << event.start_us << " "
             << event.end_us << "\n";
    }
    set(*world->store(),
        "distributed_mlp/timeline/" + std::to_string(world->rank()),
        events.str());
  }
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  auto& store = *world->store();
  std::ostringstream mine;
  mine << std::fixed << std::setprecision(2) << median(times) << " "
       << static_cast<double>(usage.ru_maxrss) / 1024.0 << " "
       << (matches ? 1 : 0);
  set(store, "distributed_mlp/" + std::to_string(world->rank()), mine.str());
  if (world->rank() == 0) {
    std::vector<std::string> rss;
    std::cout << "rank  stages        median step ms  peak RSS MB\n";
    for (int64_t r = 0; r < world->size(); ++r) {
      std::istringstream theirs(
          get(store, "distributed_mlp/" + std::to_string(r)));
      double ms = 0;
      double mb = 0;
      int ok = 1;
      theirs >> ms >> mb >> ok;
      matches = matches && ok == 1;
      rss.push_back(std::to_string(mb));
      std::cout << std::setw(4) << r << "  stage " << std::setw(3) << r % stages
                << "  " << std::setw(16) << ms << "  " << std::setw(11) << mb
                << "\n";
    }
    std::cout << "loss of the last step: " << loss.item<double>() << "\n";
    std::cout << "tensors between ranks: "
              << (pipe->uses_nccl()          ? "NCCL"
                      : pipe->uses_sockets() ? "the pipe's own sockets"
                                             : "Gloo")
              << " on " << pipe->options.device().type()
              << ", last step's messages "
              << (pipe->last_step_by_order() ? "matched by order"
                                             : "matched by tag")
              << "\n";
    if (draw) {
      draw_schedule(*world, *pipe, flags);
    }
    if (flags.compare_in_process && pipe->replicas() == 1) {
      const double local = in_process_step_ms(flags, stages, flags.steps);
      std::cout << "the same step in one process, a thread per stage: " << local
                << " ms; across " << world->size()
                << " processes: " << median(times) << " ms (ratio "
                << median(times) / local << ")\n";
    }
    std::cout << "{\"impl\":\"gpipe\",\"schedule\":\"" << flags.schedule_name
              << "\",\"layers\":" << flags.layers
              << ",\"width\":" << flags.width << ",\"batch\":" << flags.batch
              << ",\"microbatches\":" << flags.microbatches
              << ",\"steps\":" << flags.steps << ",\"step_ms_mean\":" << mean
              << ",\"step_ms_median\":" << median(times)
              << ",\"one_way_us\":" << one_way_us
              << ",\"one_way_busy_us\":" << one_way_busy_us
              << ",\"critical_path_messages\":" << critical_messages
              << ",\"peak_rss_mb\":[" << c10::Join(",", rss) << "]}"
              << std::endl;
  }
  world->group()->barrier()->wait(); // rank 0 may host the store
  return matches ? 0 : 1;
}

/// The distributed mode's whole program; exits non-zero on a failure, so
/// that torchrun --max-restarts restarts the job.
inline int main(int argc, char** argv) {
  const Flags flags = parse_flags(argc, argv);
  torch::set_num_threads(1);
  try {
    return train(flags);
  } catch (const std::exception& e) {
    // Non-zero, so that torchrun --max-restarts restarts the job.
    std::string message = e.what();
    std::cerr << kProgram << ": " << message.substr(0, message.find('\n'))
              << std::endl;
    return 1;
  }
}

} // namespace gpipe_example::distributed_mode
