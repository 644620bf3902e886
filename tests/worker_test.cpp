// The workers that run devices concurrently, exercised without a GPU.
#include "test_support.h"

#include <gpipe/detail/worker.h>

#include <atomic>
#include <chrono>
#include <stdexcept>
#include <thread>
#include <vector>

namespace worker_test {

TEST(Workers, TasksOnDifferentWorkersRunAtTheSameTime) {
  gpipe::detail::Worker first, second;
  std::atomic<int> running{0};
  std::atomic<int> most{0};
  auto task = [&] {
    const int now = ++running;
    int seen = most.load();
    while (now > seen && !most.compare_exchange_weak(seen, now)) {
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    --running;
  };
  std::vector<gpipe::detail::DeviceTask> tasks = {
      {&first, torch::kCPU, task},
      {&second, torch::kCPU, task},
      {nullptr, torch::kCPU, task}};
  const auto start = std::chrono::steady_clock::now();
  gpipe::detail::run_on_workers(
      tasks, gpipe::detail::CallerContext{at::ThreadLocalState(), {}});
  const auto elapsed = std::chrono::steady_clock::now() - start;
  EXPECT_EQ(most.load(), 3);
  EXPECT_LT(elapsed, std::chrono::milliseconds(290));
}

TEST(Workers, TheFirstFailureByTaskOrderIsRethrownAfterAllTasksFinish) {
  gpipe::detail::Worker first, second;
  std::atomic<bool> slow_finished{false};
  std::vector<gpipe::detail::DeviceTask> tasks = {
      {&first, torch::kCPU, [] { throw std::runtime_error("first"); }},
      {&second,
       torch::kCPU,
       [&] {
         std::this_thread::sleep_for(std::chrono::milliseconds(50));
         slow_finished = true;
       }},
      {nullptr, torch::kCPU, [] { throw std::runtime_error("third"); }}};
  try {
    gpipe::detail::run_on_workers(
        tasks, gpipe::detail::CallerContext{at::ThreadLocalState(), {}});
    FAIL() << "expected an exception";
  } catch (const std::runtime_error& e) {
    EXPECT_STREQ(e.what(), "first");
  }
  EXPECT_TRUE(slow_finished);
}

TEST(Workers, WorkersSeeTheCallersGradMode) {
  gpipe::detail::Worker worker;
  bool seen = true;
  std::vector<gpipe::detail::DeviceTask> tasks = {
      {&worker, torch::kCPU, [&] { seen = torch::GradMode::is_enabled(); }}};
  torch::NoGradGuard no_grad;
  gpipe::detail::run_on_workers(
      tasks, gpipe::detail::CallerContext{at::ThreadLocalState(), {}});
  EXPECT_FALSE(seen);
}

} // namespace worker_test
