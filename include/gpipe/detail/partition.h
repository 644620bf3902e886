// Cutting a Sequential into partitions and choosing their devices.
//
// A partition is a new Sequential that holds the very same modules as the
// user's (AnyModule shares the module), so parameters, gradients and
// optimizer state stay the user's and nothing is copied.
#pragma once

#include <c10/util/Exception.h>
#include <torch/cuda.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/types.h>

#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

namespace gpipe::detail {

/// Checks `partitions` against `layers`; `verb` names what the layers are for
/// ("pipeline", "balance") in the message about an empty Sequential.
inline void check_partition_count(
    int64_t layers,
    int64_t partitions,
    const char* verb) {
  TORCH_CHECK(
      layers >= 1,
      "gpipe: cannot ",
      verb,
      " an empty Sequential (layers: ",
      layers,
      ")");
  TORCH_CHECK(
      partitions >= 1,
      "gpipe: partitions must be at least 1 (partitions: ",
      partitions,
      ")");
  TORCH_CHECK(
      partitions <= layers,
      "gpipe: more partitions than layers (partitions: ",
      partitions,
      ", layers: ",
      layers,
      ")");
}

/// The line under an error about a balance that does not fit the Sequential:
/// where to get one that does.
constexpr const char* kBalanceHint =
    "\nchoose a balance from measured costs with <gpipe/balance.h> "
    "(gpipe::balance_by_time, gpipe::balance_by_memory)";

/// Layers per partition: `balance` checked against the Sequential, or an even
/// split by count (the first `layers % partitions` partitions get one more).
inline std::vector<int64_t> resolve_balance(
    int64_t layers,
    int64_t partitions,
    const std::vector<int64_t>& balance) {
  check_partition_count(layers, partitions, "pipeline");
  if (balance.empty()) {
    std::vector<int64_t> even(
        static_cast<size_t>(partitions), layers / partitions);
    for (int64_t j = 0; j < layers % partitions; ++j) {
      ++even[static_cast<size_t>(j)];
    }
    return even;
  }
  TORCH_CHECK(
      static_cast<int64_t>(balance.size()) == partitions,
      "gpipe: balance and partitions have different lengths (balance: ",
      balance.size(),
      ", partitions: ",
      partitions,
      ")",
      kBalanceHint);
  for (size_t j = 0; j < balance.size(); ++j) {
    TORCH_CHECK(
        balance[j] >= 1,
        "gpipe: every partition needs at least one layer (balance[",
        j,
        "]: ",
        balance[j],
        ")",
        kBalanceHint);
  }
  const int64_t sum =
      std::accumulate(balance.begin(), balance.end(), int64_t{0});
  TORCH_CHECK(
      sum == layers,
      "gpipe: balance does not sum to the number of layers (sum of balance: ",
      sum,
      ", layers: ",
      layers,
      ")",
      kBalanceHint);
  return balance;
}

/// A device with an index: "cuda" becomes the current CUDA device, so that
/// equal devices compare equal and RNG generators can be looked up.
inline torch::Device normalize_device(const torch::Device& device) {
  if (device.is_cuda()) {
    TORCH_CHECK(
        torch::cuda::is_available(),
        "gpipe: device ",
        device,
        " asked for, but no CUDA device is available");
    const auto count = static_cast<int64_t>(torch::cuda::device_count());
    const int64_t index = device.has_index() ? device.index() : 0;
    TORCH_CHECK(
        index < count,
        "gpipe: device ",
        device,
        " is not available (CUDA devices: ",
        count,
        ")");
    return torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(index));
  }
  TORCH_CHECK(
      device.is_cpu(),
      "gpipe: only CPU and CUDA devices are supported (device: ",
      device,
      ")");
  return torch::Device(torch::kCPU);
}

/// One device per partition: the user's (at least `partitions` of them), or
/// partition j on CUDA device j mod (visible devices), else the CPU.
inline std::vector<torch::Device> resolve_devices(
    int64_t partitions,
    const std::vector<torch::Device>& devices) {
  std::vector<torch::Device> resolved;
  resolved.reserve(static_cast<size_t>(partitions));
  if (!devices.empty()) {
    TORCH_CHECK(
        static_cast<int64_t>(devices.size()) >= partitions,
        "gpipe: fewer devices than partitions (devices: ",
        devices.size(),
        ", partitions: ",
        partitions,
        ")");
    for (int64_t j = 0; j < partitions; ++j) {
      resolved.push_back(normalize_device(devices[static_cast<size_t>(j)]));
    }
    return resolved;
  }
  const auto count = static_cast<int64_t>(torch::cuda::device_count());
  for (int64_t j = 0; j < partitions; ++j) {
    resolved.push_back(
        count > 0 ? torch::Device(
                        torch::kCUDA, static_cast<c10::DeviceIndex>(j % count))
                  : torch::Device(torch::kCPU));
  }
  return resolved;
}

/// Consecutive runs of `balance[j]` layers of `sequential`, sharing its
/// modules.
inline std::vector<torch::nn::Sequential> split_sequential(
    const torch::nn::Sequential& sequential,
    const std::vector<int64_t>& balance) {
  std::vector<torch::nn::Sequential> partitions;
  partitions.reserve(balance.size());
  auto layer = sequential->begin();
  size_t index = 0;
  for (const int64_t size : balance) {
    torch::nn::Sequential partition;
    for (int64_t l = 0; l < size; ++l, ++layer, ++index) {
      // Keep the Sequential's own layer index as the name, so that
      // named_parameters() reads "partitions.1.15.weight" for layer 15.
      partition->push_back(std::to_string(index), *layer);
    }
    partitions.push_back(std::move(partition));
  }
  return partitions;
}

} // namespace gpipe::detail
