// GPipe: a Sequential cut into partitions on devices, fed micro-batches on the
// fill-drain schedule, trained as if it were the Sequential itself.
//
// GPipeImpl is a torch::nn::Module and GPipe its ModuleHolder, as LibTorch's
// own modules are built, so a pipe goes wherever a module goes: parameters()
// are the Sequential's own tensors in the same order, train()/eval() and to()
// behave as on any module, and `pipe(x)` calls forward.
#pragma once

#include <gpipe/detail/microbatch.h>
#include <gpipe/detail/partition.h>
#include <gpipe/detail/stage.h>
#include <gpipe/detail/transport.h>
#include <gpipe/detail/worker.h>
#include <gpipe/options.h>
#include <gpipe/schedule.h>
#include <gpipe/timeline.h>

#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <ostream>
#include <type_traits>
#include <vector>

namespace gpipe {

template <typename SequentialT>
class GPipeImpl : public torch::nn::Module {
  static_assert(
      std::is_same<SequentialT, torch::nn::Sequential>::value,
      "gpipe: GPipe wraps a torch::nn::Sequential");

 public:
  GPipeImpl(const SequentialT& sequential, GPipeOptions options_) : options(std::move(options_)) {
    TORCH_CHECK(!sequential.is_empty(), "gpipe: GPipe needs a Sequential, got an empty holder");
    TORCH_CHECK(
        options.microbatches() >= 1,
        "gpipe: microbatches must be at least 1 (microbatches: ",
        options.microbatches(),
        ")");
    options.balance(detail::resolve_balance(
        static_cast<int64_t>(sequential->size()), options.partitions(), options.balance()));
    options.devices(detail::resolve_devices(options.partitions(), options.devices()));
    partitions_ = detail::split_sequential(sequential, options.balance());
    auto registered = torch::nn::ModuleList();
    for (const auto& partition : partitions_) {
      registered->push_back(partition);
    }
    register_module("partitions", registered);
    place_on_devices(/*non_blocking=*/false);
  }

  /// The output of the whole Sequential for `input`, gathered on the last
  /// partition's device. `input` may live on any device.
  torch::Tensor forward(const torch::Tensor& input) {
    auto activations = detail::scatter(input, options.microbatches());
    const auto m = static_cast<int64_t>(activations.size());
    const auto n = static_cast<int64_t>(partitions_.size());

    std::vector<std::vector<torch::Tensor>> parameters(partitions_.size());
    bool any_parameter_requires_grad = false;
    for (size_t j = 0; j < partitions_.size(); ++j) {
      for (const auto& parameter : partitions_[j]->parameters()) {
        if (parameter.requires_grad()) {
          parameters[j].push_back(parameter);
        }
      }
      any_parameter_requires_grad |= !parameters[j].empty();
    }
    const bool needs_graph = torch::GradMode::is_enabled() &&
        (input.requires_grad() || any_parameter_requires_grad);

    auto run_cell = [&](int64_t i, int64_t j) {
      const auto& device = options.devices()[static_cast<size_t>(j)];
      const detail::CellIndex cell{i, j};
      torch::Tensor x = detail::with_cell_context(cell, "forward", [&] {
        const auto& from = activations[static_cast<size_t>(i)];
        if (from.device() == device) {
          return from;
        }
        detail::TimelineScope recording(timeline_.get(), j, i, Phase::Copy, device);
        return transport_.send(from, device);
      });
      const auto& params = parameters[static_cast<size_t>(j)];
      if (!needs_graph || (!x.requires_grad() && params.empty())) {
        detail::TimelineScope recording(timeline_.get(), j, i, Phase::Forward, device);
        activations[static_cast<size_t>(i)] = detail::with_cell_context(
            cell, "forward", [&] { return partitions_[static_cast<size_t>(j)]->forward(x); });
        return;
      }
      auto state = c10::make_intrusive<detail::StageState>(
          partitions_[static_cast<size_t>(j)], cell, device, checkpointed(i, m), timeline_);
      state->parameters = params;
      activations[static_cast<size_t>(i)] = detail::with_cell_context(cell, "forward", [&] {
        return detail::StageFunction::apply(state, x, at::TensorList(params))[0];
      });
    };

    const detail::CallerContext caller = capture_caller_context();
    for (const auto& tick : clock_cycles(m, n)) {
      run_tick(tick, run_cell, caller);
    }
    return detail::gather(activations);
  }

  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false) override {
    set_single_device(device);
    torch::nn::Module::to(device, dtype, non_blocking);
  }

  void to(torch::Device device, bool non_blocking = false) override {
    set_single_device(device);
    torch::nn::Module::to(device, non_blocking);
  }

  using torch::nn::Module::to;

  void pretty_print(std::ostream& stream) const override {
    stream << "gpipe::GPipe(partitions=" << options.partitions()
           << ", microbatches=" << options.microbatches()
           << ", checkpoint=" << options.checkpoint() << ", balance=[";
    for (size_t j = 0; j < options.balance().size(); ++j) {
      stream << (j ? ", " : "") << options.balance()[j];
    }
    stream << "], devices=[";
    for (size_t j = 0; j < options.devices().size(); ++j) {
      stream << (j ? ", " : "") << options.devices()[j];
    }
    stream << "])";
  }

  /// Records every slice of later steps into `timeline` (null: stop).
  void set_timeline(std::shared_ptr<Timeline> timeline) {
    timeline_ = std::move(timeline);
  }

  const std::shared_ptr<Timeline>& timeline() const {
    return timeline_;
  }

  /// The partitions, each a Sequential sharing the wrapped one's modules.
  const std::vector<torch::nn::Sequential>& partitions() const {
    return partitions_;
  }

  /// The options, with balance and devices filled in as resolved.
  GPipeOptions options;

 private:
  bool checkpointed(int64_t i, int64_t m) const {
    if (!is_training()) {
      return false;
    }
    switch (options.checkpoint()) {
      case Checkpoint::Never:
        return false;
      case Checkpoint::ExceptLast:
        return i < m - 1;
      case Checkpoint::Always:
        return true;
    }
    return false;
  }

  void place_on_devices(bool non_blocking) {
    unique_devices_.clear();
    for (size_t j = 0; j < partitions_.size(); ++j) {
      const auto& device = options.devices()[j];
      partitions_[j]->to(device, non_blocking);
      if (std::find(unique_devices_.begin(), unique_devices_.end(), device) ==
          unique_devices_.end()) {
        unique_devices_.push_back(device);
      }
    }
    workers_.clear();
    workers_.resize(unique_devices_.size());
  }

  void set_single_device(const torch::Device& device) {
    options.devices(std::vector<torch::Device>(
        partitions_.size(), detail::normalize_device(device)));
    place_on_devices(/*non_blocking=*/false);
  }

  size_t device_slot(const torch::Device& device) const {
    return static_cast<size_t>(
        std::find(unique_devices_.begin(), unique_devices_.end(), device) -
        unique_devices_.begin());
  }

  detail::CallerContext capture_caller_context() const {
    detail::CallerContext caller{at::ThreadLocalState(), {}};
    for (const auto& device : unique_devices_) {
      if (device.is_cuda()) {
        caller.current_streams.push_back(
            c10::impl::VirtualGuardImpl(device.type()).getStream(device));
      }
    }
    return caller;
  }

  /// Runs one clock tick: the cells of each device in partition order, the
  /// devices at once (Note [One worker per device]); the first device's cells
  /// run on the caller's thread.
  template <typename RunCell>
  void run_tick(
      const ClockTick& tick,
      RunCell& run_cell,
      const detail::CallerContext& caller) {
    std::vector<detail::DeviceTask> tasks;
    std::vector<std::vector<std::pair<int64_t, int64_t>>> cells_of_task;
    std::vector<size_t> slot_of_task;
    for (const auto& cell : tick) {
      const size_t slot = device_slot(options.devices()[static_cast<size_t>(cell.second)]);
      auto found = std::find(slot_of_task.begin(), slot_of_task.end(), slot);
      if (found == slot_of_task.end()) {
        slot_of_task.push_back(slot);
        cells_of_task.emplace_back();
        found = slot_of_task.end() - 1;
      }
      cells_of_task[static_cast<size_t>(found - slot_of_task.begin())].push_back(cell);
    }
    const bool alone = slot_of_task.size() == 1;
    for (size_t t = 0; t < slot_of_task.size(); ++t) {
      const size_t slot = slot_of_task[t];
      detail::Worker* worker = nullptr;
      if (!alone && slot != 0) {
        if (!workers_[slot]) {
          workers_[slot] = std::make_unique<detail::Worker>();
        }
        worker = workers_[slot].get();
      }
      tasks.push_back(detail::DeviceTask{
          worker, unique_devices_[slot], [&run_cell, cells = cells_of_task[t]] {
            for (const auto& cell : cells) {
              run_cell(cell.first, cell.second);
            }
          }});
    }
    detail::run_on_workers(tasks, caller);
  }

  std::vector<torch::nn::Sequential> partitions_;
  std::vector<torch::Device> unique_devices_;
  std::vector<std::unique_ptr<detail::Worker>> workers_;
  detail::LocalTransport transport_;
  std::shared_ptr<Timeline> timeline_;
};

/// A ModuleHolder for GPipeImpl (TORCH_MODULE cannot wrap a template).
template <typename SequentialT>
class GPipe : public torch::nn::ModuleHolder<GPipeImpl<SequentialT>> {
 public:
  using torch::nn::ModuleHolder<GPipeImpl<SequentialT>>::ModuleHolder;
};

} // namespace gpipe
