// How a pipe across processes fails: every rank, within seconds, naming the
// rank that failed, and never hung.
//
// Note [A failed rank stops every rank]
// A rank that fails writes its error to the store (the first one wins) and
// aborts its pending messages. While a step runs, a watchdog on every rank
// polls the store and, once an error is there, aborts the receive the rank
// is blocked in, which then throws that error naming the failed rank. A
// rank that died without reporting (exit, SIGKILL) closes its connections,
// so its peers' receives fail within the second; a rank stuck forever lets
// its peers time out after WorldOptions::timeout. Ranks further away fail
// the same way once their neighbour stops.
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
class Watchdog {
 public:
  /// `abort` stops the step's messages (the transport's abort).
  Watchdog(FailureBoard& board, std::function<void()> abort)
      : thread_([this, &board, abort = std::move(abort)] {
          std::unique_lock<std::mutex> lock(mutex_);
          while (!stop_) {
            if (stopped_.wait_for(lock, std::chrono::milliseconds(50), [&] {
                  return stop_;
                })) {
              break;
            }
            lock.unlock();
            const bool failed = board.find().has_value();
            if (failed) {
              abort();
            }
            lock.lock();
            if (failed) {
              break;
            }
          }
        }) {}

  ~Watchdog() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    stopped_.notify_all();
    thread_.join();
  }

  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

 private:
  std::mutex mutex_;
  std::condition_variable stopped_;
  bool stop_ = false;
  std::thread thread_; // last: starts once the members above exist
};

} // namespace gpipe::distributed::detail
