// Recording what a pipe did and when: one slice per (partition, micro-batch,
// phase), on the device that ran it.
//
// Users want this in their own training, not only in the example, so it is
// part of the library: hand a pipe a Timeline (`pipe->set_timeline(t)`) and
// every cell's forward, backward, recompute and every copy between devices is
// recorded. Without one the pipe does nothing extra. On the CPU a slice is
// timed with a steady clock; on CUDA with timing events recorded on the
// current stream, so a slice covers the device's work, not the launch; the
// events are turned into times (and waited for) only when `events()` is read.
#pragma once

#include <gpipe/schedule.h>

#include <c10/core/Event.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/types.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

namespace gpipe {

/// One slice: partition j did `phase` for micro-batch i on `device`, from
/// `start_us` to `end_us` microseconds after the timeline's origin.
struct TimelineEvent {
  /// The partition j (a global stage number across processes).
  int64_t partition = 0;
  /// The micro-batch i.
  int64_t microbatch = 0;
  /// What the partition was doing.
  Phase phase = Phase::Forward;
  /// The device it ran on.
  torch::Device device = torch::kCPU;
  /// When the slice started, in microseconds after the timeline's origin.
  double start_us = 0;
  /// When the slice ended, in microseconds after the timeline's origin.
  double end_us = 0;
};

/// A thread-safe recorder of slices; see the note atop this header.
class Timeline {
 public:
  Timeline() : origin_(Clock::now()) {}

  /// Starts a slice and returns its token for `end`.
  size_t begin(
      int64_t partition,
      int64_t microbatch,
      Phase phase,
      const torch::Device& device) {
    Pending pending;
    pending.event.partition = partition;
    pending.event.microbatch = microbatch;
    pending.event.phase = phase;
    pending.event.device = device;
    if (device.is_cuda()) {
      pending.start = record_on_current_stream(device);
    } else {
      pending.event.start_us = now_us();
    }
    std::lock_guard<std::mutex> lock(mutex_);
    pending_.push_back(std::move(pending));
    return pending_.size() - 1;
  }

  /// Ends the slice `token` returned by `begin`.
  void end(size_t token) {
    std::unique_ptr<c10::Event> stop;
    double end_us = 0;
    torch::Device device = torch::kCPU;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      device = pending_.at(token).event.device;
    }
    if (device.is_cuda()) {
      stop = record_on_current_stream(device);
    } else {
      end_us = now_us();
    }
    std::lock_guard<std::mutex> lock(mutex_);
    auto& pending = pending_.at(token);
    pending.stop = std::move(stop);
    pending.event.end_us = end_us;
  }

  /// Every slice so far, ordered by start; waits for CUDA work it recorded.
  std::vector<TimelineEvent> events() {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<TimelineEvent> events;
    events.reserve(pending_.size());
    for (auto& pending : pending_) {
      if (pending.start) {
        pending.event.start_us =
            device_time_us(pending.event.device, *pending.start);
        pending.event.end_us = pending.stop
            ? device_time_us(pending.event.device, *pending.stop)
            : pending.event.start_us;
      }
      events.push_back(pending.event);
    }
    std::stable_sort(
        events.begin(), events.end(), [](const auto& a, const auto& b) {
          return a.start_us < b.start_us;
        });
    return events;
  }

  /// Forgets every slice and restarts the clock.
  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    pending_.clear();
    anchors_.clear();
    origin_ = Clock::now();
  }

 private:
  using Clock = std::chrono::steady_clock;

  struct Pending {
    TimelineEvent event;
    std::unique_ptr<c10::Event> start;
    std::unique_ptr<c10::Event> stop;
  };

  /// A CUDA event at a known host time, to turn device times into ours.
  struct Anchor {
    torch::Device device = torch::kCPU;
    std::unique_ptr<c10::Event> event;
    double host_us = 0;
  };

  const Anchor* find_anchor(const torch::Device& device) const {
    for (const auto& anchor : anchors_) {
      if (anchor.device == device) {
        return &anchor;
      }
    }
    return nullptr;
  }

  double now_us() const {
    return std::chrono::duration<double, std::micro>(Clock::now() - origin_)
        .count();
  }

  std::unique_ptr<c10::Event> record_on_current_stream(
      const torch::Device& device) {
    c10::impl::VirtualGuardImpl impl(device.type());
    bool anchored = false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      anchored = find_anchor(device) != nullptr;
    }
    if (!anchored) {
      // Waits for the stream once per device: outside the lock, so other
      // lanes keep recording meanwhile.
      Anchor anchor;
      anchor.device = device;
      anchor.event = std::make_unique<c10::Event>(
          device.type(), c10::EventFlag::BACKEND_DEFAULT);
      anchor.event->record(impl.getStream(device));
      anchor.event->synchronize();
      anchor.host_us = now_us();
      std::lock_guard<std::mutex> lock(mutex_);
      if (find_anchor(device) == nullptr) {
        anchors_.push_back(std::move(anchor));
      }
    }
    auto event = std::make_unique<c10::Event>(
        device.type(), c10::EventFlag::BACKEND_DEFAULT);
    event->record(impl.getStream(device));
    return event;
  }

  double device_time_us(const torch::Device& device, const c10::Event& event) {
    const Anchor* anchor = find_anchor(device);
    event.synchronize();
    return anchor->host_us + anchor->event->elapsedTime(event) * 1000.0;
  }

  std::mutex mutex_;
  Clock::time_point origin_;
  std::deque<Pending> pending_;
  std::vector<Anchor> anchors_;
};

namespace detail {

/// Records one slice for its lifetime; does nothing without a timeline.
class TimelineScope {
 public:
  TimelineScope(
      Timeline* timeline,
      int64_t partition,
      int64_t microbatch,
      Phase phase,
      const torch::Device& device)
      : timeline_(timeline) {
    if (timeline_ != nullptr) {
      token_ = timeline_->begin(partition, microbatch, phase, device);
    }
  }
  ~TimelineScope() {
    if (timeline_ != nullptr) {
      timeline_->end(token_);
    }
  }
  TimelineScope(TimelineScope&& other) noexcept
      : timeline_(std::exchange(other.timeline_, nullptr)),
        token_(other.token_) {}
  TimelineScope(const TimelineScope&) = delete;
  TimelineScope& operator=(const TimelineScope&) = delete;
  TimelineScope& operator=(TimelineScope&&) = delete;

 private:
  Timeline* timeline_;
  size_t token_ = 0;
};

} // namespace detail
} // namespace gpipe
