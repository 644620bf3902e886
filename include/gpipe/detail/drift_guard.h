// The structure a pipe was built with, to notice a later change: the
// Sequential's list of layers and the structural options (partitions,
// balance, devices, lanes) are fixed at construction, and a change would
// otherwise be ignored silently. Checked at every call; it only compares,
// building a message on failure alone.
#pragma once

#include <gpipe/detail/partition.h>
#include <gpipe/options.h>

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/types.h>

#include <algorithm>
#include <string>
#include <vector>

namespace gpipe::detail {

class DriftGuard {
 public:
  DriftGuard(const torch::nn::Sequential& sequential, GPipeOptions built)
      : built_(std::move(built)) {
    for (size_t k = 0; k < sequential->size(); ++k) {
      layers_.push_back(sequential->ptr(k).get());
    }
  }

  /// The options as built.
  const GPipeOptions& built() const {
    return built_;
  }

  /// How many layers the Sequential had.
  size_t built_layers() const {
    return layers_.size();
  }

  /// Throws when `sequential` or the structural `options` changed.
  void check_unchanged(
      const torch::nn::Sequential& sequential,
      const GPipeOptions& options) const {
    const size_t now = sequential->size();
    bool same = now == layers_.size();
    for (size_t k = 0; same && k < now; ++k) {
      same = sequential->ptr(k).get() == layers_[k];
    }
    TORCH_CHECK(
        same,
        "gpipe: the Sequential changed after the pipe was built (layers: ",
        layers_.size(),
        " then, ",
        now,
        " now); a pipe splits the layers it was given: build a new GPipe "
        "around the changed Sequential");
    auto fixed = [](const char* name, const auto& then, const auto& now) {
      TORCH_CHECK(
          then == now,
          "gpipe: ",
          name,
          " is fixed when the pipe is built (",
          name,
          ": ",
          printable(then),
          " then, ",
          printable(now),
          " now); build a new GPipe to change it (microbatches, checkpoint, "
          "schedule, loss_reduction and deferred_batch_norm may change "
          "between calls)");
    };
    fixed("partitions", built_.partitions(), options.partitions());
    fixed("balance", built_.balance(), options.balance());
    fixed("devices", built_.devices(), options.devices());
    fixed("lanes", built_.lanes(), options.lanes());
    fixed(
        "concurrent_cpu_partitions",
        built_.concurrent_cpu_partitions(),
        options.concurrent_cpu_partitions());
    fixed("ties", built_.ties(), options.ties());
  }

  /// A pipe's partitions stay on the devices it was built with: moving
  /// them all to `device` is refused unless they are all there already.
  void check_stays_on_its_devices(const torch::Device& device) const {
    const auto target = normalize_device(device);
    const auto& devices = built_.devices();
    const bool already =
        std::all_of(devices.begin(), devices.end(), [&](const auto& d) {
          return d == target;
        });
    TORCH_CHECK(
        already,
        "gpipe: to(",
        device,
        ") would move every partition of the pipe to one device (devices: ",
        c10::Join(", ", devices),
        "); a pipe's partitions stay where it was built: build a new GPipe "
        "with GPipeOptions::devices to place them elsewhere (to(dtype) "
        "converts them where they are)");
  }

 private:
  template <typename T>
  static const T& printable(const T& value) {
    return value;
  }

  template <typename T>
  static std::string printable(const std::vector<T>& values) {
    return c10::Join(", ", values);
  }

  static std::string printable(
      const std::vector<std::vector<std::string>>& ties) {
    std::string out;
    for (const auto& names : ties) {
      out += (out.empty() ? "{" : ", {") + c10::Join(", ", names) + "}";
    }
    return out;
  }

  std::vector<const torch::nn::Module*> layers_;
  GPipeOptions built_;
};

} // namespace gpipe::detail
