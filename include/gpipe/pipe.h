// GPipe: a Sequential cut into partitions on devices, fed micro-batches on the
// fill-drain schedule, trained as if it were the Sequential itself.
//
// GPipeImpl is a torch::nn::Module and GPipe its ModuleHolder, as LibTorch's
// own modules are built, so a pipe goes wherever a module goes: parameters()
// are the Sequential's own tensors in the same order, train()/eval() behave
// as on any module, and `pipe(x)` calls forward.
//
// Note [Checkpoints do not depend on K]
// The pipe registers the Sequential's own layers as its children, under the
// Sequential's own names, and keeps its partitions unregistered. So
// named_parameters(), named_buffers(), state dicts and torch::save archives
// of a pipe are exactly the Sequential's ("0.weight", not
// "partitions.0.0.weight"), and a checkpoint moves freely between the plain
// Sequential and pipes of any partition count, balance and devices.
//
// Structural choices (partitions, balance, devices, concurrent CPU lanes)
// are fixed at construction, and so is the Sequential's list of layers: a
// later change is reported at the next call rather than silently ignored.
#pragma once

#include <gpipe/detail/batch_norm.h>
#include <gpipe/detail/microbatch.h>
#include <gpipe/detail/partition.h>
#include <gpipe/detail/stage.h>
#include <gpipe/detail/transport.h>
#include <gpipe/detail/worker.h>
#include <gpipe/options.h>
#include <gpipe/schedule.h>
#include <gpipe/timeline.h>

#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/util/StringUtil.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <ostream>
#include <type_traits>
#include <unordered_map>
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
    built_ = options;
    sequential_ = sequential;
    for (size_t k = 0; k < sequential->size(); ++k) {
      layers_.push_back(sequential->ptr(k).get());
    }
    // The Sequential's own layers under their own names, so that
    // named_parameters(), state dicts and archives are the Sequential's
    // whatever K, balance and devices are (Note [Checkpoints do not depend
    // on K]).
    for (const auto& child : sequential->named_children()) {
      register_module(child.key(), child.value());
    }
    partitions_ = detail::split_sequential(sequential, options.balance());
    for (size_t j = 0; j < partitions_.size(); ++j) {
      traits_.push_back(std::make_unique<detail::PartitionTraits>());
    }
    reject_modules_shared_across_devices();
    place_on_devices();
  }

  /// The output of the whole Sequential for `input`, gathered on the last
  /// partition's device. `input` may live on any device. Backward (the
  /// user's `loss.backward()`) follows the autograd engine: across devices
  /// it overlaps as the engine's per-device threads allow.
  torch::Tensor forward(const torch::Tensor& input) {
    check_unchanged();
    auto activations = detail::scatter(input, options.microbatches());
    const auto m = static_cast<int64_t>(activations.size());
    const auto n = static_cast<int64_t>(partitions_.size());
    CallScope scope(*this, m, /*under_step=*/false);
    const auto& call = scope.call;
    const bool needs_graph = torch::GradMode::is_enabled() &&
        (input.requires_grad() || !call->parameters.empty());
    call->lock_random_draws = call->lock_random_draws && needs_graph;

    const detail::CallerContext caller = capture_caller_context();
    for (const auto& tick : clock_cycles(m, n)) {
      std::vector<WorkItem> items;
      items.reserve(tick.size());
      for (const auto& [i, j] : tick) {
        items.push_back(
            {j, [&, i = i, j = j] {
               auto& activation = activations[static_cast<size_t>(i)];
               activation = run_cell(
                   i, j, m, receive(activation, i, j), call, needs_graph);
             }});
      }
      run_round(items, caller);
    }
    scope.commit();
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
    check_unchanged();
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
    CallScope scope(*this, m, /*under_step=*/true);
    const auto& call = scope.call;
    detail::LaneGradients lane_gradients(
        lane_devices_.size(), call->parameters);
    call->lane_gradients = &lane_gradients;
    const bool needs_graph = input.requires_grad() || !call->parameters.empty();
    call->lock_random_draws = call->lock_random_draws && needs_graph;
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
      outputs[ii][jj] = run_cell(i, j, m, x, call, needs_graph);
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
        TORCH_CHECK(
            loss.requires_grad(),
            "gpipe: the loss of micro-batch ",
            i,
            " does not require grad, so step has nothing to differentiate ",
            "(plain training fails the same way: element 0 of tensors does ",
            "not require grad and does not have a grad_fn); check that ",
            "loss_fn and the last layers do not detach their output");
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
        // Cells add this context themselves; a loss or copy failure gets it
        // here (with_cell_context adds it once).
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
    lane_gradients.deliver();
    scope.commit();
    torch::Tensor total = loss_values.front();
    for (size_t i = 1; i < loss_values.size(); ++i) {
      total = total + loss_values[i];
    }
    return total;
  }

  /// A pipe's partitions stay on the devices it was built with: `to()` a
  /// device is refused unless every partition is already there (then only
  /// the dtype changes). torchgpipe refuses it too; moving every partition
  /// to one device silently undoes the placement that is the pipe's point.
  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false)
      override {
    check_stays_on_its_devices(device);
    torch::nn::Module::to(device, dtype, non_blocking);
  }

  void to(torch::Device device, bool non_blocking = false) override {
    check_stays_on_its_devices(device);
    torch::nn::Module::to(device, non_blocking);
  }

  using torch::nn::Module::to;

  /// What runs: the structure fixed at construction, and the per-call knobs.
  void pretty_print(std::ostream& stream) const override {
    stream << "gpipe::GPipe(partitions=" << built_.partitions()
           << ", microbatches=" << options.microbatches()
           << ", checkpoint=" << options.checkpoint() << ", balance=[";
    for (size_t j = 0; j < built_.balance().size(); ++j) {
      stream << (j ? ", " : "") << built_.balance()[j];
    }
    stream << "], devices=[";
    for (size_t j = 0; j < built_.devices().size(); ++j) {
      stream << (j ? ", " : "") << built_.devices()[j];
    }
    stream << "]";
    if (built_.concurrent_cpu_partitions()) {
      stream << ", concurrent_cpu_partitions=true";
    }
    if (options.deferred_batch_norm()) {
      stream << ", deferred_batch_norm=true";
    }
    stream << ")";
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

  /// Gives each partition a lane: the worker that runs it (Note [One
  /// worker per device]), and each parameter the lane that owns it.
  /// Partitions on one device share a lane, unless `concurrent_cpu_partitions`
  /// gives CPU partitions one each. The caller's thread serves lane 0.
  void place_on_devices() {
    lane_of_partition_.clear();
    lane_devices_.clear();
    for (size_t j = 0; j < partitions_.size(); ++j) {
      const auto& device = options.devices()[j];
      partitions_[j]->to(device);
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
    owner_lane_.clear();
    for (size_t j = 0; j < partitions_.size(); ++j) {
      const auto lane = static_cast<int64_t>(lane_of_partition_[j]);
      for (const auto& parameter : partitions_[j]->parameters()) {
        const auto* key = parameter.unsafeGetTensorImpl();
        const auto found = owner_lane_.find(key);
        if (found == owner_lane_.end()) {
          owner_lane_.emplace(key, lane);
        } else if (found->second != lane) {
          found->second = -1; // registered on several lanes
        }
      }
    }
  }

  /// A module (or parameter) lives on one device: partitions on different
  /// devices cannot share it.
  void reject_modules_shared_across_devices() const {
    std::unordered_map<const void*, size_t> first_user;
    auto check = [&](const void* key, size_t j, const char* what) {
      const auto found = first_user.emplace(key, j);
      const size_t other = found.first->second;
      TORCH_CHECK(
          found.second || options.devices()[other] == options.devices()[j],
          "gpipe: a ",
          what,
          " is used by partitions ",
          other,
          " and ",
          j,
          ", which are on different devices (",
          options.devices()[other],
          " and ",
          options.devices()[j],
          "); it can live on one device only: share it between partitions "
          "on one device, or give each partition its own copy");
    };
    for (size_t j = 0; j < partitions_.size(); ++j) {
      for (const auto& module :
           partitions_[j]->modules(/*include_self=*/false)) {
        check(module.get(), j, "module");
      }
      for (const auto& parameter : partitions_[j]->parameters()) {
        check(parameter.unsafeGetTensorImpl(), j, "parameter");
      }
    }
  }

  void check_stays_on_its_devices(const torch::Device& device) const {
    const auto target = detail::normalize_device(device);
    const bool already = std::all_of(
        built_.devices().begin(),
        built_.devices().end(),
        [&](const torch::Device& d) { return d == target; });
    TORCH_CHECK(
        already,
        "gpipe: to(",
        device,
        ") would move every partition of the pipe to one device (devices: ",
        c10::Join(", ", built_.devices()),
        "); a pipe's partitions stay where it was built: build a new GPipe "
        "with GPipeOptions::devices to place them elsewhere (to(dtype) "
        "converts them where they are)");
  }

  /// The Sequential and the structural options are fixed at construction;
  /// a change would otherwise be ignored silently.
  void check_unchanged() const {
    const size_t now = sequential_->size();
    bool same = now == layers_.size();
    for (size_t k = 0; same && k < now; ++k) {
      same = sequential_->ptr(k).get() == layers_[k];
    }
    TORCH_CHECK(
        same,
        "gpipe: the Sequential changed after the pipe was built (layers: ",
        layers_.size(),
        " then, ",
        now,
        " now); a pipe splits the layers it was given: build a new GPipe "
        "around the changed Sequential");
    // Only compares on every call: TORCH_CHECK builds its message (the
    // joined lists) on failure alone.
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
    fixed(
        "concurrent_cpu_partitions",
        built_.concurrent_cpu_partitions(),
        options.concurrent_cpu_partitions());
  }

  template <typename T>
  static const T& printable(const T& value) {
    return value;
  }

  template <typename T>
  static std::string printable(const std::vector<T>& values) {
    return c10::Join(", ", values);
  }

  /// What the cells of one call share, and the call's Deferred BatchNorm,
  /// rolled back unless the call commits.
  struct CallScope {
    CallScope(GPipeImpl& pipe, int64_t m, bool under_step)
        : call(std::make_shared<detail::PipeCall>()) {
      std::unordered_map<const c10::TensorImpl*, size_t> seen;
      for (const auto& parameter : pipe.parameters()) {
        if (!parameter.requires_grad() ||
            !seen.emplace(parameter.unsafeGetTensorImpl(), 0).second) {
          continue;
        }
        const auto* key = parameter.unsafeGetTensorImpl();
        call->slot_of.emplace(key, call->parameters.size());
        call->parameters.push_back(parameter);
        const auto owner = pipe.owner_lane_.find(key);
        call->owner_lane.push_back(
            owner == pipe.owner_lane_.end() ? -1 : owner->second);
        call->hooked.push_back(detail::has_hooks(parameter) ? 1 : 0);
      }
      if (under_step) {
        call->phony = pipe.phony_;
      }
      call->split = m > 1;
      call->lock_random_draws =
          pipe.lane_devices_.size() > 1 && pipe.checkpointed(0, m);
      call->output_requires_grad.assign(pipe.partitions_.size(), -1);
      if (pipe.options.deferred_batch_norm() && pipe.is_training()) {
        batch_norm = std::make_unique<detail::DeferredBatchNorm>(
            detail::tracked_batch_norms(pipe.partitions_));
        if (!batch_norm->empty()) {
          call->batch_norm = batch_norm.get();
        }
      }
    }

    ~CallScope() {
      call->batch_norm = nullptr;
      call->lane_gradients = nullptr;
      if (batch_norm && !committed) {
        batch_norm->rollback();
      }
    }

    void commit() {
      if (batch_norm) {
        batch_norm->commit();
      }
      committed = true;
    }

    CallScope(const CallScope&) = delete;
    CallScope& operator=(const CallScope&) = delete;

    std::shared_ptr<detail::PipeCall> call;
    std::unique_ptr<detail::DeferredBatchNorm> batch_norm;
    bool committed = false;
  };

  /// `x` moved to partition j's device for micro-batch i (a recorded copy
  /// when it has to travel).
  torch::Tensor receive(const torch::Tensor& x, int64_t i, int64_t j) {
    const auto& device = options.devices()[static_cast<size_t>(j)];
    if (x.device() == device) {
      return x;
    }
    return detail::with_cell_context({i, j}, "copy", [&] {
      if (!timeline_) {
        return transport_.send(x, device);
      }
      // Timed on the copy stream, where the copy runs.
      size_t token = 0;
      Timeline* timeline = timeline_.get();
      const detail::CopyHooks hooks{
          [&] { token = timeline->begin(j, i, Phase::Copy, device); },
          [&] { timeline->end(token); }};
      return transport_.send(x, device, &hooks);
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
      const std::shared_ptr<detail::PipeCall>& call,
      bool needs_graph) {
    const auto jj = static_cast<size_t>(j);
    const auto& device = options.devices()[jj];
    auto partition = partitions_[jj]; // forward() is non-const
    const detail::CellIndex cell{i, j};
    torch::Tensor out;
    if (!needs_graph) {
      detail::TimelineScope recording(
          timeline_.get(), j, i, Phase::Forward, device);
      detail::CellObserver observer;
      observer.batch_norm = call->batch_norm;
      std::optional<detail::ObserverScope> observing;
      if (observer.batch_norm != nullptr) {
        observing.emplace(observer);
      }
      out = detail::with_cell_context(
          cell, "forward", [&] { return partition->forward(x); });
    } else {
      auto state = c10::make_intrusive<detail::StageState>(
          partition,
          cell,
          device,
          lane_of_partition_[jj],
          checkpointed(i, m),
          call,
          traits_[jj].get(),
          timeline_);
      const std::vector<torch::Tensor> phony{call->phony};
      const at::TensorList extra_inputs = call->phony.defined()
          ? at::TensorList(phony)
          : at::TensorList(call->parameters);
      out = detail::with_cell_context(cell, "forward", [&] {
        return detail::StageFunction::apply(state, x, extra_inputs)[0];
      });
    }
    TORCH_CHECK(
        !call->split || (out.dim() >= 1 && out.size(0) == x.size(0)),
        "gpipe: partition ",
        j,
        " changed the batch dimension on micro-batch ",
        i,
        " (input shape: ",
        x.sizes(),
        ", output shape: ",
        out.sizes(),
        "); under micro-batching every partition must keep the batch in "
        "dimension 0, so layers that reduce over the batch (sum(0), a mean "
        "of everything, statistics by hand) belong after the pipe, on its "
        "output");
    return out;
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

  SequentialT sequential_{nullptr};
  std::vector<const torch::nn::Module*> layers_; // as built, to notice edits
  GPipeOptions built_{1}; // the structure as built
  std::vector<torch::nn::Sequential> partitions_;
  std::vector<std::unique_ptr<detail::PartitionTraits>> traits_;
  /// Per parameter: the one lane whose partitions register it, or -1.
  std::unordered_map<const c10::TensorImpl*, int64_t> owner_lane_;
  /// The extra input of step()'s cells (Note [A cell is one autograd node]).
  torch::Tensor phony_ = torch::empty({0}).requires_grad_();
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
