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
#include <functional>
#include <memory>
#include <ostream>
#include <type_traits>
#include <utility>
#include <vector>

namespace gpipe {

template <typename SequentialT>
class GPipeImpl : public torch::nn::Module {
  static_assert(
      std::is_same<SequentialT, torch::nn::Sequential>::value,
      "gpipe: GPipe wraps a torch::nn::Sequential");

 public:
  GPipeImpl(const SequentialT& sequential, GPipeOptions options_)
      : options(std::move(options_)) {
    TORCH_CHECK(
        !sequential.is_empty(),
        "gpipe: GPipe needs a Sequential, got an empty holder");
    detail::check_microbatches(options.microbatches());
    options.balance(detail::resolve_balance(
        static_cast<int64_t>(sequential->size()),
        options.partitions(),
        options.balance()));
    options.devices(
        detail::resolve_devices(options.partitions(), options.devices()));
    partitions_ = detail::split_sequential(sequential, options.balance());
    auto registered = torch::nn::ModuleList();
    for (const auto& partition : partitions_) {
      registered->push_back(partition);
    }
    register_module("partitions", registered);
    place_on_devices(/*non_blocking=*/false);
  }

  /// The output of the whole Sequential for `input`, gathered on the last
  /// partition's device. `input` may live on any device. Backward (the
  /// user's `loss.backward()`) follows the autograd engine: across devices
  /// it overlaps as the engine's per-device threads allow.
  torch::Tensor forward(const torch::Tensor& input) {
    auto activations = detail::scatter(input, options.microbatches());
    const auto m = static_cast<int64_t>(activations.size());
    const auto n = static_cast<int64_t>(partitions_.size());
    const auto parameters = trainable_parameters();
    const bool needs_graph = torch::GradMode::is_enabled() &&
        (input.requires_grad() || any_nonempty(parameters));

    const detail::CallerContext caller = capture_caller_context();
    for (const auto& tick : clock_cycles(m, n)) {
      std::vector<WorkItem> items;
      items.reserve(tick.size());
      for (const auto& [i, j] : tick) {
        items.push_back(
            {j, [&, i = i, j = j] {
               auto& activation = activations[static_cast<size_t>(i)];
               activation = run_cell(
                   i, j, m, receive(activation, i, j), parameters, needs_graph);
             }});
      }
      run_round(items, caller);
    }
    return detail::gather(activations);
  }

  /// A loss for `step`: (output of a micro-batch, its target) -> scalar.
  using LossFunction =
      std::function<torch::Tensor(const torch::Tensor&, const torch::Tensor&)>;

  /// Forward and backward of the whole batch on `options.schedule()`:
  /// `loss_fn` is applied to each micro-batch's output and target (split
  /// like `input`, moved to the last partition's device), the micro-batch
  /// losses are combined by `options.loss_reduction()`, and gradients
  /// accumulate into `.grad` exactly as `loss_fn(seq(input), target)
  /// .backward()` would. Returns that loss, detached, on the last device.
  torch::Tensor step(
      const torch::Tensor& input,
      const torch::Tensor& target,
      const LossFunction& loss_fn) {
    TORCH_CHECK(
        static_cast<bool>(loss_fn),
        "gpipe: step needs a loss function, got an empty one");
    TORCH_CHECK(
        torch::GradMode::is_enabled(),
        "gpipe: step runs backward and cannot run with grad mode disabled (use forward under NoGradGuard)");
    auto inputs = detail::scatter(input, options.microbatches());
    detail::check_batch(target, "target");
    TORCH_CHECK(
        target.size(0) == input.size(0),
        "gpipe: target and input have different batch sizes (input: ",
        input.size(0),
        ", target: ",
        target.size(0),
        ")");
    const auto m = static_cast<int64_t>(inputs.size());
    const auto n = static_cast<int64_t>(partitions_.size());
    auto targets = torch::tensor_split(target, m, /*dim=*/0);
    const auto parameters = trainable_parameters();
    const bool needs_graph = input.requires_grad() || any_nonempty(parameters);
    const auto grid =
        lockstep(schedule_actions(options.schedule(), m, n), m, n);

    // Per cell (i, j): its input leaf and its output (with the cell's graph);
    // released by the cell's backward, so 1F1B keeps few alive.
    std::vector<std::vector<torch::Tensor>> leaves(
        static_cast<size_t>(m),
        std::vector<torch::Tensor>(static_cast<size_t>(n)));
    auto outputs = leaves;
    std::vector<torch::Tensor> losses(static_cast<size_t>(m));
    std::vector<torch::Tensor> loss_values(static_cast<size_t>(m));
    const auto batch = static_cast<double>(input.size(0));

    auto forward_cell = [&](int64_t i, int64_t j) {
      const auto ii = static_cast<size_t>(i);
      const auto jj = static_cast<size_t>(j);
      torch::Tensor x;
      if (j == 0) {
        x = receive(inputs[ii], i, j);
      } else {
        // A fresh leaf per cell: each cell's graph is backwarded on its own.
        const auto& previous = outputs[ii][jj - 1];
        x = receive(previous.detach(), i, j)
                .detach()
                .requires_grad_(previous.requires_grad());
        leaves[ii][jj] = x;
      }
      outputs[ii][jj] = run_cell(i, j, m, x, parameters, needs_graph);
      if (j == n - 1) {
        const auto& output = outputs[ii][jj];
        torch::Tensor loss = detail::with_cell_context({i, j}, "loss_fn", [&] {
          return loss_fn(output, receive(targets[ii], i, j));
        });
        TORCH_CHECK(
            loss.numel() == 1,
            "gpipe: loss_fn must return a scalar (micro-batch ",
            i,
            ", loss shape: ",
            loss.sizes(),
            ")");
        if (options.loss_reduction() == Reduction::Mean) {
          loss = loss * (static_cast<double>(output.size(0)) / batch);
        }
        losses[ii] = loss.reshape({});
        loss_values[ii] = losses[ii].detach();
      }
    };

    auto backward_cell = [&](int64_t i, int64_t j) {
      const auto ii = static_cast<size_t>(i);
      const auto jj = static_cast<size_t>(j);
      torch::Tensor root;
      torch::Tensor grad;
      if (j == n - 1) {
        root = std::exchange(losses[ii], torch::Tensor());
      } else if (leaves[ii][jj + 1].defined()) {
        grad = leaves[ii][jj + 1].grad();
        leaves[ii][jj + 1].reset();
        if (grad.defined()) {
          grad = receive_gradient(grad, j);
          root = outputs[ii][jj];
        }
      }
      if (root.defined() && root.requires_grad()) {
        detail::with_cell_context({i, j}, "backward", [&] {
          if (grad.defined()) {
            torch::autograd::backward({root}, {grad});
          } else {
            torch::autograd::backward({root});
          }
        });
      }
      outputs[ii][jj].reset();
    };

    const detail::CallerContext caller = capture_caller_context();
    for (const auto& row : grid) {
      std::vector<WorkItem> items;
      for (int64_t j = 0; j < n; ++j) {
        const auto& action = row[static_cast<size_t>(j)];
        if (!action) {
          continue;
        }
        const int64_t i = action->microbatch;
        if (action->kind == Action::Kind::Forward) {
          items.push_back({j, [&, i, j] { forward_cell(i, j); }});
        } else {
          items.push_back({j, [&, i, j] { backward_cell(i, j); }});
        }
      }
      run_round(items, caller);
    }
    torch::Tensor total = loss_values.front();
    for (size_t i = 1; i < loss_values.size(); ++i) {
      total = total + loss_values[i];
    }
    return total;
  }

  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false)
      override {
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

  /// Puts each partition on its device and gives each a lane: the worker
  /// that runs it (Note [One worker per device]). Partitions on one device
  /// share a lane, unless `concurrent_cpu_partitions` gives CPU partitions
  /// one each. The caller's thread serves lane 0.
  void place_on_devices(bool non_blocking) {
    lane_of_partition_.clear();
    lane_devices_.clear();
    for (size_t j = 0; j < partitions_.size(); ++j) {
      const auto& device = options.devices()[j];
      partitions_[j]->to(device, non_blocking);
      const bool own_lane =
          device.is_cpu() && options.concurrent_cpu_partitions();
      const auto found =
          std::find(lane_devices_.begin(), lane_devices_.end(), device);
      if (own_lane || found == lane_devices_.end()) {
        lane_of_partition_.push_back(lane_devices_.size());
        lane_devices_.push_back(device);
      } else {
        lane_of_partition_.push_back(
            static_cast<size_t>(found - lane_devices_.begin()));
      }
    }
    workers_.clear();
    workers_.resize(lane_devices_.size());
  }

  void set_single_device(const torch::Device& device) {
    options.devices(std::vector<torch::Device>(
        partitions_.size(), detail::normalize_device(device)));
    place_on_devices(/*non_blocking=*/false);
  }

  /// Per partition, its parameters that require grad (read at every call:
  /// users freeze and unfreeze between steps).
  std::vector<std::vector<torch::Tensor>> trainable_parameters() const {
    std::vector<std::vector<torch::Tensor>> parameters(partitions_.size());
    for (size_t j = 0; j < partitions_.size(); ++j) {
      for (const auto& parameter : partitions_[j]->parameters()) {
        if (parameter.requires_grad()) {
          parameters[j].push_back(parameter);
        }
      }
    }
    return parameters;
  }

  static bool any_nonempty(
      const std::vector<std::vector<torch::Tensor>>& lists) {
    return std::any_of(lists.begin(), lists.end(), [](const auto& list) {
      return !list.empty();
    });
  }

  /// `x` moved to partition j's device for micro-batch i (a recorded copy
  /// when it has to travel).
  torch::Tensor receive(const torch::Tensor& x, int64_t i, int64_t j) {
    const auto& device = options.devices()[static_cast<size_t>(j)];
    if (x.device() == device) {
      return x;
    }
    return detail::with_cell_context({i, j}, "copy", [&] {
      detail::TimelineScope recording(
          timeline_.get(), j, i, Phase::Copy, device);
      return transport_.send(x, device);
    });
  }

  /// A gradient moved back to partition j's device.
  torch::Tensor receive_gradient(const torch::Tensor& grad, int64_t j) {
    const auto& device = options.devices()[static_cast<size_t>(j)];
    if (grad.device() == device) {
      return grad;
    }
    torch::NoGradGuard no_grad;
    return transport_.send(grad, device);
  }

  /// Partition j applied to micro-batch i (of m) as one autograd node
  /// (Note [A cell is one autograd node]), or plainly when no gradient can
  /// flow through it.
  torch::Tensor run_cell(
      int64_t i,
      int64_t j,
      int64_t m,
      const torch::Tensor& x,
      const std::vector<std::vector<torch::Tensor>>& parameters,
      bool needs_graph) {
    const auto& device = options.devices()[static_cast<size_t>(j)];
    auto partition =
        partitions_[static_cast<size_t>(j)]; // forward() is non-const
    const auto& params = parameters[static_cast<size_t>(j)];
    const detail::CellIndex cell{i, j};
    if (!needs_graph || (!x.requires_grad() && params.empty())) {
      detail::TimelineScope recording(
          timeline_.get(), j, i, Phase::Forward, device);
      return detail::with_cell_context(
          cell, "forward", [&] { return partition->forward(x); });
    }
    auto state = c10::make_intrusive<detail::StageState>(
        partition, cell, device, checkpointed(i, m), timeline_);
    state->parameters = params;
    return detail::with_cell_context(cell, "forward", [&] {
      return detail::StageFunction::apply(state, x, at::TensorList(params))[0];
    });
  }

  detail::CallerContext capture_caller_context() const {
    detail::CallerContext caller{at::ThreadLocalState(), {}};
    std::vector<torch::Device> seen;
    for (const auto& device : lane_devices_) {
      if (device.is_cuda() &&
          std::find(seen.begin(), seen.end(), device) == seen.end()) {
        seen.push_back(device);
        caller.current_streams.push_back(
            c10::impl::VirtualGuardImpl(device.type()).getStream(device));
      }
    }
    return caller;
  }

  /// Something partition `partition` does in a round.
  struct WorkItem {
    int64_t partition;
    std::function<void()> run;
  };

  /// Runs one round of independent work (a clock tick, a lockstep step): the
  /// items of each lane in order, the lanes at once; lane 0 (or a lone lane)
  /// on the caller's thread. Waits for every lane, then rethrows the first
  /// failure, so a failed round never leaves work running.
  void run_round(
      const std::vector<WorkItem>& items,
      const detail::CallerContext& caller) {
    std::vector<size_t> lanes;
    std::vector<std::vector<const WorkItem*>> items_of_lane;
    for (const auto& item : items) {
      const size_t lane =
          lane_of_partition_[static_cast<size_t>(item.partition)];
      auto found = std::find(lanes.begin(), lanes.end(), lane);
      if (found == lanes.end()) {
        lanes.push_back(lane);
        items_of_lane.emplace_back();
        found = lanes.end() - 1;
      }
      items_of_lane[static_cast<size_t>(found - lanes.begin())].push_back(
          &item);
    }
    std::vector<detail::DeviceTask> tasks;
    for (size_t t = 0; t < lanes.size(); ++t) {
      const size_t lane = lanes[t];
      detail::Worker* worker = nullptr;
      if (lanes.size() > 1 && lane != 0) {
        if (!workers_[lane]) {
          workers_[lane] = std::make_unique<detail::Worker>();
        }
        worker = workers_[lane].get();
      }
      tasks.push_back(detail::DeviceTask{
          worker, lane_devices_[lane], [mine = items_of_lane[t]] {
            for (const WorkItem* item : mine) {
              item->run();
            }
          }});
    }
    detail::run_on_workers(tasks, caller);
  }

  std::vector<torch::nn::Sequential> partitions_;
  std::vector<size_t> lane_of_partition_;
  std::vector<torch::Device> lane_devices_;
  std::vector<std::unique_ptr<detail::Worker>>
      workers_; // per lane, made on first use
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
