// Partitions in different lanes overlap, in forward and in backward. Shown
// without a GPU: every stage sleeps a known time (burning no CPU) in forward
// and in backward, CPU partitions get a thread each, and the makespan is
// compared with the fill-drain ideal (m + n - 1) t per direction, against
// m n t when nothing overlaps.
#include "test_support.h"

#include <chrono>
#include <thread>

namespace concurrency_test {

using gpipe::GPipe;
using gpipe::GPipeOptions;
using gpipe::Schedule;
using Clock = std::chrono::steady_clock;

namespace {

constexpr auto kStageTime = std::chrono::milliseconds(20);

/// Identity that takes kStageTime in forward and in backward.
struct Sleep : torch::autograd::Function<Sleep> {
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext*,
      const torch::Tensor& x) {
    std::this_thread::sleep_for(kStageTime);
    return {x.clone()};
  }
  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext*,
      torch::autograd::variable_list grads) {
    std::this_thread::sleep_for(kStageTime);
    return {grads[0]};
  }
};

GPipe<torch::nn::Sequential> sleeping_pipe(
    int64_t n,
    int64_t m,
    Schedule schedule,
    bool concurrent) {
  torch::nn::Sequential seq;
  for (int64_t j = 0; j < n; ++j) {
    seq->push_back(torch::nn::Linear(2, 2));
    seq->push_back(
        gpipe_test::layer([](torch::Tensor x) { return Sleep::apply(x)[0]; }));
  }
  return GPipe<torch::nn::Sequential>(
      seq,
      GPipeOptions(n)
          .microbatches(m)
          .schedule(schedule)
          .checkpoint(gpipe::Checkpoint::Never)
          .concurrent_cpu_partitions(concurrent));
}

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

double ideal(int64_t m, int64_t n) {
  return static_cast<double>(m + n - 1) *
      std::chrono::duration<double>(kStageTime).count();
}

} // namespace

TEST(
    Concurrency,
    ForwardOfCpuPartitionsWithThreadsOfTheirOwnTakesTheFillDrainTime) {
  const int64_t n = 4, m = 8;
  auto pipe = sleeping_pipe(n, m, Schedule::FillDrain, /*concurrent=*/true);
  pipe(torch::randn({m, 2})); // warm-up: workers start on first use
  const auto start = Clock::now();
  pipe(torch::randn({m, 2}));
  const double makespan = seconds_since(start);
  // Serial would be m n t = 2.9x the ideal.
  EXPECT_GE(makespan, 0.95 * ideal(m, n));
  EXPECT_LE(makespan, 1.5 * ideal(m, n)) << "ideal " << ideal(m, n) << " s";
}

TEST(Concurrency, StepOverlapsBackwardsToo) {
  const int64_t n = 4, m = 8;
  for (const auto schedule : {Schedule::FillDrain, Schedule::OneFOneB}) {
    auto pipe = sleeping_pipe(n, m, schedule, /*concurrent=*/true);
    auto loss_fn = [](const torch::Tensor& out, const torch::Tensor& y) {
      return torch::mse_loss(out, y);
    };
    pipe->step(torch::randn({m, 2}), torch::randn({m, 2}), loss_fn);
    const auto start = Clock::now();
    pipe->step(torch::randn({m, 2}), torch::randn({m, 2}), loss_fn);
    const double makespan = seconds_since(start);
    EXPECT_GE(makespan, 0.95 * 2 * ideal(m, n)) << gpipe::to_string(schedule);
    EXPECT_LE(makespan, 1.5 * 2 * ideal(m, n))
        << gpipe::to_string(schedule) << ": ideal " << 2 * ideal(m, n) << " s";
  }
}

TEST(Concurrency, CpuPartitionsShareOneThreadByDefault) {
  const int64_t n = 2, m = 2;
  auto pipe = sleeping_pipe(n, m, Schedule::FillDrain, /*concurrent=*/false);
  const auto start = Clock::now();
  pipe(torch::randn({m, 2}));
  // Nothing overlaps: m n t.
  EXPECT_GE(
      seconds_since(start),
      0.95 * static_cast<double>(m * n) *
          std::chrono::duration<double>(kStageTime).count());
}

TEST(Concurrency, ConcurrentCpuPartitionsStillTrainLikePlain) {
  auto seq = gpipe_test::make_mlp(4, 6, 2);
  auto plain = gpipe_test::clone_of(seq);
  GPipe<torch::nn::Sequential> pipe(
      seq, GPipeOptions(4).microbatches(5).concurrent_cpu_partitions(true));
  const auto x = torch::randn({11, 6});
  torch::mse_loss(pipe(x), x).backward();
  torch::mse_loss(plain->forward(x), x).backward();
  gpipe_test::expect_close(
      gpipe_test::grads_of(seq->parameters()),
      gpipe_test::grads_of(plain->parameters()),
      1e-6,
      "forward");
  for (const auto schedule : {Schedule::FillDrain, Schedule::OneFOneB}) {
    pipe->options.schedule(schedule);
    for (auto& p : seq->parameters()) {
      p.mutable_grad().reset();
    }
    pipe->step(x, x, [](const auto& out, const auto& y) {
      return torch::mse_loss(out, y);
    });
    gpipe_test::expect_close(
        gpipe_test::grads_of(seq->parameters()),
        gpipe_test::grads_of(plain->parameters()),
        1e-6,
        gpipe::to_string(schedule));
  }
}

} // namespace concurrency_test
