// How a pipe across processes fails: every rank, within seconds, naming the
// rank that failed, and never hung.
//
// Note [A failed rank stops every rank]
// A rank that fails writes its error to the store (the first one wins) and
// aborts its pending messages. While a step runs, a watchdog on every rank
// (a thread for the pipe's life) polls the store and, once an error is
// there, aborts the receive the rank is blocked in, which then throws that
// error naming the failed rank. A rank that died without reporting (exit,
// SIGKILL) closes its connections, so its peers' receives fail within the
// second; a rank stuck forever lets its peers time out after
// WorldOptions::timeout. Ranks further away fail the same way once their
// neighbour stops.
#pragma once

#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/types.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace gpipe::distributed::detail {

/// Where ranks post the first failure of a pipe (Note [A failed rank stops
/// every rank]).
class FailureBoard {
 public:
  FailureBoard(c10::intrusive_ptr<c10d::Store> store, std::string prefix)
      : store_(std::move(store)), prefix_(std::move(prefix)) {}

  /// Posts `message` unless another rank posted first. Never throws: the
  /// store may be gone with the rank that hosted it.
  void post(const std::string& message) noexcept {
    try {
      if (store_->add(prefix_ + "failures", 1) == 1) {
        store_->set(prefix_ + "error", bytes(message));
      }
    } catch (...) {
    }
  }

  /// Posts this rank's failure, `who` naming the rank. A failure it saw in
  /// a peer (the transport's errors start "gpipe: rank ") is passed on as
  /// that peer's, so that ranks further away name the rank that failed.
  void post_failure(const std::string& message, const std::string& who) {
    const std::string seen_in_peer = "gpipe: rank ";
    post(
        message.rfind(seen_in_peer, 0) == 0
            ? message.substr(7) + " (seen by " + who + ")"
            : who + " failed: " + message);
  }

  /// The posted failure, if any (and the store still answers).
  std::optional<std::string> find() noexcept {
    try {
      if (store_->check({prefix_ + "error"})) {
        const auto value = store_->get(prefix_ + "error");
        return std::string(value.begin(), value.end());
      }
    } catch (...) {
    }
    return std::nullopt;
  }

  /// `find()`, retried for up to `wait`: a failed rank posts its error
  /// just before it exits, so a peer that sees the connection close may
  /// look a moment early.
  std::optional<std::string> find_within(std::chrono::milliseconds wait) {
    const auto until = std::chrono::steady_clock::now() + wait;
    while (true) {
      if (auto found = find()) {
        return found;
      }
      if (std::chrono::steady_clock::now() >= until) {
        return std::nullopt;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }

  /// Sums `tensor` over `group`. When that fails the error names the
  /// failure a rank posted, else `otherwise` and the backend's message.
  void sum_over(
      c10d::Backend& group,
      torch::Tensor& tensor,
      std::chrono::milliseconds timeout,
      const std::string& otherwise) {
    wait_for(start_sum(group, tensor, timeout, otherwise), otherwise);
  }

  /// Starts summing `tensor` over `group`: wait_for the Work.
  c10::intrusive_ptr<c10d::Work> start_sum(
      c10d::Backend& group,
      torch::Tensor& tensor,
      std::chrono::milliseconds timeout,
      const std::string& otherwise) {
    std::vector<torch::Tensor> tensors{tensor};
    c10d::AllreduceOptions reduce;
    reduce.reduceOp = c10d::ReduceOp::SUM;
    reduce.timeout = timeout;
    try {
      return group.allreduce(tensors, reduce);
    } catch (const std::exception& e) {
      fail(otherwise, e);
    }
  }

  /// Waits for a collective; its failure throws the posted failure, or
  /// `otherwise`.
  void wait_for(
      const c10::intrusive_ptr<c10d::Work>& work,
      const std::string& otherwise) {
    try {
      work->wait();
    } catch (const std::exception& e) {
      fail(otherwise, e);
    }
  }

 private:
  [[noreturn]] void fail(
      const std::string& otherwise,
      const std::exception& e) {
    const auto posted = find_within(std::chrono::milliseconds(1000));
    TORCH_CHECK(
        false, "gpipe: ", posted ? *posted : otherwise + " (" + e.what() + ")");
  }

  static std::vector<uint8_t> bytes(const std::string& text) {
    return {text.begin(), text.end()};
  }

  c10::intrusive_ptr<c10d::Store> store_;
  std::string prefix_;
};

/// Polls the FailureBoard while a step runs and aborts the step's messages
/// once another rank posted a failure (Note [A failed rank stops every rank]).
/// One thread for the pipe's life, armed for each step by an `Armed`,
/// instead of a thread started and joined every step (a thread's creation
/// and join a step; their share of the step was not measured apart).
/// Armed, it polls every 50 ms; a second after the last
/// step it sleeps until armed again.
class Watchdog {
 public:
  /// `abort` stops the step's messages (the transport's abort).
  Watchdog(FailureBoard& board, std::function<void()> abort)
      : board_(board), abort_(std::move(abort)), thread_([this] { watch(); }) {}

  ~Watchdog() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    changed_.notify_all();
    thread_.join();
  }

  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  /// Watches while it lives: a step.
  class Armed {
   public:
    explicit Armed(Watchdog& watchdog) : watchdog_(watchdog) {
      watchdog_.set_armed(true);
    }
    ~Armed() {
      watchdog_.set_armed(false);
    }
    Armed(const Armed&) = delete;
    Armed& operator=(const Armed&) = delete;

   private:
    Watchdog& watchdog_;
  };

 private:
  void set_armed(bool armed) {
    bool wake = false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      armed_ = armed;
      if (armed) {
        last_armed_ = std::chrono::steady_clock::now();
        wake = asleep_;
      }
    }
    if (wake) {
      changed_.notify_all();
    }
  }

  void watch() {
    constexpr auto kPoll = std::chrono::milliseconds(50);
    constexpr auto kIdle = std::chrono::seconds(1);
    std::unique_lock<std::mutex> lock(mutex_);
    while (!stop_) {
      if (!armed_ && std::chrono::steady_clock::now() - last_armed_ > kIdle) {
        asleep_ = true;
        changed_.wait(lock, [&] { return stop_ || armed_; });
        asleep_ = false;
        continue;
      }
      const auto until = std::chrono::steady_clock::now() + kPoll;
      changed_.wait_until(lock, until, [&] { return stop_; });
      if (stop_ || !armed_ || std::chrono::steady_clock::now() < until) {
        continue;
      }
      lock.unlock();
      const bool failed = board_.find().has_value();
      lock.lock();
      if (failed && armed_) {
        lock.unlock();
        abort_();
        lock.lock();
        armed_ = false;
      }
    }
  }

  FailureBoard& board_;
  std::function<void()> abort_;
  std::mutex mutex_;
  std::condition_variable changed_;
  bool stop_ = false;
  bool armed_ = false;
  bool asleep_ = false;
  std::chrono::steady_clock::time_point last_armed_{};
  std::thread thread_; // last: starts once the members above exist
};

} // namespace gpipe::distributed::detail
