// Threads that run partitions, one per device.
//
// Note [One worker per device]
// Partitions on different devices must run at the same time, partitions on
// one device must not: they would only contend for it, and tasks that share a
// random-number generator (every CPU partition shares the CPU's, every
// partition on a GPU shares that GPU's) must run in a fixed order for dropout
// to be deterministic. So each device gets one worker thread that lives as
// long as the pipe, and the tasks of one clock tick are handed out per device
// and run in partition order. The caller's thread runs one device's share
// itself, so a pipe on a single device never switches threads at all.
//
// A worker takes on the caller's thread-local state (grad mode, inference
// mode, autocast, ...) through at::ThreadLocalState, and the caller's current
// streams on every device, so a user's stream is honoured inside the pipe.
#pragma once

#include <ATen/ThreadLocalState.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/Stream.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace gpipe::detail {

/// A thread that runs queued tasks in order until it is destroyed.
class Worker {
 public:
  Worker() : thread_([this] { loop(); }) {}

  ~Worker() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    ready_.notify_one();
    thread_.join();
  }

  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  void submit(std::function<void()> task) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      tasks_.push_back(std::move(task));
    }
    ready_.notify_one();
  }

 private:
  void loop() {
    for (;;) {
      std::function<void()> task;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        ready_.wait(lock, [this] { return stopping_ || !tasks_.empty(); });
        if (tasks_.empty()) {
          return;
        }
        task = std::move(tasks_.front());
        tasks_.pop_front();
      }
      task(); // tasks catch their own exceptions (see run_on_workers)
    }
  }

  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<std::function<void()>> tasks_;
  bool stopping_ = false;
  std::thread thread_; // last: starts after the members it uses exist
};

/// What the caller's thread carries into a worker: its thread-local state and
/// its current stream on each device of the pipe.
struct CallerContext {
  at::ThreadLocalState thread_local_state;
  std::vector<c10::Stream> current_streams;
};

/// The calling thread's context, with its current stream on each CUDA
/// device among `devices` (once each).
inline CallerContext capture_caller_context(
    const std::vector<c10::Device>& devices) {
  CallerContext caller{at::ThreadLocalState(), {}};
  std::vector<c10::Device> seen;
  for (const auto& device : devices) {
    if (device.is_cuda() &&
        std::find(seen.begin(), seen.end(), device) == seen.end()) {
      seen.push_back(device);
      caller.current_streams.push_back(
          c10::impl::VirtualGuardImpl(device.type()).getStream(device));
    }
  }
  return caller;
}

/// Work for one device in one round: `run` is called on `worker` (or on the
/// caller's thread when `worker` is null) with that device as the current one.
struct DeviceTask {
  Worker* worker = nullptr;
  c10::Device device = c10::Device(c10::kCPU);
  std::function<void()> run;
};

/// Runs every task, the ones without a worker on this thread, waits for all
/// of them, then rethrows the first exception by task order. Never returns
/// early: a failed task cannot leave another still running on shared state.
inline void run_on_workers(
    std::vector<DeviceTask>& tasks,
    const CallerContext& caller) {
  std::vector<std::exception_ptr> errors(tasks.size());
  // Runs task t on its device, keeping its exception.
  auto run_task = [&](size_t t) {
    try {
      c10::OptionalDeviceGuard device_guard;
      if (!tasks[t].device.is_cpu()) {
        device_guard.reset_device(tasks[t].device);
      }
      tasks[t].run();
    } catch (...) {
      errors[t] = std::current_exception();
    }
  };
  std::mutex mutex;
  std::condition_variable done;
  size_t pending = 0;
  for (size_t t = 0; t < tasks.size(); ++t) {
    if (tasks[t].worker == nullptr) {
      continue;
    }
    {
      std::lock_guard<std::mutex> lock(mutex);
      ++pending;
    }
    tasks[t].worker->submit([&, t] {
      try {
        at::ThreadLocalStateGuard state_guard(caller.thread_local_state);
        c10::MultiStreamGuard stream_guard(caller.current_streams);
        run_task(t);
      } catch (...) { // a guard that failed to set up
        errors[t] = std::current_exception();
      }
      std::lock_guard<std::mutex> lock(mutex);
      if (--pending == 0) {
        done.notify_one();
      }
    });
  }
  for (size_t t = 0; t < tasks.size(); ++t) {
    if (tasks[t].worker == nullptr) {
      run_task(t);
    }
  }
  {
    std::unique_lock<std::mutex> lock(mutex);
    done.wait(lock, [&] { return pending == 0; });
  }
  for (const auto& error : errors) {
    if (error) {
      std::rethrow_exception(error);
    }
  }
}

} // namespace gpipe::detail
