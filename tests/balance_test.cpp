// Balancing: the exact split against brute force, profiling by time (layers
// that sleep a known time) and by memory (layers of known sizes), the model
// left bit-identical by profiling, and the point of it all: a skewed model's
// step gets faster with balance_by_time, as fast as the cost model predicts.
#include "test_support.h"

#include <gpipe/balance.h>

#include <algorithm>
#include <chrono>
#include <iomanip>
#include <random>
#include <thread>

namespace balance_test {

using gpipe::Checkpoint;
using gpipe::GPipe;
using gpipe::GPipeOptions;
using gpipe::LayerMemory;
using gpipe::MemoryOptions;
using gpipe::Schedule;
using gpipe::TimeOptions;
using gpipe_test::error_of;

namespace {

/// Every split of `layers` into `partitions` non-empty runs, in
/// lexicographic order of the balance.
std::vector<std::vector<int64_t>> all_splits(
    int64_t layers,
    int64_t partitions) {
  std::vector<std::vector<int64_t>> splits;
  std::vector<int64_t> current;
  std::function<void(int64_t)> extend = [&](int64_t left) {
    const auto placed = static_cast<int64_t>(current.size());
    if (placed == partitions - 1) {
      current.push_back(left);
      splits.push_back(current);
      current.pop_back();
      return;
    }
    for (int64_t size = 1; size <= left - (partitions - placed - 1); ++size) {
      current.push_back(size);
      extend(left - size);
      current.pop_back();
    }
  };
  extend(layers);
  return splits;
}

/// The largest partition cost of `split` under `cost(j, begin, end)`.
template <typename Cost>
double bottleneck(const std::vector<int64_t>& split, Cost cost) {
  double most = 0;
  int64_t b = 0;
  for (size_t j = 0; j < split.size(); ++j) {
    most = std::max(most, cost(static_cast<int64_t>(j), b, b + split[j]));
    b += split[j];
  }
  return most;
}

/// The sum of squared partition costs: the tie-break, less is more even.
template <typename Cost>
double squares(const std::vector<int64_t>& split, Cost cost) {
  double sum = 0;
  int64_t b = 0;
  for (size_t j = 0; j < split.size(); ++j) {
    const double c = cost(static_cast<int64_t>(j), b, b + split[j]);
    sum += c * c;
    b += split[j];
  }
  return sum;
}

/// The split brute force picks: least bottleneck, then least squares, then
/// the first in lexicographic order. `allowed` filters the splits.
template <typename Cost, typename Allowed>
std::vector<int64_t> brute_force(
    int64_t layers,
    int64_t partitions,
    Cost cost,
    Allowed allowed) {
  std::vector<int64_t> chosen;
  double best = std::numeric_limits<double>::infinity();
  double best_squares = best;
  for (const auto& split : all_splits(layers, partitions)) {
    if (!allowed(split)) {
      continue;
    }
    const double value = bottleneck(split, cost);
    const double spread = squares(split, cost);
    if (value < best || (value == best && spread < best_squares)) {
      best = value;
      best_squares = spread;
      chosen = split;
    }
  }
  return chosen;
}

double sum_of(const std::vector<double>& costs, int64_t b, int64_t e) {
  double sum = 0;
  for (int64_t l = b; l < e; ++l) {
    sum += costs[static_cast<size_t>(l)];
  }
  return sum;
}

void sleep_ms(double ms) {
  std::this_thread::sleep_for(std::chrono::duration<double, std::milli>(ms));
}

/// Identity that sleeps `ms` in forward and again in backward.
struct Sleep : torch::autograd::Function<Sleep> {
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx,
      const torch::Tensor& x,
      double ms) {
    ctx->saved_data["ms"] = ms;
    sleep_ms(ms);
    return {x.clone()};
  }
  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx,
      torch::autograd::variable_list grads) {
    sleep_ms(ctx->saved_data["ms"].toDouble());
    return {grads[0], torch::Tensor()};
  }
};

/// A layer that takes `ms` in forward and `ms` in backward, with one
/// parameter so that its backward runs even as the first layer of a pipe.
struct SleepyImpl : torch::nn::Module {
  explicit SleepyImpl(double ms_) : ms(ms_) {
    weight = register_parameter("weight", torch::ones({1}));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return Sleep::apply(x * weight, ms)[0];
  }
  double ms;
  torch::Tensor weight;
};
TORCH_MODULE(Sleepy);

torch::nn::Sequential sleepy_model(const std::vector<double>& ms) {
  torch::nn::Sequential seq;
  for (const double t : ms) {
    seq->push_back(Sleepy(t));
  }
  return seq;
}

using Clock = std::chrono::steady_clock;

/// The median step time of `pipe` over `steps` steps after one warm-up.
double median_step_seconds(
    GPipe<torch::nn::Sequential>& pipe,
    const torch::Tensor& x,
    int steps) {
  auto loss_fn = [](const torch::Tensor& out, const torch::Tensor& y) {
    return torch::mse_loss(out, y);
  };
  pipe->step(x, x, loss_fn); // workers start on first use
  std::vector<double> times;
  for (int s = 0; s < steps; ++s) {
    const auto start = Clock::now();
    pipe->step(x, x, loss_fn);
    times.push_back(
        std::chrono::duration<double>(Clock::now() - start).count());
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

std::vector<torch::Tensor> state_of(const torch::nn::Sequential& seq) {
  std::vector<torch::Tensor> state;
  for (const auto& p : seq->parameters()) {
    state.push_back(p.detach().clone());
    state.push_back(p.grad().defined() ? p.grad().clone() : torch::Tensor());
  }
  for (const auto& b : seq->buffers()) {
    state.push_back(b.clone());
  }
  return state;
}

void expect_same_state(
    const std::vector<torch::Tensor>& actual,
    const std::vector<torch::Tensor>& expected,
    const std::string& what) {
  ASSERT_EQ(actual.size(), expected.size()) << what;
  for (size_t k = 0; k < actual.size(); ++k) {
    ASSERT_EQ(actual[k].defined(), expected[k].defined()) << what << " #" << k;
    if (actual[k].defined()) {
      EXPECT_TRUE(torch::equal(actual[k], expected[k])) << what << " #" << k;
    }
  }
}

/// Adds one to its parameter in place at every forward: the worst case for
/// "profiling leaves parameters as it found them".
struct MutatingImpl : torch::nn::Module {
  MutatingImpl() {
    weight = register_parameter("weight", torch::zeros({4}));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    {
      torch::NoGradGuard no_grad;
      weight.add_(1);
    }
    return x + weight;
  }
  torch::Tensor weight;
};
TORCH_MODULE(Mutating);

/// Linear, BatchNorm (running statistics), Dropout (the generator) and a
/// layer that writes its parameter, with some `.grad` set and some not.
torch::nn::Sequential stateful_model(const torch::Device& device) {
  torch::manual_seed(3);
  torch::nn::Sequential seq(
      torch::nn::Linear(4, 4),
      torch::nn::BatchNorm1d(4),
      torch::nn::Dropout(0.5),
      Mutating(),
      torch::nn::Linear(4, 4));
  seq->to(device);
  torch::mse_loss(
      seq->forward(torch::randn({8, 4}, device)), torch::zeros({8, 4}, device))
      .backward();
  seq[0]->as<torch::nn::Linear>()->bias.mutable_grad().reset();
  return seq;
}

void check_profiling_leaves_state(const torch::Device& device) {
  auto seq = stateful_model(device);
  const auto sample = torch::randn({8, 4}, device);
  const auto before = state_of(seq);
  const auto cpu_rng = torch::randn({1}); // draw once so states are non-trivial
  const auto cpu_state =
      at::globalContext().defaultGenerator(torch::kCPU).get_state();
  torch::Tensor device_state;
  if (device.is_cuda()) {
    device_state = at::globalContext().defaultGenerator(device).get_state();
  }
  const auto version = seq->parameters()[0]._version();

  (void)gpipe::profile_times(seq, sample, TimeOptions().warmup(1).repeats(3));
  (void)gpipe::profile_memory(seq, sample);
  (void)gpipe::balance_by_time(seq, sample, 2);
  (void)gpipe::balance_by_memory(seq, sample, 3, Checkpoint::Always, 4);

  expect_same_state(state_of(seq), before, "parameters, grads, buffers");
  EXPECT_FALSE(seq[0]->as<torch::nn::Linear>()->bias.grad().defined());
  EXPECT_EQ(seq->parameters()[0]._version(), version)
      << "an untouched parameter was written";
  EXPECT_TRUE(torch::equal(
      at::globalContext().defaultGenerator(torch::kCPU).get_state(),
      cpu_state));
  if (device.is_cuda()) {
    EXPECT_TRUE(torch::equal(
        at::globalContext().defaultGenerator(device).get_state(),
        device_state));
  }
}

} // namespace

TEST(Balance, ExactSplitMatchesBruteForceOnRandomCosts) {
  std::mt19937 rng(12);
  for (int trial = 0; trial < 400; ++trial) {
    const int64_t layers = std::uniform_int_distribution<int64_t>(1, 12)(rng);
    const int64_t partitions = std::uniform_int_distribution<int64_t>(
        1, std::min<int64_t>(6, layers))(rng);
    // Small integers (exact in double, so ties are real ties) on even
    // trials, reals on odd ones.
    std::vector<double> costs;
    for (int64_t l = 0; l < layers; ++l) {
      costs.push_back(
          trial % 2 == 0 ? static_cast<double>(
                               std::uniform_int_distribution<int>(0, 9)(rng))
                         : std::uniform_real_distribution<double>(0, 1)(rng));
    }
    auto cost = [&](int64_t, int64_t b, int64_t e) {
      return sum_of(costs, b, e);
    };
    const auto expected =
        brute_force(layers, partitions, cost, [](const auto&) { return true; });
    const auto balance = gpipe::balance_cost(costs, partitions);
    const std::string what = "trial " + std::to_string(trial) + " layers " +
        std::to_string(layers) + " partitions " + std::to_string(partitions);
    ASSERT_EQ(static_cast<int64_t>(balance.size()), partitions) << what;
    EXPECT_NEAR(bottleneck(balance, cost), bottleneck(expected, cost), 1e-9)
        << what;
    if (trial % 2 == 0) {
      // The tie-breaks: the most even, then the lexicographically smallest.
      EXPECT_EQ(balance, expected) << what;
    }
  }
}

TEST(Balance, TiesGoToTheMostEvenThenTheLexicographicallySmallestBalance) {
  // Bottleneck 4 in all of [1, 1, 3], [1, 2, 2], [1, 3, 1]; the middle one
  // is the most even (4, 2, 2).
  EXPECT_EQ(
      gpipe::balance_cost({4, 1, 1, 1, 1}, 3), (std::vector<int64_t>{1, 2, 2}));
  // Equally even: the lexicographically smallest.
  EXPECT_EQ(
      gpipe::balance_cost({1, 1, 1, 1}, 3), (std::vector<int64_t>{1, 1, 2}));
  EXPECT_EQ(gpipe::balance_cost({0, 0, 0}, 2), (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(gpipe::balance_cost({5, 1, 1, 1}, 2), (std::vector<int64_t>{1, 3}));
  EXPECT_EQ(gpipe::balance_cost({1, 1, 1, 5}, 2), (std::vector<int64_t>{3, 1}));
  EXPECT_EQ(gpipe::balance_cost({7}, 1), (std::vector<int64_t>{1}));
}

TEST(Balance, ExactSplitUnderAMemoryBudgetMatchesBruteForce) {
  std::mt19937 rng(7);
  const Checkpoint modes[] = {
      Checkpoint::Never, Checkpoint::ExceptLast, Checkpoint::Always};
  for (int trial = 0; trial < 200; ++trial) {
    const int64_t layers = std::uniform_int_distribution<int64_t>(1, 10)(rng);
    const int64_t partitions = std::uniform_int_distribution<int64_t>(
        1, std::min<int64_t>(5, layers))(rng);
    const int64_t m = std::uniform_int_distribution<int64_t>(1, 6)(rng);
    const Checkpoint checkpoint = modes[trial % 3];
    std::uniform_int_distribution<int64_t> bytes(0, 1000);
    std::vector<double> times;
    std::vector<LayerMemory> memory;
    for (int64_t l = 0; l < layers; ++l) {
      times.push_back(static_cast<double>(bytes(rng) % 10));
      LayerMemory layer;
      layer.parameter_bytes = bytes(rng);
      layer.gradient_bytes = layer.parameter_bytes / 2;
      layer.buffer_bytes = bytes(rng) / 10;
      layer.input_bytes = bytes(rng);
      layer.output_bytes = bytes(rng);
      layer.activation_bytes = bytes(rng);
      layer.backward_bytes = bytes(rng) / 2;
      memory.push_back(layer);
    }
    auto options =
        MemoryOptions()
            .optimizer_factor(trial % 4 == 0 ? 2.0 : 0.0)
            .schedule(trial % 5 < 2 ? Schedule::OneFOneB : Schedule::FillDrain);
    // Brute force: partition bytes from partition_memory, time sums by hand.
    const auto splits = all_splits(layers, partitions);
    int64_t smallest_budget = std::numeric_limits<int64_t>::max();
    for (const auto& split : splits) {
      const auto b =
          gpipe::partition_memory(memory, split, checkpoint, m, options);
      smallest_budget =
          std::min(smallest_budget, *std::max_element(b.begin(), b.end()));
    }
    const int64_t budget =
        smallest_budget + std::uniform_int_distribution<int64_t>(0, 3000)(rng);
    options.budget(budget);
    const auto first_best = brute_force(
        layers,
        partitions,
        [&](int64_t, int64_t s, int64_t e) { return sum_of(times, s, e); },
        [&](const std::vector<int64_t>& split) {
          const auto b =
              gpipe::partition_memory(memory, split, checkpoint, m, options);
          return *std::max_element(b.begin(), b.end()) <= budget;
        });
    const std::string what = "trial " + std::to_string(trial);
    EXPECT_EQ(
        gpipe::balance_cost(times, partitions, memory, checkpoint, m, options),
        first_best)
        << what;
    if (smallest_budget > 1) {
      options.budget(smallest_budget - 1);
      EXPECT_EQ(
          error_of([&] {
            gpipe::balance_cost(
                times, partitions, memory, checkpoint, m, options);
          }),
          "gpipe: no balance fits the memory budget (budget: " +
              std::to_string(smallest_budget - 1) +
              " bytes, smallest feasible budget: " +
              std::to_string(smallest_budget) +
              " bytes, partitions: " + std::to_string(partitions) +
              ", checkpoint: " + gpipe::to_string(checkpoint) +
              ", microbatches: " + std::to_string(m) + ")")
          << what;
    }
  }
}

TEST(Balance, PartitionMemoryKeepsInputsOutputsAndGraphsAsThePipeDoes) {
  // Two layers per partition; numbers chosen so every term shows.
  LayerMemory a;
  a.parameter_bytes = 1000;
  a.gradient_bytes = 1000;
  a.buffer_bytes = 10;
  a.input_bytes = 100;
  a.output_bytes = 200;
  a.activation_bytes = 300;
  LayerMemory b = a;
  b.input_bytes = 200;
  b.output_bytes = 50;
  b.activation_bytes = 60;
  const std::vector<LayerMemory> layers{a, b, a, b};
  const std::vector<int64_t> balance{2, 2};
  // Fixed: 2 x (1000 + 10 + 1000 x (1 + 2)) = 8020 with Adam's factor 2.
  const auto adam = MemoryOptions().optimizer_factor(2);
  // Never, m = 4: fixed + 4 x input 100 + 4 graphs x (300 + 60).
  EXPECT_EQ(
      gpipe::partition_memory(layers, balance, Checkpoint::Never, 4, adam),
      (std::vector<int64_t>{8020 + 400 + 1440, 8020 + 400 + 1440}));
  // Always: fixed + 4 inputs + 4 outputs (50) + one graph.
  EXPECT_EQ(
      gpipe::partition_memory(layers, balance, Checkpoint::Always, 4, adam)[0],
      8020 + 400 + 200 + 360);
  // ExceptLast on fill-drain: three outputs kept, one graph at a time.
  EXPECT_EQ(
      gpipe::partition_memory(
          layers, balance, Checkpoint::ExceptLast, 4, adam)[0],
      8020 + 400 + 150 + 360);
  // 1F1B: partition 0 of 2 keeps 2 micro-batches, partition 1 keeps 1.
  const auto one_f_one_b = MemoryOptions().schedule(Schedule::OneFOneB);
  EXPECT_EQ(
      gpipe::partition_memory(
          layers, balance, Checkpoint::Never, 4, one_f_one_b),
      (std::vector<int64_t>{4020 + 200 + 720, 4020 + 100 + 360}));
  // ExceptLast on 1F1B: the last micro-batch's graph may meet a recompute.
  EXPECT_EQ(
      gpipe::partition_memory(
          layers, balance, Checkpoint::ExceptLast, 4, one_f_one_b),
      (std::vector<int64_t>{4020 + 200 + 50 + 720, 4020 + 100 + 360}));
  // One layer's backward at a time: the partition's largest.
  auto c = a;
  c.backward_bytes = 500;
  auto d = b;
  d.backward_bytes = 700;
  EXPECT_EQ(
      gpipe::partition_memory({c, d, d, c}, {1, 3}, Checkpoint::Never, 1),
      (std::vector<int64_t>{
          2010 + 100 + 300 + 500, 3 * 2010 + 200 + 420 + 700}));
}

TEST(Balance, ProfileTimesMeasuresForwardPlusBackward) {
  auto seq = sleepy_model({10, 2});
  const auto times = gpipe::profile_times(
      seq, torch::randn({4, 3}), TimeOptions().warmup(1).repeats(3));
  ASSERT_EQ(times.size(), 2u);
  // 10 ms forward + 10 ms backward; sleeping only ever runs late.
  EXPECT_GE(times[0], 0.020);
  EXPECT_LE(times[0], 0.040);
  EXPECT_GE(times[1], 0.004);
  EXPECT_LT(times[1], times[0]);
}

TEST(Balance, SleepingLayersGiveTheExpectedBalanceByTime) {
  // Units of 2 ms; the best split [4, 2, 2] has bottleneck 10 units, the
  // next best 13, the even split [3, 3, 2] 14.
  std::vector<double> ms;
  for (const double units : {2, 3, 1, 4, 4, 6, 3, 6}) {
    ms.push_back(2 * units);
  }
  auto seq = sleepy_model(ms);
  EXPECT_EQ(
      gpipe::balance_by_time(
          seq, torch::randn({2, 3}), 3, TimeOptions().warmup(1).repeats(3)),
      (std::vector<int64_t>{4, 2, 2}));
}

TEST(
    Balance,
    ProfilingLeavesParametersGradientsBuffersAndGeneratorsBitIdentical) {
  check_profiling_leaves_state(torch::kCPU);
}

TEST(
    Balance,
    ProfilingLeavesParametersGradientsBuffersAndGeneratorsBitIdentical_CUDA) {
  if (!gpipe_test::cuda_available()) {
    GTEST_SKIP() << "no CUDA device";
  }
  check_profiling_leaves_state(torch::Device(torch::kCUDA, 0));
}

TEST(Balance, ProfileMemoryMeasuresKnownParameterAndActivationSizes) {
  torch::nn::Sequential seq(
      torch::nn::Linear(16, 256), torch::nn::ReLU(), torch::nn::Linear(256, 8));
  seq[2]->as<torch::nn::Linear>()->bias.requires_grad_(false);
  seq->push_back(torch::nn::BatchNorm1d(8));
  const int64_t batch = 32;
  const auto memory = gpipe::profile_memory(seq, torch::randn({batch, 16}));
  ASSERT_EQ(memory.size(), 4u);
  const int64_t f = 4; // bytes per float
  EXPECT_EQ(memory[0].parameter_bytes, (16 * 256 + 256) * f);
  EXPECT_EQ(memory[0].gradient_bytes, (16 * 256 + 256) * f);
  EXPECT_EQ(memory[0].input_bytes, batch * 16 * f);
  EXPECT_EQ(memory[0].output_bytes, batch * 256 * f);
  // Linear adds its output; it saves its input and weight (not new).
  EXPECT_EQ(memory[0].activation_bytes, batch * 256 * f);
  EXPECT_EQ(memory[2].activation_bytes, batch * 8 * f);
  // ReLU saves its output, not its input: the Linear's output is freed.
  EXPECT_EQ(memory[1].parameter_bytes, 0);
  EXPECT_EQ(memory[1].activation_bytes, 0);
  EXPECT_EQ(memory[2].parameter_bytes, (256 * 8 + 8) * f);
  EXPECT_EQ(memory[2].gradient_bytes, 256 * 8 * f); // frozen bias
  // BatchNorm: weight and bias; running mean and var (floats) and
  // num_batches_tracked (one int64).
  EXPECT_EQ(memory[3].parameter_bytes, 2 * 8 * f);
  EXPECT_EQ(memory[3].buffer_bytes, 2 * 8 * f + 8);
  EXPECT_GE(memory[3].activation_bytes, batch * 8 * f);
}

TEST(Balance, KnownParameterSizesGiveTheExpectedBalanceByMemory) {
  // A wide first layer (16 kB of parameters) and seven small ones (1 kB
  // each): whatever the others do, the bottleneck is the first layer alone,
  // so every optimal split starts [1, ...] and the tie-break spreads the
  // rest evenly: [2, 2, 3] (equally even as [3, 2, 2], but smaller).
  torch::manual_seed(0);
  torch::nn::Sequential model(torch::nn::Linear(256, 16));
  for (int l = 0; l < 7; ++l) {
    model->push_back(torch::nn::Linear(16, 16));
  }
  const auto sample = torch::randn({2, 256});
  EXPECT_EQ(
      gpipe::balance_by_memory(model, sample, 2, Checkpoint::Never, 1),
      (std::vector<int64_t>{1, 7}));
  EXPECT_EQ(
      gpipe::balance_by_memory(model, sample, 4, Checkpoint::Always, 4),
      (std::vector<int64_t>{1, 2, 2, 3}));
}

TEST(Balance, BalanceByMemoryIsTheBestSplitOfTheMeasuredModel) {
  // An expanding and contracting MLP: where a partition starts and ends
  // decides what it keeps, so the answer depends on the checkpoint mode.
  torch::manual_seed(0);
  torch::nn::Sequential seq(
      torch::nn::Linear(16, 512),
      torch::nn::ReLU(),
      torch::nn::Linear(512, 16),
      torch::nn::Linear(16, 64),
      torch::nn::Tanh(),
      torch::nn::Linear(64, 16));
  const auto sample = torch::randn({64, 16});
  const auto memory = gpipe::profile_memory(seq, sample);
  for (const auto checkpoint :
       {Checkpoint::Never, Checkpoint::ExceptLast, Checkpoint::Always}) {
    for (const int64_t partitions : {2, 3}) {
      const auto options = MemoryOptions().optimizer_factor(2);
      const gpipe::detail::MemoryModel model(
          memory, partitions, checkpoint, 8, options);
      const auto expected = brute_force(
          6,
          partitions,
          [&](int64_t j, int64_t b, int64_t e) {
            return model.partition_bytes(j, b, e);
          },
          [](const auto&) { return true; });
      const auto balance = gpipe::balance_by_memory(
          seq, sample, partitions, checkpoint, 8, options);
      EXPECT_EQ(balance, expected)
          << gpipe::to_string(checkpoint) << " " << partitions;
      std::cout << gpipe::balance_report(
          memory, balance, checkpoint, 8, options);
    }
  }
}

TEST(Balance, MemoryModelPredictsWhatAStepOfThePipeKeeps) {
  // One partition on the CPU, so the counting allocator sees the whole
  // pipe: the peak rise of a step (gradients allocated in it) against the
  // model's bytes less what existed before (parameters, the batch).
  gpipe::track_cpu_memory();
  torch::manual_seed(0);
  torch::nn::Sequential seq;
  for (int l = 0; l < 3; ++l) {
    seq->push_back(torch::nn::Linear(64, 256));
    seq->push_back(torch::nn::Tanh());
    seq->push_back(torch::nn::Linear(256, 64));
  }
  const int64_t m = 4;
  const auto x = torch::randn({256, 64});
  const auto memory = gpipe::profile_memory(seq, x.slice(0, 0, 256 / m));
  for (const auto checkpoint :
       {Checkpoint::Never, Checkpoint::ExceptLast, Checkpoint::Always}) {
    GPipe<torch::nn::Sequential> pipe(
        seq,
        GPipeOptions(1)
            .microbatches(m)
            .checkpoint(checkpoint)
            .devices({torch::kCPU}));
    auto loss_fn = [](const torch::Tensor& out, const torch::Tensor& y) {
      return torch::mse_loss(out, y);
    };
    pipe->step(x, x, loss_fn); // warm-up
    for (auto& p : seq->parameters()) {
      p.mutable_grad().reset();
    }
    gpipe::MemoryMeter meter({torch::kCPU});
    pipe->step(x, x, loss_fn);
    const auto measured =
        static_cast<double>(meter.peak_increase_bytes(torch::kCPU));
    int64_t existing = m * memory[0].input_bytes; // the batch
    for (const auto& layer : memory) {
      existing += layer.parameter_bytes + layer.buffer_bytes;
    }
    const auto predicted = static_cast<double>(
        gpipe::partition_memory(memory, {9}, checkpoint, m)[0] - existing);
    std::cout << std::fixed << std::setprecision(1)
              << gpipe::to_string(checkpoint) << ": a step keeps "
              << measured / 1e3 << " kB, the model predicts " << predicted / 1e3
              << " kB\n"
              << std::defaultfloat;
    EXPECT_GE(measured, 0.8 * predicted) << gpipe::to_string(checkpoint);
    EXPECT_LE(measured, 1.2 * predicted) << gpipe::to_string(checkpoint);
  }
}

TEST(Balance, SkewedModelStepsAQuarterFasterWithBalanceByTimeAndAsPredicted) {
  // Four slow layers, then twelve fast ones (2 ms units, forward and
  // backward each): the even split [4, 4, 4, 4] puts all slow layers on the
  // first partition (24 units against 4); the best split has a bottleneck of
  // 12. Stages get CPU threads of their own, so they overlap like devices.
  std::vector<double> ms;
  for (int l = 0; l < 16; ++l) {
    ms.push_back(l < 4 ? 12.0 : 2.0);
  }
  auto seq = sleepy_model(ms);
  const int64_t n = 4, m = 8;
  const auto x = torch::randn({m, 3});
  const auto sample = x.slice(0, 0, 1);
  const auto times =
      gpipe::profile_times(seq, sample, TimeOptions().warmup(1).repeats(3));
  const auto balance = gpipe::balance_cost(times, n);
  const auto report = gpipe::balance_report(times, balance);
  const double predicted =
      gpipe::predicted_step_time(report.partition_costs, m);

  auto options = GPipeOptions(n)
                     .microbatches(m)
                     .checkpoint(Checkpoint::Never)
                     .concurrent_cpu_partitions(true);
  GPipe<torch::nn::Sequential> even(seq, options);
  GPipe<torch::nn::Sequential> balanced(seq, options.balance(balance));
  const double even_time = median_step_seconds(even, x, 3);
  const double balanced_time = median_step_seconds(balanced, x, 3);
  const double even_predicted = gpipe::predicted_step_time(
      gpipe::balance_report(times, even->options.balance()).partition_costs, m);
  std::cout << report << std::fixed << std::setprecision(0)
            << "step time: even split " << even_time * 1e3 << " ms (predicted "
            << even_predicted * 1e3 << " ms), balance_by_time "
            << balanced_time * 1e3 << " ms (predicted ideal " << predicted * 1e3
            << " ms)\n"
            << std::defaultfloat;
  EXPECT_LE(balanced_time, 0.75 * even_time);
  EXPECT_LE(balanced_time, 1.15 * predicted);
  EXPECT_GE(balanced_time, 0.85 * predicted);
}

TEST(Balance, ReportShowsLayerAndPartitionCostsAndImbalance) {
  const auto report = gpipe::balance_report({1e-3, 2e-3, 3e-3, 4e-3}, {2, 2});
  EXPECT_EQ(report.partition_costs, (std::vector<double>{3e-3, 7e-3}));
  EXPECT_DOUBLE_EQ(report.max_cost(), 7e-3);
  EXPECT_DOUBLE_EQ(report.mean_cost(), 5e-3);
  EXPECT_DOUBLE_EQ(report.imbalance(), 1.4);
  std::ostringstream text;
  text << report;
  EXPECT_NE(
      text.str().find("balance [2, 2] (4 layers, 2 partitions)"),
      std::string::npos)
      << text.str();
  EXPECT_NE(text.str().find("7.000 ms"), std::string::npos) << text.str();
  EXPECT_NE(text.str().find("imbalance (max/mean) 1.40"), std::string::npos)
      << text.str();

  LayerMemory layer;
  layer.parameter_bytes = 2'000'000;
  layer.gradient_bytes = 2'000'000;
  const auto memory = gpipe::balance_report(
      std::vector<LayerMemory>{layer, layer, layer},
      {1, 2},
      Checkpoint::Always,
      4);
  EXPECT_EQ(memory.partition_costs, (std::vector<double>{4e6, 8e6}));
  std::ostringstream memory_text;
  memory_text << memory;
  EXPECT_NE(memory_text.str().find("8.00 MB"), std::string::npos)
      << memory_text.str();
}

TEST(Balance, PredictedStepTimeSumsTheSlowestActivePartitionOfEachTick) {
  // m=3, n=2: ticks {0}, {0,1}, {0,1}, {1}.
  EXPECT_DOUBLE_EQ(gpipe::predicted_step_time({2, 5}, 3), 2 + 5 + 5 + 5);
  EXPECT_DOUBLE_EQ(gpipe::predicted_step_time({5, 2}, 3), 5 + 5 + 5 + 2);
  EXPECT_DOUBLE_EQ(gpipe::predicted_step_time({4}, 3), 12);
}

TEST(Balance, BadInputsFailWithMessagesNamingTheValues) {
  auto seq = gpipe_test::make_mlp(2, 4); // 4 layers
  const auto sample = torch::randn({2, 4});
  EXPECT_EQ(
      error_of([&] { gpipe::balance_by_time(seq, sample, 5); }),
      "gpipe: more partitions than layers (partitions: 5, layers: 4)");
  EXPECT_EQ(
      error_of([&] {
        gpipe::balance_by_memory(seq, sample, 0, Checkpoint::Always, 2);
      }),
      "gpipe: partitions must be at least 1 (partitions: 0)");
  EXPECT_EQ(
      error_of([&] {
        gpipe::balance_by_time(seq, torch::randn({0, 4}), 2);
      }),
      "gpipe: sample has an empty batch (sample shape: [0, 4])");
  EXPECT_EQ(
      error_of([&] {
        gpipe::balance_by_time(seq, torch::randn({2, 0}), 2);
      }),
      "gpipe: sample is empty (sample shape: [2, 0])");
  EXPECT_EQ(
      error_of([&] { gpipe::profile_memory(seq, torch::Tensor()); }),
      "gpipe: sample is an undefined tensor");
  EXPECT_EQ(
      error_of(
          [&] { gpipe::balance_by_time(torch::nn::Sequential(), sample, 1); }),
      "gpipe: cannot balance an empty Sequential (layers: 0)");
  EXPECT_EQ(
      error_of(
          [&] { gpipe::profile_times(seq, sample, TimeOptions().repeats(0)); }),
      "gpipe: repeats must be at least 1 (repeats: 0)");
  EXPECT_EQ(
      error_of(
          [&] { gpipe::profile_times(seq, sample, TimeOptions().warmup(-1)); }),
      "gpipe: warmup must be at least 0 (warmup: -1)");
  EXPECT_EQ(
      error_of([&] {
        gpipe::balance_cost({1, -2, 3}, 2);
      }),
      "gpipe: layer costs must be finite and non-negative (cost[1]: -2)");
  EXPECT_EQ(
      error_of([&] { gpipe::balance_cost({}, 1); }),
      "gpipe: cannot balance an empty Sequential (layers: 0)");
  EXPECT_EQ(
      error_of([&] {
        gpipe::balance_by_memory(seq, sample, 2, Checkpoint::Always, 0);
      }),
      "gpipe: microbatches must be at least 1 (microbatches: 0)");
  EXPECT_EQ(
      error_of([&] {
        gpipe::balance_by_memory(
            seq,
            sample,
            2,
            Checkpoint::Always,
            2,
            MemoryOptions().optimizer_factor(-1));
      }),
      "gpipe: optimizer_factor must be finite and non-negative (optimizer_factor: -1)");
  EXPECT_EQ(
      error_of([&] {
        gpipe::balance_by_memory(
            seq, sample, 2, Checkpoint::Always, 2, MemoryOptions().budget(0));
      }),
      "gpipe: a memory budget must be at least 1 byte (budget: 0)");
  const auto budget_error = error_of([&] {
    gpipe::balance_by_memory(
        seq, sample, 2, Checkpoint::Always, 2, MemoryOptions().budget(100));
  });
  EXPECT_EQ(
      budget_error.rfind(
          "gpipe: no balance fits the memory budget (budget: 100 bytes, smallest feasible budget: ",
          0),
      0u)
      << budget_error;
  EXPECT_EQ(
      error_of([&] {
        gpipe::balance_cost(
            {1, 2},
            2,
            std::vector<LayerMemory>(3),
            Checkpoint::Never,
            1,
            MemoryOptions().budget(1));
      }),
      "gpipe: costs and memory have different lengths (costs: 2, memory: 3)");
  EXPECT_EQ(
      error_of([&] {
        gpipe::balance_cost(
            {1, 2}, 2, std::vector<LayerMemory>(2), Checkpoint::Never, 1, {});
      }),
      "gpipe: balance_cost with a memory model needs a budget (MemoryOptions().budget(bytes))");
  EXPECT_EQ(
      error_of([&] {
        gpipe::balance_report({1, 2, 3}, {1, 1});
      }),
      "gpipe: balance does not sum to the number of layers (sum of balance: 2, layers: 3)\n"
      "choose a balance from measured costs with <gpipe/balance.h> "
      "(gpipe::balance_by_time, gpipe::balance_by_memory)");
}

TEST(Balance, ABalanceThatDoesNotFitTheSequentialPointsToAutomaticBalancing) {
  const std::string hint =
      "\nchoose a balance from measured costs with <gpipe/balance.h> "
      "(gpipe::balance_by_time, gpipe::balance_by_memory)";
  const auto make_pipe = [](std::vector<int64_t> balance) {
    const auto partitions = static_cast<int64_t>(balance.size());
    GPipe<torch::nn::Sequential> pipe(
        gpipe_test::make_mlp(2, 4),
        GPipeOptions(partitions == 3 ? 2 : partitions).balance(balance));
  };
  EXPECT_EQ(
      error_of([&] {
        make_pipe({1, 2});
      }),
      "gpipe: balance does not sum to the number of layers (sum of balance: 3, layers: 4)" +
          hint);
  EXPECT_EQ(
      error_of([&] {
        make_pipe({1, 1, 2});
      }),
      "gpipe: balance and partitions have different lengths (balance: 3, partitions: 2)" +
          hint);
  EXPECT_EQ(
      error_of([&] {
        make_pipe({4, 0});
      }),
      "gpipe: every partition needs at least one layer (balance[1]: 0)" + hint);
}

TEST(Balance, ParametersOnAnotherDeviceThanTheSampleAreRejected_CUDA) {
  if (!gpipe_test::cuda_available()) {
    GTEST_SKIP() << "no CUDA device";
  }
  auto seq = gpipe_test::make_mlp(2, 4);
  EXPECT_EQ(
      error_of([&] {
        gpipe::balance_by_time(seq, torch::randn({2, 4}, torch::kCUDA), 2);
      }),
      "gpipe: layer 0 has a parameter on cpu but the sample is on cuda:0 (profiling runs on the sample's device: move the Sequential there first)");
}

} // namespace balance_test
