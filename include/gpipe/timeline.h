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
//
// Note [A timeline for long runs]
// Training runs for days, and a user watches it by reading `events()` from a
// monitor thread. So recording never waits for a reader, and the timeline is
// bounded.
//  - Slice n (numbers from one atomic counter) lives in slot n % W of a ring
//    of W slots (W: the window, 65,536 by default), or in slot n when the
//    timeline keeps everything (window 0). Slots sit in a StableArray, blocks
//    that never move, so finding one takes no lock. Each slot has its own
//    SpinLock, held for a few loads and stores only (never a copy of the
//    history, a sort, an allocation or a device call), by the lane writing
//    it or by a reader copying that one slot: a lane waits for a reader at
//    most one slot's copy, and only where both are at the same slot. The rest
//    of a read (walking the ring, waiting for CUDA events and turning them
//    into times, sorting) runs outside every lock a lane takes.
//  - A slot's stamp (n + 1) says which slice it holds. Slice n + W takes slot
//    n's place, with its CUDA events when no reader holds them (else they
//    are freed when the last reader lets go); a late `end` of slice n sees
//    the stamp changed and drops it.
#pragma once

#include <gpipe/schedule.h>

#include <c10/core/Event.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/util/Exception.h>
#include <torch/arg.h>
#include <torch/types.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
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

namespace detail {

/// The steady clock in microseconds since its epoch: slots keep these.
inline double steady_us() {
  return std::chrono::duration<double, std::micro>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

/// A lock for a few loads and stores: spins a little, then yields.
class SpinLock {
 public:
  void lock() noexcept {
    int spins = 0;
    while (locked_.exchange(true, std::memory_order_acquire)) {
      while (locked_.load(std::memory_order_relaxed)) {
        if (++spins > 64) {
          std::this_thread::yield();
        }
      }
    }
  }
  void unlock() noexcept {
    locked_.store(false, std::memory_order_release);
  }

 private:
  std::atomic<bool> locked_{false};
};

/// An array whose elements never move: block b holds kFirstBlock << b
/// elements, allocated by whichever thread first needs one of them (the
/// others' allocations lose a compare-exchange and are freed). With a
/// `limit`, the last block is cut to it, so a ring of W slots costs W slots.
template <typename T>
class StableArray {
 public:
  /// `limit`: the number of elements ever used; 0: as many as 40 blocks
  /// hold (2.8e14: nine years of a million slices a second).
  explicit StableArray(uint64_t limit) : limit_(limit) {}
  ~StableArray() {
    for (auto& block : blocks_) {
      delete[] block.load(std::memory_order_acquire);
    }
  }
  StableArray(const StableArray&) = delete;
  StableArray& operator=(const StableArray&) = delete;

  /// The element at `index` (below the limit), its block allocated if needed.
  T& at(uint64_t index) {
    const auto [b, offset] = locate(index);
    T* block = blocks_[b].load(std::memory_order_acquire);
    if (block == nullptr) {
      T* fresh = new T[block_size(b)];
      if (blocks_[b].compare_exchange_strong(
              block, fresh, std::memory_order_acq_rel)) {
        block = fresh;
      } else {
        delete[] fresh;
      }
    }
    return block[offset];
  }

  /// The element at `index`, or null where its block was never allocated.
  T* find(uint64_t index) const {
    const auto [b, offset] = locate(index);
    T* block = blocks_[b].load(std::memory_order_acquire);
    return block == nullptr ? nullptr : block + offset;
  }

 private:
  static constexpr uint64_t kFirstBlock = 256;

  /// Block b covers the indices kFirstBlock * (2^b - 1) up to the next one's.
  static std::pair<size_t, uint64_t> locate(uint64_t index) {
    const uint64_t k = index / kFirstBlock + 1;
    size_t b = 0;
    while ((k >> (b + 1)) != 0) {
      ++b;
    }
    return {b, index - first_index(b)};
  }
  static uint64_t first_index(size_t b) {
    return kFirstBlock * ((uint64_t{1} << b) - 1);
  }
  uint64_t block_size(size_t b) const {
    const uint64_t full = kFirstBlock << b;
    return limit_ == 0 ? full : std::min(full, limit_ - first_index(b));
  }

  uint64_t limit_;
  std::array<std::atomic<T*>, 40> blocks_{}; // zeroed: value-initialized
};

/// The two device events of a slice on a device that times with events
/// (CUDA), and their times once a reader has waited for them. Lanes record
/// the events; a span goes back to a lane for the next slice in its slot
/// only when no reader holds it (Timeline::take_span).
struct DeviceSpan {
  explicit DeviceSpan(const torch::Device& device)
      : device(device),
        start(device.type(), c10::EventFlag::BACKEND_DEFAULT),
        stop(device.type(), c10::EventFlag::BACKEND_DEFAULT) {}

  torch::Device device;
  c10::Event start;
  c10::Event stop;
  // Written by readers under Timeline::reader_mutex_.
  bool resolved = false;
  double start_us = 0;
  double end_us = 0;
};

/// A device event known to have completed by host time `host_us`: device
/// times are this plus the elapsed time from it.
struct DeviceAnchor {
  /// Records an event on `stream` and waits for it (and so for the work
  /// queued on the stream before it).
  DeviceAnchor(const torch::Device& device, const c10::Stream& stream)
      : device(device), event(device.type(), c10::EventFlag::BACKEND_DEFAULT) {
    event.record(stream);
    event.synchronize();
    host_us = steady_us();
  }

  torch::Device device;
  c10::Event event;
  double host_us = 0;
};

/// One slot of the ring; see Note [A timeline for long runs].
struct TimelineSlot {
  SpinLock lock;
  /// The slice's number plus one; 0: empty.
  uint64_t stamp = 0;
  bool finished = false;
  /// The slice, its times absolute (steady_us) until a reader copies it.
  TimelineEvent event;
  /// The device events where the device times with events, else null.
  std::shared_ptr<DeviceSpan> span;
};

/// What a reader copies out of one slot, under the slot's lock.
struct SlotCopy {
  uint64_t number = 0;
  TimelineEvent event;
  std::shared_ptr<DeviceSpan> span;
};

} // namespace detail

/// Options of a Timeline: `Timeline(TimelineOptions().window(4096))`.
struct TimelineOptions {
  TimelineOptions() = default;

  /// The most slices the timeline holds: the newest ones are kept (see Note
  /// [A timeline for long runs]); 0 keeps every slice, for a short run.
  TORCH_ARG(int64_t, window) = 65536;
};

/// A thread-safe, bounded recorder of slices; see the notes atop this header.
class Timeline {
 public:
  /// A timeline that keeps the newest 65,536 slices.
  Timeline() : Timeline(TimelineOptions()) {}

  /// A timeline with `options`; throws where the window is negative.
  explicit Timeline(TimelineOptions options)
      : options_(checked(options)),
        capacity_(static_cast<uint64_t>(options_.window())),
        slots_(capacity_),
        origin_us_(detail::steady_us()) {}

  ~Timeline() {
    for (auto& anchor : lane_anchors_) {
      delete anchor.load(std::memory_order_acquire);
    }
  }
  Timeline(const Timeline&) = delete;
  Timeline& operator=(const Timeline&) = delete;

  /// The options it was built with.
  const TimelineOptions& options() const {
    return options_;
  }

  /// Starts a slice and returns its token for `end`.
  size_t begin(
      int64_t partition,
      int64_t microbatch,
      Phase phase,
      const torch::Device& device) {
    if (device.is_cuda()) {
      ensure_lane_anchor(device);
    }
    const uint64_t number = next_.fetch_add(1, std::memory_order_acq_rel);
    auto& slot = slots_.at(index_of(number));
    std::shared_ptr<detail::DeviceSpan> previous; // freed outside the lock
    const double begin_us = detail::steady_us();
    {
      std::lock_guard<detail::SpinLock> lock(slot.lock);
      previous = std::move(slot.span);
      slot.stamp = number + 1;
      slot.finished = false;
      slot.event = {partition, microbatch, phase, device, begin_us, begin_us};
    }
    if (device.is_cuda()) {
      auto span = take_span(std::move(previous), device);
      c10::impl::VirtualGuardImpl impl(device.type());
      span->start.record(impl.getStream(device));
      std::lock_guard<detail::SpinLock> lock(slot.lock);
      if (slot.stamp == number + 1) {
        slot.span = std::move(span);
      }
    }
    return static_cast<size_t>(number);
  }

  /// Ends the slice `token` returned by `begin`. A slice whose slot a newer
  /// one took meanwhile (more than `window` slices in flight) is dropped.
  void end(size_t token) {
    const uint64_t number = token;
    detail::TimelineSlot* slot = slots_.find(index_of(number));
    if (slot == nullptr) {
      return;
    }
    std::shared_ptr<detail::DeviceSpan> span;
    {
      std::lock_guard<detail::SpinLock> lock(slot->lock);
      if (slot->stamp != number + 1 || slot->finished) {
        return;
      }
      span = slot->span;
    }
    if (span != nullptr) {
      c10::impl::VirtualGuardImpl impl(span->device.type());
      span->stop.record(impl.getStream(span->device));
    }
    const double end_us = detail::steady_us();
    std::lock_guard<detail::SpinLock> lock(slot->lock);
    if (slot->stamp == number + 1) {
      slot->event.end_us = end_us;
      slot->finished = true;
    }
  }

  /// The finished slices in the window, ordered by start; waits for the CUDA
  /// work they recorded. Lanes keep recording meanwhile: a read during
  /// training sees each slice at most once, and may miss one that a newer
  /// slice pushes out of the window while the read walks the ring.
  std::vector<TimelineEvent> events() {
    auto copies = snapshot();
    resolve_device_times(copies);
    const double origin = origin_us_.load(std::memory_order_acquire);
    std::vector<TimelineEvent> events;
    events.reserve(copies.size());
    for (const auto& copy : copies) {
      events.push_back(copy.event);
      events.back().start_us -= origin;
      events.back().end_us -= origin;
    }
    // The copies come oldest first, so the host's slices are about in order
    // already; ties keep that order.
    auto by_start = [](const TimelineEvent& a, const TimelineEvent& b) {
      return a.start_us < b.start_us;
    };
    if (!std::is_sorted(events.begin(), events.end(), by_start)) {
      std::stable_sort(events.begin(), events.end(), by_start);
    }
    return events;
  }

  /// How many finished slices it holds now: never more than the window.
  size_t size() const {
    const uint64_t floor = floor_.load(std::memory_order_acquire);
    size_t count = 0;
    for (uint64_t i = 0, n = slots_in_use(); i < n; ++i) {
      auto* slot = slots_.find(i);
      if (slot != nullptr) {
        std::lock_guard<detail::SpinLock> lock(slot->lock);
        count += slot->stamp > floor && slot->finished;
      }
    }
    return count;
  }

  /// Forgets every slice (and frees their CUDA events) and restarts the
  /// clock. Slices begun before and ended after it are dropped.
  void clear() {
    const uint64_t floor = next_.load(std::memory_order_acquire);
    floor_.store(floor, std::memory_order_release);
    origin_us_.store(detail::steady_us(), std::memory_order_release);
    for (uint64_t i = 0, n = slots_in_use(); i < n; ++i) {
      auto* slot = slots_.find(i);
      if (slot == nullptr) {
        continue;
      }
      std::shared_ptr<detail::DeviceSpan> forgotten; // freed outside the lock
      std::lock_guard<detail::SpinLock> lock(slot->lock);
      if (slot->stamp != 0 && slot->stamp <= floor) {
        slot->stamp = 0;
        slot->finished = false;
        forgotten = std::move(slot->span);
      }
    }
  }

 private:
  /// A reader makes a fresh anchor for a device when the newest is older
  /// than this: CUDA's elapsed times are floats in milliseconds, a
  /// microsecond's precision up to about 16 s.
  static constexpr double kAnchorAge_us = 10e6;
  /// Reader anchors kept per timeline (older slices use the lane anchor).
  static constexpr size_t kReaderAnchors = 64;

  static const TimelineOptions& checked(const TimelineOptions& options) {
    TORCH_CHECK(
        options.window() >= 0,
        "gpipe: a timeline's window is a number of slices, 0 to keep them "
        "all (window: ",
        options.window(),
        ")");
    return options;
  }

  uint64_t index_of(uint64_t number) const {
    return capacity_ == 0 ? number : number % capacity_;
  }

  uint64_t slots_in_use() const {
    const uint64_t next = next_.load(std::memory_order_acquire);
    return capacity_ == 0 ? next : std::min(next, capacity_);
  }

  /// Copies every finished slice since the last clear, one slot at a time,
  /// oldest first.
  std::vector<detail::SlotCopy> snapshot() const {
    const uint64_t floor = floor_.load(std::memory_order_acquire);
    const uint64_t next = next_.load(std::memory_order_acquire);
    const uint64_t n = slots_in_use();
    const uint64_t oldest = capacity_ == 0 ? 0 : next % capacity_;
    std::vector<detail::SlotCopy> copies;
    copies.reserve(static_cast<size_t>(n)); // allocated before any lock
    for (uint64_t k = 0; k < n; ++k) {
      auto* slot = slots_.find(oldest + k < n ? oldest + k : oldest + k - n);
      if (slot == nullptr) {
        continue;
      }
      std::lock_guard<detail::SpinLock> lock(slot->lock);
      if (slot->stamp > floor && slot->finished) {
        copies.push_back({slot->stamp - 1, slot->event, slot->span});
      }
    }
    return copies;
  }

  /// The span for a new slice on `device`: the slot's previous one when it
  /// was on the same device and nobody else holds it, else a fresh one.
  static std::shared_ptr<detail::DeviceSpan> take_span(
      std::shared_ptr<detail::DeviceSpan> previous,
      const torch::Device& device) {
    if (previous != nullptr && previous->device == device &&
        previous.use_count() == 1) {
      // The last reader let go with a releasing decrement; acquire it before
      // touching what that reader wrote.
      std::atomic_thread_fence(std::memory_order_acquire);
      previous->resolved = false;
      return previous;
    }
    return std::make_shared<detail::DeviceSpan>(device);
  }

  // --- Device times: anchors and the reader's side ---------------------------

  const detail::DeviceAnchor* find_lane_anchor(
      const torch::Device& device) const {
    for (const auto& entry : lane_anchors_) {
      const auto* anchor = entry.load(std::memory_order_acquire);
      if (anchor == nullptr) {
        return nullptr;
      }
      if (anchor->device == device) {
        return anchor;
      }
    }
    return nullptr;
  }

  /// The first slice on a device waits for its stream once, to tie the
  /// device's clock to the host's; other lanes go on recording meanwhile
  /// (only lanes on a device new to the timeline take this mutex).
  void ensure_lane_anchor(const torch::Device& device) {
    if (find_lane_anchor(device) != nullptr) {
      return;
    }
    std::lock_guard<std::mutex> lock(lane_anchor_mutex_);
    if (find_lane_anchor(device) != nullptr) {
      return;
    }
    c10::impl::VirtualGuardImpl impl(device.type());
    auto anchor =
        std::make_unique<detail::DeviceAnchor>(device, impl.getStream(device));
    for (auto& entry : lane_anchors_) {
      if (entry.load(std::memory_order_acquire) == nullptr) {
        entry.store(anchor.release(), std::memory_order_release);
        return;
      }
    }
    TORCH_CHECK(
        false,
        "gpipe: a timeline records on at most ",
        lane_anchors_.size(),
        " devices (a slice on ",
        device,
        " would be one more)");
  }

  /// Turns the copies' device events into host times, waiting for them.
  /// Runs under reader_mutex_, which no lane takes.
  void resolve_device_times(std::vector<detail::SlotCopy>& copies) {
    const bool any = std::any_of(
        copies.begin(), copies.end(), [](const auto& c) { return c.span; });
    if (!any) {
      return;
    }
    std::lock_guard<std::mutex> lock(reader_mutex_);
    for (auto& copy : copies) {
      auto* span = copy.span.get();
      if (span == nullptr) {
        continue;
      }
      if (!span->resolved) {
        const auto& anchor = anchor_for(span->device, copy.event.start_us);
        span->start.synchronize();
        span->stop.synchronize();
        span->start_us =
            anchor.host_us + anchor.event.elapsedTime(span->start) * 1000.0;
        span->end_us =
            anchor.host_us + anchor.event.elapsedTime(span->stop) * 1000.0;
        span->resolved = true;
      }
      copy.event.start_us = span->start_us;
      copy.event.end_us = span->end_us;
    }
  }

  /// The newest anchor on `device` that completed before host time
  /// `begin_us` (so before the slice's first event), after making a fresh
  /// one on a side stream where the newest is old. Under reader_mutex_.
  const detail::DeviceAnchor& anchor_for(
      const torch::Device& device,
      double begin_us) {
    const detail::DeviceAnchor* best = find_lane_anchor(device);
    TORCH_CHECK(best, "gpipe: no anchor for ", device, " (a bug in gpipe)");
    double newest = best->host_us;
    for (const auto& anchor : reader_anchors_) {
      if (anchor->device == device) {
        newest = std::max(newest, anchor->host_us);
      }
    }
    if (detail::steady_us() - newest > kAnchorAge_us) {
      if (reader_anchors_.size() == kReaderAnchors) {
        reader_anchors_.erase(reader_anchors_.begin());
      }
      c10::impl::VirtualGuardImpl impl(device.type());
      reader_anchors_.push_back(std::make_unique<detail::DeviceAnchor>(
          device, impl.getStreamFromGlobalPool(device)));
    }
    for (const auto& anchor : reader_anchors_) {
      if (anchor->device == device && anchor->host_us <= begin_us &&
          anchor->host_us > best->host_us) {
        best = anchor.get();
      }
    }
    return *best;
  }

  TimelineOptions options_;
  /// The window; 0: no ring, every slice its own slot.
  uint64_t capacity_;
  detail::StableArray<detail::TimelineSlot> slots_;
  std::atomic<uint64_t> next_{0}; // the next slice's number
  std::atomic<uint64_t> floor_{0}; // slices numbered below were cleared
  std::atomic<double> origin_us_; // the steady_us that events() counts from
  /// One anchor per device, made by the first slice on it, never removed.
  std::array<std::atomic<detail::DeviceAnchor*>, 64> lane_anchors_{};
  std::mutex lane_anchor_mutex_;
  /// Readers' fresher anchors and every span's `resolved` times.
  std::mutex reader_mutex_;
  std::vector<std::unique_ptr<detail::DeviceAnchor>> reader_anchors_;
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
