// Where a pipe in one process runs each partition: its device, its lane
// (the worker thread that runs its actions, Note [One worker per device]),
// and which lane owns each parameter. Fixed when the pipe is built.
#pragma once

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <unordered_map>
#include <vector>

namespace gpipe::detail {

/// Explicit lanes: one per partition, numbered 0..L-1 with none unused,
/// each lane on one device, and a CUDA device on one lane only (its
/// compute stream is one queue: two lanes would only take turns on it).
inline void check_lanes(
    const std::vector<int64_t>& lanes,
    const std::vector<torch::Device>& devices) {
  const auto n = static_cast<int64_t>(devices.size());
  TORCH_CHECK(
      static_cast<int64_t>(lanes.size()) == n,
      "gpipe: lanes needs one entry per partition (partitions: ",
      n,
      ", lanes: [",
      c10::Join(", ", lanes),
      "])");
  const int64_t count = *std::max_element(lanes.begin(), lanes.end()) + 1;
  std::vector<std::optional<torch::Device>> device_of_lane(
      static_cast<size_t>(std::max<int64_t>(count, 0)));
  for (int64_t j = 0; j < n; ++j) {
    const int64_t lane = lanes[static_cast<size_t>(j)];
    TORCH_CHECK(
        lane >= 0,
        "gpipe: lanes must be 0 or more (lanes: [",
        c10::Join(", ", lanes),
        "])");
    const auto& device = devices[static_cast<size_t>(j)];
    auto& seen = device_of_lane[static_cast<size_t>(lane)];
    TORCH_CHECK(
        !seen || *seen == device,
        "gpipe: lane ",
        lane,
        " holds partitions on ",
        *seen,
        " and ",
        device,
        "; a lane runs partitions of one device (lanes: [",
        c10::Join(", ", lanes),
        "], devices: [",
        c10::Join(", ", devices),
        "])");
    seen = device;
  }
  for (int64_t lane = 0; lane < count; ++lane) {
    const auto& device = device_of_lane[static_cast<size_t>(lane)];
    TORCH_CHECK(
        device.has_value(),
        "gpipe: lanes are numbered 0 to ",
        count - 1,
        " but lane ",
        lane,
        " has no partition (lanes: [",
        c10::Join(", ", lanes),
        "])");
    for (int64_t other = 0; other < lane; ++other) {
      TORCH_CHECK(
          !device->is_cuda() ||
              device_of_lane[static_cast<size_t>(other)] != device,
          "gpipe: lanes ",
          other,
          " and ",
          lane,
          " are both on ",
          *device,
          "; a CUDA device runs one lane (its partitions take turns on its "
          "stream anyway)");
    }
  }
}

/// Each partition's lane, and each lane's device.
struct LanePlacement {
  std::vector<size_t> lane_of_partition;
  std::vector<torch::Device> lane_devices;
};

/// Gives each partition a lane: `lanes` when given, else one lane per
/// device, and one per CPU partition with `concurrent_cpu_partitions`.
inline LanePlacement place_on_lanes(
    const std::vector<torch::Device>& devices,
    const std::vector<int64_t>& lanes,
    bool concurrent_cpu_partitions) {
  if (!lanes.empty()) {
    TORCH_CHECK(
        !concurrent_cpu_partitions,
        "gpipe: give either lanes or concurrent_cpu_partitions, not both ",
        "(concurrent_cpu_partitions(true) is the shorthand for one lane per ",
        "CPU partition)");
    check_lanes(lanes, devices);
  }
  LanePlacement placement;
  auto& lane_devices = placement.lane_devices;
  for (size_t j = 0; j < devices.size(); ++j) {
    const auto& device = devices[j];
    if (!lanes.empty()) {
      const auto lane = static_cast<size_t>(lanes[j]);
      if (lane >= lane_devices.size()) {
        lane_devices.resize(lane + 1, device);
      }
      lane_devices[lane] = device;
      placement.lane_of_partition.push_back(lane);
      continue;
    }
    const bool own_lane = device.is_cpu() && concurrent_cpu_partitions;
    const auto found =
        std::find(lane_devices.begin(), lane_devices.end(), device);
    if (own_lane || found == lane_devices.end()) {
      placement.lane_of_partition.push_back(lane_devices.size());
      lane_devices.push_back(device);
    } else {
      placement.lane_of_partition.push_back(
          static_cast<size_t>(found - lane_devices.begin()));
    }
  }
  return placement;
}

/// Per parameter: the one lane whose partitions register it, or -1.
inline std::unordered_map<const c10::TensorImpl*, int64_t> owner_lanes(
    const std::vector<torch::nn::Sequential>& partitions,
    const std::vector<size_t>& lane_of_partition) {
  std::unordered_map<const c10::TensorImpl*, int64_t> owner;
  for (size_t j = 0; j < partitions.size(); ++j) {
    const auto lane = static_cast<int64_t>(lane_of_partition[j]);
    for (const auto& parameter : partitions[j]->parameters()) {
      const auto found = owner.emplace(parameter.unsafeGetTensorImpl(), lane);
      if (!found.second && found.first->second != lane) {
        found.first->second = -1; // registered on several lanes
      }
    }
  }
  return owner;
}

/// A module (or parameter) lives on one device: partitions on different
/// devices cannot share it.
inline void reject_modules_shared_across_devices(
    const std::vector<torch::nn::Sequential>& partitions,
    const std::vector<torch::Device>& devices) {
  std::unordered_map<const void*, size_t> first_user;
  auto check = [&](const void* key, size_t j, const char* what) {
    const auto found = first_user.emplace(key, j);
    const size_t other = found.first->second;
    TORCH_CHECK(
        found.second || devices[other] == devices[j],
        "gpipe: a ",
        what,
        " is used by partitions ",
        other,
        " and ",
        j,
        ", which are on different devices (",
        devices[other],
        " and ",
        devices[j],
        "); it can live on one device only: share it between partitions "
        "on one device, or give each partition its own copy and declare "
        "the copies tied (GPipeOptions::tie)");
  };
  for (size_t j = 0; j < partitions.size(); ++j) {
    for (const auto& module : partitions[j]->modules(/*include_self=*/false)) {
      check(module.get(), j, "module");
    }
    for (const auto& parameter : partitions[j]->parameters()) {
      check(parameter.unsafeGetTensorImpl(), j, "parameter");
    }
  }
}

} // namespace gpipe::detail
