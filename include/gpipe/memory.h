// Peak memory per device for a region of code, on the CPU and on GPUs.
//
// Why the library has a meter: the memory a pipe saves is GPipe's second
// promise (re-materialization keeps one micro-batch of one stage alive, not
// the whole batch's activations), and users want to check it on their own
// models, not only in the example. The same call works on every device:
//   * CUDA (and other accelerators with a caching allocator): the allocator's
//     own statistics, `allocated_bytes` current and peak, reset per device.
//     Bytes handed out to tensors, not the cache the allocator reserves.
//   * CPU: LibTorch keeps no statistics, so the first CPU measurement installs
//     a counting allocator that wraps `c10::GetCPUAllocator()` for the rest of
//     the process. It counts bytes exactly, but only of blocks it allocated:
//     blocks that existed before it was installed are invisible to it (their
//     frees go to their original deleter), so call `track_cpu_memory()` at the
//     start of a program to see everything, parameters included.
// Peaks are process-wide per device: two meters running at once on one device
// reset each other's peak.
//
// Two kinds of number, named apart everywhere:
//   * absolute ("peak bytes"): everything allocated on the device at its
//     highest point, parameters and gradients included:
//     `MemoryMeter::peak_bytes`, `peak_bytes_during`;
//   * a rise ("peak increase bytes"): how far the peak went above what was
//     allocated when the measurement started, which for a training step whose
//     gradient buffers exist beforehand is its activations and temporaries:
//     `MemoryMeter::peak_increase_bytes`, `peak_increase_bytes_during`.
//
//   gpipe::track_cpu_memory();                      // first thing in main
//   ...
//   gpipe::MemoryMeter meter({torch::kCPU});
//   loss_fn(pipe(x), y).backward();
//   int64_t total = meter.peak_bytes(torch::kCPU);             // absolute
//   int64_t rise = meter.peak_increase_bytes(torch::kCPU);     // above start
#pragma once

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>
#include <torch/types.h>

#if __has_include(<c10/core/CachingDeviceAllocator.h>)
#include <c10/core/CachingDeviceAllocator.h>
#define GPIPE_DEVICE_ALLOCATOR_STATS 1
#elif __has_include(<c10/cuda/CUDACachingAllocator.h>)
#include <c10/cuda/CUDACachingAllocator.h>
#define GPIPE_CUDA_ALLOCATOR_STATS 1
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

namespace gpipe {

/// Bytes allocated on one device, as `memory_stats` reads them.
struct MemoryStats {
  /// Bytes allocated now.
  int64_t current_bytes = 0;
  /// Bytes allocated at the highest point since the device's peak was last
  /// reset (`reset_peak_memory`, or a `MemoryMeter` starting). Absolute:
  /// everything allocated then, not the rise above some start.
  int64_t peak_bytes = 0;
};

namespace detail {

/// Wraps another CPU allocator and counts the live bytes of the blocks it
/// hands out; see the note atop this header. Lives for the whole process, so
/// a block freed at any time finds its counter.
///
/// A block's context is its data pointer, as with the default allocator:
/// LibTorch's `raw_allocate` (used by some CPU kernels) insists on it. The
/// wrapped allocator's DataPtr is kept in a table until the block is freed.
class CountingCpuAllocator final : public c10::Allocator {
 public:
  explicit CountingCpuAllocator(c10::Allocator* wrapped) : wrapped_(wrapped) {}

  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr inner = wrapped_->allocate(n);
    void* data = inner.get();
    if (n == 0 || data == nullptr) {
      return inner; // nothing to count, and no unique address to key on
    }
    const c10::Device device = inner.device();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks_.emplace(data, Block{std::move(inner), static_cast<int64_t>(n)});
    }
    add(static_cast<int64_t>(n));
    return {data, data, &CountingCpuAllocator::free_block, device};
  }

  c10::DeleterFnPtr raw_deleter() const override {
    return &CountingCpuAllocator::free_block;
  }

  void copy_data(void* dest, const void* src, std::size_t count)
      const override {
    wrapped_->copy_data(dest, src, count);
  }

  MemoryStats stats() const {
    return {live_.load(), peak_.load()};
  }

  void reset_peak() {
    peak_.store(live_.load());
  }

  /// The one instance, set when it is installed (see `cpu_counter`).
  static CountingCpuAllocator*& instance() {
    static CountingCpuAllocator* installed = nullptr;
    return installed;
  }

 private:
  struct Block {
    c10::DataPtr inner; // frees the memory through the wrapped allocator
    int64_t bytes;
  };

  static void free_block(void* data) {
    CountingCpuAllocator* self = instance();
    c10::DataPtr inner;
    {
      std::lock_guard<std::mutex> lock(self->mutex_);
      const auto found = self->blocks_.find(data);
      if (found == self->blocks_.end()) {
        // Raw memory from before the counter was installed, freed through
        // `GetCPUAllocator()->raw_deallocate`: its original deleter frees it.
        const auto original = self->wrapped_->raw_deleter();
        TORCH_INTERNAL_ASSERT(
            original != nullptr,
            "gpipe: freeing a CPU block the counter never saw");
        original(data);
        return;
      }
      self->live_.fetch_sub(found->second.bytes);
      inner = std::move(found->second.inner);
      self->blocks_.erase(found);
    }
    // `inner` frees the memory here, outside the lock.
  }

  void add(int64_t bytes) {
    const int64_t live = live_.fetch_add(bytes) + bytes;
    int64_t peak = peak_.load();
    while (live > peak && !peak_.compare_exchange_weak(peak, live)) {
    }
  }

  c10::Allocator* wrapped_;
  std::mutex mutex_;
  std::unordered_map<void*, Block> blocks_;
  std::atomic<int64_t> live_{0};
  std::atomic<int64_t> peak_{0};
};

/// The process's counting allocator, installed on first use.
inline CountingCpuAllocator& cpu_counter() {
  // Leaked on purpose: blocks may be freed during static destruction.
  static CountingCpuAllocator* counter = [] {
    // Above the default allocator's priority (0), below what a user who
    // insists on their own allocator would pick.
    constexpr uint8_t kPriority = 100;
    auto* made = new CountingCpuAllocator(c10::GetCPUAllocator());
    CountingCpuAllocator::instance() = made;
    c10::SetCPUAllocator(made, kPriority);
    TORCH_CHECK(
        c10::GetCPUAllocator() == made,
        "gpipe: cannot count CPU memory: another CPU allocator was installed with a higher "
        "priority (gpipe's priority: ",
        static_cast<int>(kPriority),
        ")");
    return made;
  }();
  return *counter;
}

#if defined(GPIPE_DEVICE_ALLOCATOR_STATS)
inline c10::DeviceAllocator* device_allocator(const torch::Device& device) {
  auto* allocator = c10::getDeviceAllocator(device.type());
  if (!allocator->initialized()) {
    // The caching allocator starts with the device's first allocation.
    (void)torch::empty({1}, torch::TensorOptions().device(device));
  }
  return allocator;
}
#endif

inline c10::DeviceIndex index_of(const torch::Device& device) {
  return device.has_index() ? device.index() : 0;
}

/// Where LibTorch keeps statistics for CUDA devices only: fails for another.
inline void check_statistics_device(const torch::Device& device) {
  TORCH_CHECK(
      device.is_cuda(),
      "gpipe: memory statistics need a CPU or CUDA device (device: ",
      device,
      ")");
}

/// Where this LibTorch keeps no device statistics at all.
[[noreturn]] inline void no_device_statistics(const torch::Device& device) {
  TORCH_CHECK(
      false,
      "gpipe: this LibTorch has no device memory statistics (device: ",
      device,
      ")");
}

} // namespace detail

/// Starts counting CPU allocations now, for the rest of the process, by
/// installing a counting allocator in front of LibTorch's CPU allocator.
/// Calling it again does nothing. The counter sees only blocks allocated after
/// it was installed: call this first thing in `main` so that the model's
/// parameters are counted too. Every CPU call of this header installs it
/// when needed. Throws a c10::Error if another CPU allocator with a higher
/// priority than gpipe's (100) is installed, since nothing could be counted.
inline void track_cpu_memory() {
  (void)detail::cpu_counter();
}

/// Bytes allocated on `device` now and at its peak since the last reset
/// (both absolute). The CPU's numbers come from the counting allocator (see
/// `track_cpu_memory`); a CUDA device's from its caching allocator's
/// `allocated_bytes`, which this call starts if it was not yet. Throws a
/// c10::Error for a device whose LibTorch keeps no memory statistics.
inline MemoryStats memory_stats(const torch::Device& device) {
  if (device.is_cpu()) {
    return detail::cpu_counter().stats();
  }
#if defined(GPIPE_DEVICE_ALLOCATOR_STATS)
  const auto stats = detail::device_allocator(device)->getDeviceStats(
      detail::index_of(device));
  const auto& bytes = stats.allocated_bytes[static_cast<size_t>(
      c10::CachingAllocator::StatType::AGGREGATE)];
  return {bytes.current, bytes.peak};
#elif defined(GPIPE_CUDA_ALLOCATOR_STATS)
  detail::check_statistics_device(device);
  const auto stats =
      c10::cuda::CUDACachingAllocator::getDeviceStats(detail::index_of(device));
  return {stats.allocated_bytes[0].current, stats.allocated_bytes[0].peak};
#else
  detail::no_device_statistics(device);
#endif
}

/// Makes the peak of `device` its current value, so that a later
/// `memory_stats(device).peak_bytes` covers only what happens from now on.
/// Peaks are per device and process-wide: this also moves the peak that any
/// other running measurement of `device` would read.
inline void reset_peak_memory(const torch::Device& device) {
  if (device.is_cpu()) {
    detail::cpu_counter().reset_peak();
    return;
  }
#if defined(GPIPE_DEVICE_ALLOCATOR_STATS)
  detail::device_allocator(device)->resetPeakStats(detail::index_of(device));
#elif defined(GPIPE_CUDA_ALLOCATOR_STATS)
  detail::check_statistics_device(device);
  c10::cuda::CUDACachingAllocator::resetPeakStats(detail::index_of(device));
#else
  detail::no_device_statistics(device);
#endif
}

/// Measures a region of code on one or more devices: construct it (each
/// device's peak is reset and its current bytes recorded as the start), run
/// the region, then read per device the absolute peak (`peak_bytes`) or the
/// rise above the start (`peak_increase_bytes`).
///
///   gpipe::MemoryMeter meter({torch::kCPU});
///   train_step();
///   int64_t rise = meter.peak_increase_bytes(torch::kCPU);
///
/// The readings are live: read them right after the region, before other
/// work moves the peak. Two meters of one device at once share its peak
/// (constructing or resetting one resets the other's).
class MemoryMeter {
 public:
  /// Starts measuring `devices` (at least one); throws a c10::Error for an
  /// empty list or a device without memory statistics.
  explicit MemoryMeter(std::vector<torch::Device> devices)
      : devices_(std::move(devices)) {
    TORCH_CHECK(
        !devices_.empty(),
        "gpipe: MemoryMeter needs at least one device (devices: 0)");
    reset();
  }

  /// Restarts the measurement: every device's peak becomes its current bytes,
  /// which are recorded as the new start.
  void reset() {
    start_.clear();
    for (const auto& device : devices_) {
      reset_peak_memory(device);
      start_.push_back(memory_stats(device).current_bytes);
    }
  }

  /// Absolute: the most bytes allocated on `device` at any moment since the
  /// meter (re)started, including what was already allocated then
  /// (parameters, gradients, anything alive). For the rise above the start,
  /// use `peak_increase_bytes`. Throws a c10::Error for a device the meter
  /// does not measure.
  int64_t peak_bytes(const torch::Device& device) const {
    (void)slot(device);
    return memory_stats(device).peak_bytes;
  }

  /// The bytes allocated on `device` when the meter (re)started.
  int64_t start_bytes(const torch::Device& device) const {
    return start_[slot(device)];
  }

  /// A rise: how far `device` went above its start, `peak_bytes(device) -
  /// start_bytes(device)` (never negative). Measured around a training step
  /// whose gradient buffers exist beforehand (e.g. after a first step, with
  /// `zero_grad` keeping them), this is the step's activations and
  /// temporaries.
  int64_t peak_increase_bytes(const torch::Device& device) const {
    return std::max<int64_t>(0, peak_bytes(device) - start_bytes(device));
  }

  /// The devices measured, in the order given to the constructor.
  const std::vector<torch::Device>& devices() const {
    return devices_;
  }

 private:
  size_t slot(const torch::Device& device) const {
    const auto found = std::find(devices_.begin(), devices_.end(), device);
    TORCH_CHECK(
        found != devices_.end(),
        "gpipe: the meter does not measure this device (device: ",
        device,
        ")");
    return static_cast<size_t>(found - devices_.begin());
  }

  std::vector<torch::Device> devices_;
  std::vector<int64_t> start_;
};

/// Absolute: the most bytes allocated on `device` at any moment while `fn()`
/// ran, including what was allocated before it started (parameters,
/// gradients). Resets the device's peak, runs `fn`, reads the peak. For the
/// rise above the start, use `peak_increase_bytes_during`.
///
///   int64_t total = gpipe::peak_bytes_during(torch::kCPU, [&] { step(); });
template <typename Fn>
int64_t peak_bytes_during(const torch::Device& device, Fn&& fn) {
  MemoryMeter meter({device});
  std::forward<Fn>(fn)();
  return meter.peak_bytes(device);
}

/// A rise: how far the bytes allocated on `device` went above their level
/// at the start while `fn()` ran (`peak_bytes_during` minus the start, never
/// negative). Around a training step whose gradient buffers already exist,
/// this is the step's activations and temporaries.
///
///   int64_t activations =
///       gpipe::peak_increase_bytes_during(torch::kCPU, [&] { step(); });
template <typename Fn>
int64_t peak_increase_bytes_during(const torch::Device& device, Fn&& fn) {
  MemoryMeter meter({device});
  std::forward<Fn>(fn)();
  return meter.peak_increase_bytes(device);
}

/// The former name of `peak_bytes_during` (absolute, not a rise); kept so
/// that old code compiles.
template <typename Fn>
[[deprecated(
    "gpipe::peak_memory is the absolute peak: call peak_bytes_during, or "
    "peak_increase_bytes_during for the rise above the start")]] int64_t
peak_memory(const torch::Device& device, Fn&& fn) {
  return peak_bytes_during(device, std::forward<Fn>(fn));
}

} // namespace gpipe
