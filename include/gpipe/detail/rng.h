// Saving and replaying random-number state for re-materialization.
//
// A checkpointed partition runs its forward twice: once without a graph, and
// again in backward to rebuild it. Dropout must draw the same mask both
// times, so the state of every generator the partition can draw from (the
// CPU's, and its CUDA device's) is captured before the first run and replayed
// around the second, after which the generators are put back where they were,
// so that recomputing never shifts what later code draws.
#pragma once

#include <ATen/Context.h>
#include <ATen/core/Generator.h>
#include <torch/types.h>

#include <mutex>
#include <optional>

namespace gpipe::detail {

inline at::Generator default_generator(const torch::Device& device) {
  return at::globalContext().defaultGenerator(device);
}

inline torch::Tensor generator_state(at::Generator generator) {
  std::lock_guard<std::mutex> lock(generator.mutex());
  return generator.get_state();
}

inline void set_generator_state(
    at::Generator generator,
    const torch::Tensor& state) {
  std::lock_guard<std::mutex> lock(generator.mutex());
  generator.set_state(state);
}

/// The states of the CPU generator and, for a CUDA device, its generator.
class RngSnapshot {
 public:
  static RngSnapshot capture(const torch::Device& device) {
    RngSnapshot snapshot;
    snapshot.cpu_state_ = generator_state(default_generator(torch::kCPU));
    if (device.is_cuda()) {
      snapshot.device_ = device;
      snapshot.device_state_ = generator_state(default_generator(device));
    }
    return snapshot;
  }

  void restore() const {
    set_generator_state(default_generator(torch::kCPU), cpu_state_);
    if (device_) {
      set_generator_state(default_generator(*device_), device_state_);
    }
  }

  const std::optional<torch::Device>& device() const {
    return device_;
  }

 private:
  torch::Tensor cpu_state_;
  std::optional<torch::Device> device_;
  torch::Tensor device_state_;
};

/// Replays `snapshot` for the guard's lifetime, then restores what was there.
class RngReplayGuard {
 public:
  explicit RngReplayGuard(const RngSnapshot& snapshot)
      : saved_(RngSnapshot::capture(snapshot.device().value_or(torch::kCPU))) {
    snapshot.restore();
  }
  ~RngReplayGuard() {
    saved_.restore();
  }
  RngReplayGuard(const RngReplayGuard&) = delete;
  RngReplayGuard& operator=(const RngReplayGuard&) = delete;

 private:
  RngSnapshot saved_;
};

} // namespace gpipe::detail
