// A schedule searched for the model at hand against every fixed schedule,
// under the same memory limit (issue 23).
//
// Four stages, one per lane, M micro-batches (8 and 16). Each scenario gives
// the stages their costs:
//  - equal: layers that sleep U ms in F, in I and in W on every stage;
//  - unequal: the same, stage s scaled by {1.3, 0.8, 1.1, 0.6};
//  - split: F = U on every stage, I and W apart: W-heavy stages (I 0.5 U,
//    W 1.5 U) and I-heavy ones (I 1.5 U, W 0.5 U), each stage scaled as in
//    unequal;
//  - giant_mlp: examples/giant_mlp.cpp's model (Linear+ReLU blocks) cut with
//    an uneven balance, its F, I and W per stage measured from a
//    ZeroBubbleH1 step recorded with a gpipe::Timeline (the median slice per
//    partition and phase; a recompute counts into I).
// Memory limits, in micro-batch activations per lane: 1F1B's peak (K on lane
// 0) and twice that. For every fixed schedule that runs on the placement and
// fits the limit, and for search_schedule's program: the simulated makespan,
// the measured one (the best of --steps steps after --warmup; in one process
// the steps go round the programs, so that other load on the machine falls
// on all alike), their ratio, the lanes busy on average (compute over
// makespan), and the lower bound (the busiest lane's own work). Sleeping
// stages leave the cores free, so their lanes overlap as they would on four
// devices; the giant MLP's four lanes share this machine's cores, which the
// simulation knows nothing of (its busy lanes say how far that goes).
//
// Nothing timed is checked: the numbers are printed (and written with
// --json). What is deterministic is checked, and a failure exits 1 with a
// FAIL line: every reported program is valid and fits its limit, the
// searched one's messages go by order, its simulated makespan is what
// search_schedule says and no longer than the best fixed schedule's, and
// the lower bound is below it.
//
//   schedule_search_benchmark                  every scenario, M = 8 and 16
//   schedule_search_benchmark --quick          the short form ctest runs
//   torchrun --nproc-per-node 4 --no-python schedule_search_benchmark
//       --distributed                          the same on 4 Gloo ranks
#include "bench_support.h"

#include <gpipe/gpipe.h>
#include <gpipe/ordered_messages.h>
#include <gpipe/search.h>
#include <gpipe/timeline.h>
#include <gpipe/trace.h>
#if GPIPE_BENCH_DISTRIBUTED
#include <gpipe/distributed.h>
#endif

#include <c10/util/StringUtil.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iostream>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace {

using gpipe::Costs;
using gpipe::Program;
using gpipe::Schedule;
using Clock = std::chrono::steady_clock;
using Pipe = gpipe::GPipe<torch::nn::Sequential>;

const char* const kProgram = "schedule_search_benchmark";

const char* const kUsage =
    R"(usage: schedule_search_benchmark [flags]

A schedule searched for the stages' measured costs (gpipe::search_schedule)
against every fixed schedule under the same memory limit: K = 4 stages on 4
lanes, per scenario and M, the simulated and measured makespans, their
ratio, and the lower bound (the busiest lane's own work). Prints a table per
scenario, M and limit, then a summary against issue 23's goals. Timings are
printed, never checked; exits 1 (a FAIL line) only when a reported program
is invalid, over its limit, or the search is slower than a fixed schedule in
simulation.

flags (--name value):
  --microbatches LIST  M values, comma separated (default 8,16)
  --scenarios LIST     equal, unequal, split, giant_mlp, comma separated
                       (default all four)
  --unit-ms U          the sleeping stages' base cost of F, I and W, in ms
                       (default 10)
  --steps N            timed steps per program; the best counts (default 3)
  --warmup N           untimed steps per program first (default 1)
  --rows N             samples per micro-batch (default 32)
  --mlp-width N        the giant MLP's features (default 512)
  --mlp-balance LIST   its Linear+ReLU blocks per stage (default 5,3,4,2)
  --checkpoint MODE    never, except_last or always for the giant MLP
                       (default never); a recompute counts into I
  --json PATH          write every number as JSON
  --quick              the short form ctest runs: M = 8, --unit-ms 2,
                       --steps 1, --rows 8, --mlp-width 64 (flags after it
                       override)
  --distributed        under torchrun with 4 ranks: the same on 4 Gloo
                       ranks, one stage per rank (rank 0 prints)
  --match-by-order 0|1 with --distributed: messages matched by order
                       (default 0, by tag)
  --help               this text

Across processes (4 ranks):
  PYTHONPATH=~/.cache/gpipe/torch-2.11.0 OMP_NUM_THREADS=1 python3 -m \
      torch.distributed.run --standalone --nproc-per-node 4 --no-python \
      build/benchmarks/schedule_search_benchmark --distributed
)";

constexpr int64_t kStages = 4;
const std::vector<int64_t> kLanes = {0, 1, 2, 3};
/// The unequal scenarios' stage scales.
const std::vector<double> kScales = {1.3, 0.8, 1.1, 0.6};

struct Flags {
  std::vector<int64_t> microbatches = {8, 16};
  std::vector<std::string> scenarios = {
      "equal",
      "unequal",
      "split",
      "giant_mlp"};
  double unit_ms = 10;
  int64_t steps = 3;
  int64_t warmup = 1;
  int64_t rows = 32;
  int64_t mlp_width = 512;
  std::vector<int64_t> mlp_balance = {5, 3, 4, 2};
  gpipe::Checkpoint checkpoint = gpipe::Checkpoint::Never;
  std::string json;
  bool quick = false;
  bool distributed = false;
  bool match_by_order = false;
};

std::vector<std::string> split_list(const std::string& text) {
  std::vector<std::string> items;
  std::stringstream stream(text);
  std::string item;
  while (std::getline(stream, item, ',')) {
    items.push_back(item);
  }
  return items;
}

int64_t parse_count(
    const std::string& name,
    const std::string& value,
    int64_t least) {
  try {
    size_t used = 0;
    const int64_t n = std::stoll(value, &used);
    if (used == value.size() && n >= least) {
      return n;
    }
  } catch (const std::exception&) {
  }
  gpipe_bench::flag_error(
      kProgram,
      "--" + name + " needs an integer of at least " + std::to_string(least) +
          " (got: " + value + ")");
}

std::vector<int64_t> parse_counts(
    const std::string& name,
    const std::string& value,
    int64_t least) {
  std::vector<int64_t> counts;
  for (const auto& item : split_list(value)) {
    counts.push_back(parse_count(name, item, least));
  }
  if (counts.empty()) {
    gpipe_bench::flag_error(kProgram, "--" + name + " needs a value");
  }
  return counts;
}

Flags parse_flags(int argc, char** argv) {
  Flags flags;
  gpipe_bench::for_each_flag(
      argc,
      argv,
      kProgram,
      kUsage,
      {"quick", "distributed"},
      [&](const std::string& name, const std::string& value) {
        if (name == "microbatches") {
          flags.microbatches = parse_counts(name, value, 1);
        } else if (name == "scenarios") {
          flags.scenarios = split_list(value);
          for (const auto& scenario : flags.scenarios) {
            if (scenario != "equal" && scenario != "unequal" &&
                scenario != "split" && scenario != "giant_mlp") {
              gpipe_bench::flag_error(
                  kProgram,
                  "--scenarios takes equal, unequal, split, giant_mlp (got: " +
                      scenario + ")");
            }
          }
        } else if (name == "unit-ms") {
          char* end = nullptr;
          flags.unit_ms = std::strtod(value.c_str(), &end);
          if (end == value.c_str() || *end != '\0' || !(flags.unit_ms > 0)) {
            gpipe_bench::flag_error(
                kProgram,
                "--unit-ms needs a positive number (got: " + value + ")");
          }
        } else if (name == "steps") {
          flags.steps = parse_count(name, value, 1);
        } else if (name == "warmup") {
          flags.warmup = parse_count(name, value, 0);
        } else if (name == "rows") {
          flags.rows = parse_count(name, value, 1);
        } else if (name == "mlp-width") {
          flags.mlp_width = parse_count(name, value, 1);
        } else if (name == "mlp-balance") {
          flags.mlp_balance = parse_counts(name, value, 1);
          if (static_cast<int64_t>(flags.mlp_balance.size()) != kStages) {
            gpipe_bench::flag_error(
                kProgram,
                "--mlp-balance needs one block count per stage (stages: 4, "
                "got: " +
                    value + ")");
          }
        } else if (name == "checkpoint") {
          if (value == "never") {
            flags.checkpoint = gpipe::Checkpoint::Never;
          } else if (value == "except_last") {
            flags.checkpoint = gpipe::Checkpoint::ExceptLast;
          } else if (value == "always") {
            flags.checkpoint = gpipe::Checkpoint::Always;
          } else {
            gpipe_bench::flag_error(
                kProgram,
                "--checkpoint is never, except_last or always (got: " + value +
                    ")");
          }
        } else if (name == "json") {
          flags.json = value;
        } else if (name == "quick") {
          flags.quick = true;
          flags.microbatches = {8};
          flags.unit_ms = 2;
          flags.steps = 1;
          flags.rows = 8;
          flags.mlp_width = 64;
        } else if (name == "distributed") {
          flags.distributed = true;
        } else if (name == "match-by-order") {
          flags.match_by_order = parse_count(name, value, 0) != 0;
        } else {
          gpipe_bench::flag_error(kProgram, "unknown flag --" + name);
        }
      });
  return flags;
}

// ---------------------------------------------------------------------------
// The stages: layers that sleep, and the giant MLP.

/// y = x * w, sleeping f_us in forward, i_us in the input gradient and w_us
/// in the weight gradient, each only when the engine asks for it (as
/// tests/executor_test.cpp's SleepyScale, with the times per layer).
struct SleepyScale : torch::autograd::Function<SleepyScale> {
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx,
      const torch::Tensor& x,
      const torch::Tensor& w,
      int64_t f_us,
      int64_t i_us,
      int64_t w_us) {
    std::this_thread::sleep_for(std::chrono::microseconds(f_us));
    ctx->save_for_backward({x, w});
    ctx->saved_data["i_us"] = i_us;
    ctx->saved_data["w_us"] = w_us;
    return {x * w};
  }
  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx,
      torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    torch::Tensor gx;
    torch::Tensor gw;
    if (ctx->needs_input_grad(0)) {
      std::this_thread::sleep_for(
          std::chrono::microseconds(ctx->saved_data["i_us"].toInt()));
      gx = grads[0] * saved[1];
    }
    if (ctx->needs_input_grad(1)) {
      std::this_thread::sleep_for(
          std::chrono::microseconds(ctx->saved_data["w_us"].toInt()));
      gw = (grads[0] * saved[0]).sum(0);
    }
    return {gx, gw, torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

struct SleepyLayerImpl : torch::nn::Module {
  explicit SleepyLayerImpl(const Costs& ms)
      : w(register_parameter("w", torch::ones({2}))),
        f_us(std::llround(ms.F * 1000)),
        i_us(std::llround(ms.I * 1000)),
        w_us(std::llround(ms.W * 1000)) {}
  torch::Tensor forward(const torch::Tensor& x) {
    return SleepyScale::apply(x, w, f_us, i_us, w_us)[0];
  }
  torch::Tensor w;
  int64_t f_us;
  int64_t i_us;
  int64_t w_us;
};
TORCH_MODULE(SleepyLayer);

/// What a scenario runs: its model, balance, input and costs.
struct Scenario {
  std::string name;
  /// One line: where the costs come from.
  std::string about;
  /// Stages of one cost? (goal: searched <= 1.0 x best fixed; else 0.9 x.)
  bool equal = false;
  /// Sleeping stages (costs exact); else the giant MLP (costs measured).
  bool sleeps = true;
  /// Per stage, in ms: given, or measured per M for the giant MLP.
  std::vector<Costs> costs;
};

Costs costs_of(double f, double i, double w) {
  return Costs{f, i + w, i, w, 0.0};
}

Scenario sleeping_scenario(const std::string& name, double u) {
  Scenario scenario;
  scenario.name = name;
  char about[160];
  if (name == "equal") {
    scenario.equal = true;
    scenario.costs.assign(kStages, costs_of(u, u, u));
    std::snprintf(
        about, sizeof(about), "sleeping stages, F = I = W = %g ms", u);
  } else if (name == "unequal") {
    for (const double scale : kScales) {
      scenario.costs.push_back(costs_of(scale * u, scale * u, scale * u));
    }
    std::snprintf(
        about,
        sizeof(about),
        "sleeping stages, F = I = W = %g ms x {1.3, 0.8, 1.1, 0.6}",
        u);
  } else { // split
    for (int64_t s = 0; s < kStages; ++s) {
      const double scale = kScales[static_cast<size_t>(s)];
      const bool w_heavy = s % 2 == 0;
      scenario.costs.push_back(costs_of(
          scale * u,
          scale * u * (w_heavy ? 0.5 : 1.5),
          scale * u * (w_heavy ? 1.5 : 0.5)));
    }
    std::snprintf(
        about,
        sizeof(about),
        "sleeping stages x {1.3, 0.8, 1.1, 0.6}, F = %g ms; stages 0, 2 "
        "W-heavy (I 0.5, W 1.5), 1, 3 I-heavy (I 1.5, W 0.5)",
        u);
  }
  scenario.about = about;
  return scenario;
}

torch::nn::Sequential sleepy_model(const std::vector<Costs>& costs) {
  torch::nn::Sequential model;
  for (const auto& c : costs) {
    model->push_back(SleepyLayer(c));
  }
  return model;
}

/// examples/giant_mlp.cpp's model as distributed_mode.h builds it:
/// Linear(width, width) + ReLU blocks, seeded.
torch::nn::Sequential mlp_model(int64_t blocks, int64_t width) {
  torch::manual_seed(0);
  torch::nn::Sequential model;
  for (int64_t b = 0; b < blocks; ++b) {
    model->push_back(torch::nn::Linear(width, width));
    model->push_back(torch::nn::ReLU());
  }
  return model;
}

/// Everything the pipes of one scenario share.
struct Workload {
  const Scenario* scenario = nullptr;
  const Flags* flags = nullptr;

  int64_t width() const {
    return scenario->sleeps ? 2 : flags->mlp_width;
  }
  torch::nn::Sequential model() const {
    if (scenario->sleeps) {
      return sleepy_model(scenario->costs);
    }
    int64_t blocks = 0;
    for (const int64_t b : flags->mlp_balance) {
      blocks += b;
    }
    return mlp_model(blocks, flags->mlp_width);
  }
  /// Modules per stage (a block is a Linear and a ReLU).
  std::vector<int64_t> balance() const {
    if (scenario->sleeps) {
      return std::vector<int64_t>(kStages, 1);
    }
    std::vector<int64_t> modules;
    for (const int64_t b : flags->mlp_balance) {
      modules.push_back(2 * b);
    }
    return modules;
  }
  gpipe::Checkpoint checkpoint() const {
    return scenario->sleeps ? gpipe::Checkpoint::Never : flags->checkpoint;
  }
  /// The batch of m micro-batches; the sleeping stages' input wants its
  /// gradient, so that stage 0 sleeps in I as the others do.
  std::pair<torch::Tensor, torch::Tensor> batch(int64_t m) const {
    torch::manual_seed(1);
    auto x = torch::randn({m * flags->rows, width()});
    const auto y = torch::randn({m * flags->rows, width()});
    if (scenario->sleeps) {
      x.requires_grad_(true);
    }
    return {x, y};
  }
};

torch::Tensor mse(const torch::Tensor& out, const torch::Tensor& target) {
  return torch::mse_loss(out, target);
}

/// Per stage, the median F, I (a recompute added) and W slice of `events`,
/// in ms.
std::vector<Costs> costs_from_events(
    const std::vector<gpipe::TimelineEvent>& events) {
  std::map<std::pair<int64_t, gpipe::Phase>, std::vector<double>> slices;
  for (const auto& event : events) {
    slices[{event.partition, event.phase}].push_back(
        (event.end_us - event.start_us) / 1000.0);
  }
  auto median_of = [&](int64_t s, gpipe::Phase phase) {
    const auto found = slices.find({s, phase});
    return found == slices.end() ? 0.0 : gpipe_bench::median(found->second);
  };
  std::vector<Costs> costs;
  for (int64_t s = 0; s < kStages; ++s) {
    const double f = median_of(s, gpipe::Phase::Forward);
    const double i = median_of(s, gpipe::Phase::BackwardInput) +
        median_of(s, gpipe::Phase::Recompute);
    const double w = median_of(s, gpipe::Phase::BackwardWeight);
    costs.push_back(costs_of(f, i, w));
  }
  return costs;
}

// ---------------------------------------------------------------------------
// Where programs run: lanes of one process, or ranks.

/// A program's measured step.
struct Measured {
  /// The best step's wall time, in ms (NaN: not run).
  double ms = std::numeric_limits<double>::quiet_NaN();
  /// The same step's compute slices summed over lanes, in ms: busy / ms is
  /// how many lanes computed at once on average.
  double busy_ms = std::numeric_limits<double>::quiet_NaN();
};

/// The summed length of the compute slices (forward, backward and its
/// halves, recompute) of `events`, in ms.
double busy_ms_of(const std::vector<gpipe::TimelineEvent>& events) {
  double busy = 0;
  for (const auto& event : events) {
    if (event.phase != gpipe::Phase::Copy) {
      busy += (event.end_us - event.start_us) / 1000.0;
    }
  }
  return busy;
}

/// A program to measure, and the fixed schedule it is, if any.
struct ToRun {
  Program program;
  std::optional<Schedule> fixed;
};

/// Runs programs and measures them; one per mode.
struct Bench {
  virtual ~Bench() = default;
  /// Whether this process prints and writes (rank 0).
  virtual bool prints() const = 0;
  /// "4 CPU lanes in one process", "4 Gloo ranks".
  virtual std::string where() const = 0;
  /// The giant MLP's per-stage costs, from a ZeroBubbleH1 step of m
  /// micro-batches recorded with a timeline.
  virtual std::vector<Costs> measure_costs(const Workload& work, int64_t m) = 0;
  /// Per program (all of one micro-batch count), the best of flags.steps
  /// steps after flags.warmup, each step recorded with a timeline; NaN
  /// where it cannot run here.
  virtual std::vector<Measured> measure(
      const Workload& work,
      const std::vector<ToRun>& programs) = 0;
};

/// What time_steps saw: per timed step its wall time and compute slices,
/// in ms, and every timed step's slices.
struct Timed {
  std::vector<double> ms;
  std::vector<double> busy_ms;
  std::vector<gpipe::TimelineEvent> events;
};

/// Times one `step` into `timed`, recorded alone on `timeline` (attached to
/// the pipe that steps).
void time_step(
    Timed& timed,
    gpipe::Timeline& timeline,
    const std::function<void()>& step) {
  timeline.clear();
  const auto start = Clock::now();
  step();
  timed.ms.push_back(
      std::chrono::duration<double, std::milli>(Clock::now() - start).count());
  const auto events = timeline.events();
  timed.busy_ms.push_back(busy_ms_of(events));
  timed.events.insert(timed.events.end(), events.begin(), events.end());
}

/// Runs `step` flags.warmup times, then flags.steps times, each recorded
/// alone on a timeline attached to `pipe` (a GPipe or a DistributedGPipe);
/// `line_up` runs before every step (across ranks, a barrier).
template <typename AnyPipe>
Timed time_steps(
    AnyPipe& pipe,
    const Flags& flags,
    const std::function<void()>& step,
    const std::function<void()>& line_up) {
  for (int64_t k = 0; k < flags.warmup; ++k) {
    line_up();
    step();
  }
  Timed timed;
  auto timeline = std::make_shared<gpipe::Timeline>();
  pipe->set_timeline(timeline);
  for (int64_t k = 0; k < flags.steps; ++k) {
    line_up();
    time_step(timed, *timeline, step);
  }
  pipe->set_timeline(nullptr);
  return timed;
}

/// The shortest of `times`, with its busy time.
Measured best_of(
    const std::vector<double>& times,
    const std::vector<double>& busy) {
  const auto k = static_cast<size_t>(
      std::min_element(times.begin(), times.end()) - times.begin());
  return {times[k], busy[k]};
}

struct InProcess : Bench {
  bool prints() const override {
    return true;
  }
  std::string where() const override {
    return "4 CPU lanes in one process";
  }
  static gpipe::GPipeOptions options(const Workload& work, int64_t m) {
    return gpipe::GPipeOptions(kStages)
        .microbatches(m)
        .balance(work.balance())
        .lanes(kLanes)
        .checkpoint(work.checkpoint());
  }
  std::vector<Costs> measure_costs(const Workload& work, int64_t m) override {
    Pipe pipe(work.model(), options(work, m).schedule(Schedule::ZeroBubbleH1));
    const auto [x, y] = work.batch(m);
    return costs_from_events(
        time_steps(
            pipe, *work.flags, [&] { pipe->step(x, y, mse); }, [] {})
            .events);
  }
  /// Every pipe is built and warmed up first; then the timed steps go round
  /// the programs (forwards, then backwards), so that what else the
  /// machine does meanwhile falls on all of them alike.
  std::vector<Measured> measure(
      const Workload& work,
      const std::vector<ToRun>& programs) override {
    if (programs.empty()) {
      return {};
    }
    const int64_t m = programs.front().program.microbatches;
    const auto [x, y] = work.batch(m);
    std::vector<Pipe> pipes;
    std::vector<std::shared_ptr<gpipe::Timeline>> timelines;
    for (const auto& run : programs) {
      pipes.emplace_back(work.model(), options(work, m).program(run.program));
      for (int64_t k = 0; k < work.flags->warmup; ++k) {
        pipes.back()->step(x, y, mse);
      }
      timelines.push_back(std::make_shared<gpipe::Timeline>());
      pipes.back()->set_timeline(timelines.back());
    }
    const size_t n = programs.size();
    std::vector<Timed> timed(n);
    for (int64_t round = 0; round < work.flags->steps; ++round) {
      for (size_t k = 0; k < n; ++k) {
        const size_t j = round % 2 == 0 ? k : n - 1 - k;
        time_step(timed[j], *timelines[j], [&] { pipes[j]->step(x, y, mse); });
      }
    }
    std::vector<Measured> measured;
    for (size_t j = 0; j < n; ++j) {
      pipes[j]->set_timeline(nullptr);
      measured.push_back(best_of(timed[j].ms, timed[j].busy_ms));
    }
    return measured;
  }
};

#if GPIPE_BENCH_DISTRIBUTED

namespace gd = gpipe::distributed;

struct AcrossRanks : Bench {
  explicit AcrossRanks(std::shared_ptr<gd::World> world)
      : world_(std::move(world)) {}

  bool prints() const override {
    return world_->rank() == 0;
  }
  std::string where() const override {
    return "4 Gloo ranks, one stage each";
  }

  gd::DistributedOptions options(const Workload& work, int64_t m) const {
    return gd::DistributedOptions(kStages)
        .microbatches(m)
        .balance(work.balance())
        .checkpoint(work.checkpoint())
        .backend(gd::Backend::Gloo)
        .match_by_order(work.flags->match_by_order);
  }

  /// Runs one step; the first rank feeds the input, the last the target.
  static void step(
      gd::DistributedGPipe& pipe,
      const torch::Tensor& x,
      const torch::Tensor& y) {
    pipe->step(
        pipe->is_first() ? x : torch::Tensor(),
        pipe->is_last() ? y : torch::Tensor(),
        mse);
  }

  std::vector<Costs> measure_costs(const Workload& work, int64_t m) override {
    gd::DistributedGPipe pipe(
        world_,
        work.model(),
        options(work, m).schedule(Schedule::ZeroBubbleH1));
    const auto [x, y] = work.batch(m);
    const auto timed = time_steps(
        pipe, *work.flags, [&] { step(pipe, x, y); }, [] {});
    // Each rank knows its own stage; a sum over ranks of rows left zero
    // elsewhere gives every rank the same numbers.
    const auto mine = costs_from_events(timed.events);
    auto table = torch::zeros({kStages, 3}, torch::kFloat64);
    for (const int64_t s : pipe->my_stages()) {
      const Costs& c = mine[static_cast<size_t>(s)];
      table[s][0] = c.F;
      table[s][1] = c.I;
      table[s][2] = c.W;
    }
    std::vector<torch::Tensor> tensors{table};
    world_->group()->allreduce(tensors)->wait();
    std::vector<Costs> costs;
    for (int64_t s = 0; s < kStages; ++s) {
      costs.push_back(costs_of(
          table[s][0].item<double>(),
          table[s][1].item<double>(),
          table[s][2].item<double>()));
    }
    return costs;
  }

  /// One pipe at a time on the World: each program in turn.
  std::vector<Measured> measure(
      const Workload& work,
      const std::vector<ToRun>& programs) override {
    std::vector<Measured> measured;
    for (const auto& run : programs) {
      measured.push_back(measure_one(work, run.program, run.fixed));
    }
    return measured;
  }

  Measured measure_one(
      const Workload& work,
      const Program& program,
      std::optional<Schedule> fixed) {
    // A fixed schedule by name, as its users give it; the searched program
    // as one's own (its lane_of_stage places the stages on the ranks).
    auto opts = options(work, program.microbatches);
    if (fixed) {
      opts.schedule(*fixed);
    } else {
      opts.program(program);
    }
    gd::DistributedGPipe pipe(world_, work.model(), opts);
    const auto [x, y] = work.batch(program.microbatches);
    // The barrier lines the ranks up; a step's makespan is the slowest
    // rank's time from there, its busy time every rank's.
    const auto timed = time_steps(
        pipe,
        *work.flags,
        [&] { step(pipe, x, y); },
        [&] { world_->group()->barrier()->wait(); });
    std::vector<torch::Tensor> slowest{
        torch::tensor(timed.ms, torch::kFloat64)};
    c10d::AllreduceOptions max;
    max.reduceOp = c10d::ReduceOp::MAX;
    world_->group()->allreduce(slowest, max)->wait();
    std::vector<torch::Tensor> summed{
        torch::tensor(timed.busy_ms, torch::kFloat64)};
    world_->group()->allreduce(summed)->wait();
    const auto as_vector = [](const torch::Tensor& t) {
      return std::vector<double>(
          t.data_ptr<double>(), t.data_ptr<double>() + t.numel());
    };
    return best_of(as_vector(slowest[0]), as_vector(summed[0]));
  }

  std::shared_ptr<gd::World> world_;
};

#endif // GPIPE_BENCH_DISTRIBUTED

// ---------------------------------------------------------------------------
// Programs, their simulations and the tables.

/// One program of a table.
struct Entry {
  std::string name; // "1f1b", "searched"
  std::string same_as; // a fixed schedule with the same program, if any
  std::optional<Schedule> schedule;
  Program program;
  double simulated_ms = 0;
  double peak = 0; // the most micro-batch activations a lane holds
  double measured_ms = std::numeric_limits<double>::quiet_NaN();
  /// Average lanes computing at once: the stages' work over the simulated
  /// makespan, and the measured step's compute slices over its time.
  double simulated_busy = 0;
  double measured_busy = std::numeric_limits<double>::quiet_NaN();
};

/// One scenario, M and memory limit.
struct Table {
  std::string scenario;
  bool equal = false;
  int64_t m = 0;
  double limit = 0;
  std::string limit_name;
  std::vector<Costs> costs;
  double lower_bound = 0;
  std::vector<Entry> fixed; // those that fit
  std::vector<std::string> left_out; // "fill_drain (peak 8)"
  Entry searched;
  std::string found_by;
  std::string best_fixed;
  double best_fixed_simulated = 0;
  double best_fixed_measured = 0;
};

std::string fixed_text(double value, int decimals) {
  if (!std::isfinite(value)) {
    return "n/a";
  }
  char text[32];
  std::snprintf(text, sizeof(text), "%.*f", decimals, value);
  return text;
}

std::string padded(const std::string& text, size_t width, bool right = true) {
  if (text.size() >= width) {
    return text;
  }
  const std::string pad(width - text.size(), ' ');
  return right ? pad + text : text + pad;
}

/// Counts what failed among the deterministic checks; prints each.
struct Checks {
  int failures = 0;
  void expect(bool ok, const std::string& what) {
    if (!ok) {
      ++failures;
      std::cout << "FAIL: " << what << std::endl;
    }
  }
};

/// Every stage's work for m micro-batches (F, I and W each m times), in ms.
double total_work(const std::vector<Costs>& costs, int64_t m) {
  double work = 0;
  for (const auto& c : costs) {
    work += static_cast<double>(m) * (c.F + c.I + c.W);
  }
  return work;
}

double lane_peak(const gpipe::Simulation& run) {
  const auto peaks = gpipe::detail::peak_memory(
      run, std::vector<double>(static_cast<size_t>(kStages), 1.0));
  return *std::max_element(peaks.begin(), peaks.end());
}

/// Every fixed schedule that runs on one stage per lane, simulated with
/// `costs`; the others named in `cannot` with why.
std::vector<Entry> fixed_entries(
    const std::vector<Costs>& costs,
    int64_t m,
    std::vector<std::string>& cannot) {
  std::vector<Entry> entries;
  for (const Schedule schedule : gpipe::kEverySchedule) {
    Entry entry;
    entry.name = gpipe::to_string(schedule);
    entry.schedule = schedule;
    try {
      entry.program = gpipe::build_program(schedule, kStages, m, kLanes);
    } catch (const c10::Error&) {
      cannot.push_back(entry.name);
      continue;
    }
    const auto run = gpipe::simulate(entry.program, costs);
    entry.simulated_ms = run.makespan;
    entry.simulated_busy = total_work(costs, m) / run.makespan;
    entry.peak = lane_peak(run);
    for (const auto& earlier : entries) {
      if (earlier.program == entry.program) {
        entry.same_as =
            earlier.same_as.empty() ? earlier.name : earlier.same_as;
        break;
      }
    }
    entries.push_back(std::move(entry));
  }
  return entries;
}

/// The tables of one scenario and M (one per limit), simulated and checked;
/// measured later.
std::vector<Table> plan(
    const Scenario& scenario,
    const std::vector<Costs>& costs,
    int64_t m,
    Checks& checks) {
  std::vector<std::string> cannot;
  const auto fixed = fixed_entries(costs, m, cannot);
  double one_f_one_b = 0;
  for (const auto& entry : fixed) {
    if (entry.schedule == Schedule::OneFOneB) {
      one_f_one_b = entry.peak;
    }
  }
  std::vector<Table> tables;
  for (const int twice : {1, 2}) {
    Table table;
    table.scenario = scenario.name;
    table.equal = scenario.equal;
    table.m = m;
    table.costs = costs;
    table.limit = twice * one_f_one_b;
    table.limit_name = twice == 1 ? "1F1B's peak" : "twice 1F1B's peak";
    table.lower_bound = gpipe::detail::lower_bound(costs, kLanes, kStages, m);
    table.best_fixed_simulated = std::numeric_limits<double>::infinity();
    for (const auto& entry : fixed) {
      if (entry.peak > table.limit + 1e-9) {
        table.left_out.push_back(
            entry.name + " (peak " + fixed_text(entry.peak, 0) + ")");
        continue;
      }
      table.fixed.push_back(entry);
      if (entry.simulated_ms < table.best_fixed_simulated - 1e-9) {
        table.best_fixed_simulated = entry.simulated_ms;
        table.best_fixed = entry.name;
      }
    }
    for (const auto& name : cannot) {
      table.left_out.push_back(name + " (not on one stage per lane)");
    }
    const std::string what = scenario.name + ", M " + std::to_string(m) +
        ", limit " + fixed_text(table.limit, 0);
    gpipe::SearchedSchedule found;
    try {
      found = gpipe::search_schedule(
          costs,
          kLanes,
          m,
          gpipe::SearchOptions().memory_limit(
              std::vector<double>(static_cast<size_t>(kStages), table.limit)));
    } catch (const c10::Error& e) {
      checks.expect(
          false,
          what + ": search_schedule threw " + e.what_without_backtrace());
      continue;
    }
    table.found_by = found.found_by;
    Entry& searched = table.searched;
    searched.name = "searched";
    searched.program = found.program;
    try {
      const auto run = gpipe::simulate(found.program, costs);
      searched.simulated_ms = run.makespan;
      searched.simulated_busy = total_work(costs, m) / run.makespan;
      searched.peak = lane_peak(run);
      gpipe::check_ordered_messages(
          gpipe::lower_for_ordered_messages(found.program));
    } catch (const c10::Error& e) {
      checks.expect(
          false,
          what + ": the searched program is invalid: " +
              e.what_without_backtrace());
      continue;
    }
    for (const auto& entry : fixed) {
      if (entry.program == found.program) {
        searched.same_as = entry.name;
        break;
      }
    }
    checks.expect(
        std::abs(searched.simulated_ms - found.makespan) <=
            1e-9 * std::max(1.0, found.makespan),
        what + ": simulate gives the searched program " +
            fixed_text(searched.simulated_ms, 6) + ", search_schedule said " +
            fixed_text(found.makespan, 6));
    checks.expect(
        searched.peak <= table.limit + 1e-9,
        what + ": the searched program holds " + fixed_text(searched.peak, 0) +
            " micro-batches on a lane, over the limit");
    checks.expect(
        searched.simulated_ms <= table.best_fixed_simulated + 1e-9,
        what + ": searched " + fixed_text(searched.simulated_ms, 3) +
            " is slower than " + table.best_fixed + " " +
            fixed_text(table.best_fixed_simulated, 3) + " in simulation");
    checks.expect(
        std::abs(found.lower_bound - table.lower_bound) <= 1e-9 &&
            table.lower_bound <= searched.simulated_ms + 1e-9,
        what + ": lower bound " + fixed_text(found.lower_bound, 3) +
            " is not below the searched makespan " +
            fixed_text(searched.simulated_ms, 3));
    tables.push_back(std::move(table));
  }
  return tables;
}

/// The table's programs: the fixed schedules that fit, then the searched.
std::vector<Entry*> entries_of(Table& table) {
  std::vector<Entry*> entries;
  for (auto& entry : table.fixed) {
    entries.push_back(&entry);
  }
  entries.push_back(&table.searched);
  return entries;
}

/// Measures every distinct program of `tables` once (a program under both
/// limits, or a fixed schedule that another one equals, runs once).
void measure_tables(
    Bench& bench,
    const Workload& work,
    std::vector<Table>& tables) {
  std::map<std::string, size_t> index; // by program text
  std::vector<ToRun> programs;
  for (auto& table : tables) {
    for (const Entry* entry : entries_of(table)) {
      const std::string key = gpipe::format_program(entry->program);
      if (index.emplace(key, programs.size()).second) {
        programs.push_back({entry->program, entry->schedule});
      }
    }
  }
  const auto measured = bench.measure(work, programs);
  for (auto& table : tables) {
    for (Entry* entry : entries_of(table)) {
      const Measured& mine =
          measured[index.at(gpipe::format_program(entry->program))];
      entry->measured_ms = mine.ms;
      entry->measured_busy = mine.busy_ms / mine.ms;
    }
    table.best_fixed_measured = std::numeric_limits<double>::quiet_NaN();
    for (const auto& entry : table.fixed) {
      if (entry.name == table.best_fixed) {
        table.best_fixed_measured = entry.measured_ms;
      }
    }
  }
}

std::string costs_text(const std::vector<Costs>& costs) {
  std::string text;
  for (size_t s = 0; s < costs.size(); ++s) {
    text += (s ? "; " : "") + std::string("stage ") + std::to_string(s) +
        " F " + fixed_text(costs[s].F, 2) + " I " + fixed_text(costs[s].I, 2) +
        " W " + fixed_text(costs[s].W, 2);
  }
  return text;
}

/// The program column: "interleaved_zero_bubble (= zero_bubble_h1)".
constexpr size_t kNameWidth = 44;

void print_table(const Table& table) {
  std::cout << "\n"
            << table.scenario << ", M = " << table.m << ", memory limit "
            << fixed_text(table.limit, 0) << " per lane (" << table.limit_name
            << "); lower bound " << fixed_text(table.lower_bound, 1) << " ms\n";
  std::cout << "  " << padded("program", kNameWidth, false) << padded("peak", 5)
            << padded("simulated ms", 14) << padded("measured ms", 13)
            << padded("meas/sim", 10) << padded("busy lanes sim/meas", 21)
            << "\n";
  auto row = [](const Entry& entry, const std::string& note) {
    std::string name = entry.name;
    if (!entry.same_as.empty()) {
      name += " (= " + entry.same_as + ")";
    }
    std::cout << "  " << padded(name, kNameWidth, false)
              << padded(fixed_text(entry.peak, 0), 5)
              << padded(fixed_text(entry.simulated_ms, 1), 14)
              << padded(fixed_text(entry.measured_ms, 1), 13)
              << padded(
                     fixed_text(entry.measured_ms / entry.simulated_ms, 3), 10)
              << padded(
                     fixed_text(entry.simulated_busy, 2) + " / " +
                         fixed_text(entry.measured_busy, 2),
                     21)
              << note << "\n";
  };
  for (const auto& entry : table.fixed) {
    row(entry, entry.name == table.best_fixed ? "  best fixed" : "");
  }
  row(table.searched, "  found by " + table.found_by);
  if (!table.left_out.empty()) {
    std::cout << "  left out: ";
    for (size_t k = 0; k < table.left_out.size(); ++k) {
      std::cout << (k ? ", " : "") << table.left_out[k];
    }
    std::cout << "\n";
  }
  const Entry& s = table.searched;
  std::cout << "  searched / best fixed (" << table.best_fixed
            << "): simulated "
            << fixed_text(s.simulated_ms / table.best_fixed_simulated, 3)
            << ", measured "
            << fixed_text(s.measured_ms / table.best_fixed_measured, 3)
            << "; searched / lower bound: simulated "
            << fixed_text(s.simulated_ms / table.lower_bound, 3)
            << ", measured " << fixed_text(s.measured_ms / table.lower_bound, 3)
            << "\n";
}

/// Issue 23's goals, over every table: what meets them and what misses.
void print_summary(const std::vector<Table>& tables, const std::string& where) {
  std::cout << "\nSummary (" << where
            << "): searched against the best fixed schedule under the same "
               "limit\n";
  std::cout << "  " << padded("scenario", 10, false) << padded("M", 4)
            << padded("limit", 6) << "  " << padded("best fixed", 24, false)
            << padded("fixed/LB sim", 13) << padded("s/fixed sim", 12)
            << padded("s/fixed meas", 13) << padded("s/LB sim", 10)
            << padded("s/LB meas", 10) << padded("worst meas/sim", 16) << "\n";
  // Goals, each counted in simulation and in measurement: [0] simulated,
  // [1] measured (tables whose searched program was measured).
  struct Goal {
    int met[2] = {0, 0};
    int of[2] = {0, 0};
    void count(int k, bool ok) {
      ++of[k];
      met[k] += ok;
    }
    std::string text() const {
      return std::to_string(met[0]) + " of " + std::to_string(of[0]) +
          " tables simulated, " + std::to_string(met[1]) + " of " +
          std::to_string(of[1]) + " measured";
    }
  };
  Goal unequal_speed;
  Goal equal_speed;
  Goal bound;
  int within = 0;
  std::set<std::string> programs; // scenario, M and program: each once
  for (const auto& table : tables) {
    const Entry& s = table.searched;
    double worst = 1;
    auto consider = [&](const Entry& entry) {
      const double ratio = entry.measured_ms / entry.simulated_ms;
      if (std::isfinite(ratio)) {
        if (programs
                .insert(
                    table.scenario + std::to_string(table.m) +
                    gpipe::format_program(entry.program))
                .second) {
          within += std::abs(ratio - 1) <= 0.15;
        }
        if (std::abs(ratio - 1) > std::abs(worst - 1)) {
          worst = ratio;
        }
      }
    };
    for (const auto& entry : table.fixed) {
      consider(entry);
    }
    consider(s);
    const double ratio = s.simulated_ms / table.best_fixed_simulated;
    const double measured_ratio = s.measured_ms / table.best_fixed_measured;
    Goal& speed = table.equal ? equal_speed : unequal_speed;
    const double target = table.equal ? 1.0 : 0.9;
    speed.count(0, ratio <= target + 1e-9);
    bound.count(0, s.simulated_ms <= 1.05 * table.lower_bound + 1e-9);
    if (std::isfinite(measured_ratio)) {
      speed.count(1, measured_ratio <= target);
      bound.count(1, s.measured_ms <= 1.05 * table.lower_bound);
    }
    std::cout << "  " << padded(table.scenario, 10, false)
              << padded(std::to_string(table.m), 4)
              << padded(fixed_text(table.limit, 0), 6) << "  "
              << padded(table.best_fixed, 24, false)
              << padded(
                     fixed_text(
                         table.best_fixed_simulated / table.lower_bound, 3),
                     13)
              << padded(fixed_text(ratio, 3), 12)
              << padded(fixed_text(measured_ratio, 3), 13)
              << padded(fixed_text(s.simulated_ms / table.lower_bound, 3), 10)
              << padded(fixed_text(s.measured_ms / table.lower_bound, 3), 10)
              << padded(fixed_text(worst, 3), 16) << "\n";
  }
  std::cout << "  goal searched <= 0.9 x best fixed, unequal stages: "
            << unequal_speed.text() << "\n"
            << "  goal searched <= 1.0 x best fixed, equal stages: "
            << equal_speed.text() << "\n"
            << "  goal searched within 5% of the lower bound: " << bound.text()
            << "\n"
            << "  goal measured within 15% of simulated: " << within << " of "
            << programs.size() << " programs measured (each scenario and M's "
            << "distinct programs)\n"
            << "  (no program beats the lower bound: searched / best fixed is "
               "at least LB / best fixed, 1 / fixed/LB)\n";
}

std::string costs_json(const std::vector<Costs>& costs) {
  using gpipe::detail::json_number;
  std::string json = "[";
  for (size_t s = 0; s < costs.size(); ++s) {
    json += std::string(s ? ", " : "") + "{\"F\": " + json_number(costs[s].F) +
        ", \"I\": " + json_number(costs[s].I) +
        ", \"W\": " + json_number(costs[s].W) + "}";
  }
  return json + "]";
}

std::string entry_json(const Entry& entry) {
  using gpipe::detail::json_number;
  using gpipe::detail::json_string;
  return "{\"name\": " + json_string(entry.name) +
      ", \"same_as\": " + json_string(entry.same_as) +
      ", \"peak\": " + json_number(entry.peak) +
      ", \"simulated_ms\": " + json_number(entry.simulated_ms) +
      ", \"measured_ms\": " + json_number(entry.measured_ms) +
      ", \"measured_over_simulated\": " +
      json_number(entry.measured_ms / entry.simulated_ms) +
      ", \"simulated_busy_lanes\": " + json_number(entry.simulated_busy) +
      ", \"measured_busy_lanes\": " + json_number(entry.measured_busy) + "}";
}

void write_json(
    const std::string& path,
    const Flags& flags,
    const std::string& where,
    const std::vector<Table>& tables) {
  using gpipe::detail::json_number;
  using gpipe::detail::json_string;
  std::string json = "{\n  \"where\": " + json_string(where) +
      ",\n  \"stages\": " + std::to_string(kStages) +
      ",\n  \"unit_ms\": " + json_number(flags.unit_ms) +
      ",\n  \"steps\": " + std::to_string(flags.steps) +
      ",\n  \"warmup\": " + std::to_string(flags.warmup) +
      ",\n  \"rows\": " + std::to_string(flags.rows) +
      ",\n  \"mlp_width\": " + std::to_string(flags.mlp_width) +
      ",\n  \"tables\": [\n";
  for (size_t t = 0; t < tables.size(); ++t) {
    const Table& table = tables[t];
    const Entry& s = table.searched;
    json += "    {\"scenario\": " + json_string(table.scenario) +
        ", \"microbatches\": " + std::to_string(table.m) +
        ", \"memory_limit\": " + json_number(table.limit) +
        ", \"stage_costs_ms\": " + costs_json(table.costs) +
        ", \"lower_bound_ms\": " + json_number(table.lower_bound) +
        ", \"best_fixed\": " + json_string(table.best_fixed) +
        ", \"found_by\": " + json_string(table.found_by) +
        ",\n     \"searched_over_best_fixed_simulated\": " +
        json_number(s.simulated_ms / table.best_fixed_simulated) +
        ", \"searched_over_best_fixed_measured\": " +
        json_number(s.measured_ms / table.best_fixed_measured) +
        ", \"searched_over_lower_bound_simulated\": " +
        json_number(s.simulated_ms / table.lower_bound) +
        ", \"searched_over_lower_bound_measured\": " +
        json_number(s.measured_ms / table.lower_bound) +
        ",\n     \"programs\": [";
    for (size_t k = 0; k < table.fixed.size(); ++k) {
      json += (k ? ",\n       " : "\n       ") + entry_json(table.fixed[k]);
    }
    json += ",\n       " + entry_json(s) + "]}";
    json += t + 1 < tables.size() ? ",\n" : "\n";
  }
  json += "  ]\n}\n";
  std::ofstream(path) << json;
}

int run(const Flags& flags, Bench& bench) {
  Checks checks;
  std::vector<Table> all;
  const bool out = bench.prints();
  if (out) {
    std::string load;
    std::getline(std::ifstream("/proc/loadavg"), load);
    std::cout << "schedule search against fixed schedules: K = " << kStages
              << ", one stage per lane, on " << bench.where() << " ("
              << std::thread::hardware_concurrency() << " cores, load average "
              << load.substr(0, load.find(' ')) << ")\n";
  }
  for (const auto& name : flags.scenarios) {
    Scenario scenario;
    if (name == "giant_mlp") {
      scenario.name = name;
      scenario.sleeps = false;
      scenario.about = "giant MLP, " + std::to_string(flags.mlp_width) +
          " features, Linear+ReLU blocks per stage {" +
          c10::Join(", ", flags.mlp_balance) + "}, " +
          std::to_string(flags.rows) + " samples per micro-batch, checkpoint " +
          gpipe::to_string(flags.checkpoint) +
          "; costs measured from a zero_bubble_h1 step";
    } else {
      scenario = sleeping_scenario(name, flags.unit_ms);
    }
    const Workload work{&scenario, &flags};
    for (const int64_t m : flags.microbatches) {
      if (!scenario.sleeps) {
        scenario.costs = bench.measure_costs(work, m);
      }
      if (out) {
        std::cout << "\n== " << scenario.name << " (" << scenario.about
                  << "), M = " << m
                  << "\n   stage costs in ms: " << costs_text(scenario.costs)
                  << "\n";
      }
      auto tables = plan(scenario, scenario.costs, m, checks);
      measure_tables(bench, work, tables);
      for (auto& table : tables) {
        if (out) {
          print_table(table);
        }
        all.push_back(std::move(table));
      }
    }
  }
  if (out) {
    print_summary(all, bench.where());
    if (!flags.json.empty()) {
      write_json(flags.json, flags, bench.where(), all);
      std::cout << "wrote " << flags.json << "\n";
    }
    std::cout
        << (checks.failures == 0
                ? "every reported program is valid and fits its limit; "
                  "searched <= best fixed in simulation everywhere\n"
                : std::to_string(checks.failures) + " check(s) failed\n");
  }
  return checks.failures == 0 ? 0 : 1;
}

} // namespace

int main(int argc, char** argv) {
  const Flags flags = parse_flags(argc, argv);
  // One intra-op thread: the lanes (or ranks) are the parallelism.
  torch::set_num_threads(1);
  try {
    if (flags.distributed) {
#if GPIPE_BENCH_DISTRIBUTED
      auto world = gpipe::distributed::World::connect();
      if (world->size() != kStages) {
        gpipe_bench::flag_error(
            kProgram,
            "--distributed runs on 4 ranks (world size: " +
                std::to_string(world->size()) + ")");
      }
      AcrossRanks bench(world);
      const int rc = run(flags, bench);
      world->group()->barrier()->wait(); // rank 0 may host the store
      return rc;
#else
      gpipe_bench::flag_error(
          kProgram,
          "--distributed needs a build with gpipe::distributed (Gloo's "
          "headers)");
#endif
    }
    InProcess bench;
    return run(flags, bench);
  } catch (const std::exception& e) {
    const std::string message = e.what();
    std::cerr << kProgram << ": " << message.substr(0, message.find('\n'))
              << std::endl;
    return 1;
  }
}
