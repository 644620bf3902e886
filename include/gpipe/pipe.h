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
#include <gpipe/detail/bundle.h>
#include <gpipe/detail/executor.h>
#include <gpipe/detail/microbatch.h>
#include <gpipe/detail/partition.h>
#include <gpipe/detail/skip_layout.h>
#include <gpipe/detail/stage.h>
#include <gpipe/detail/step_runner.h>
#include <gpipe/detail/transport.h>
#include <gpipe/detail/worker.h>
#include <gpipe/options.h>
#include <gpipe/program.h>
#include <gpipe/schedule.h>
#include <gpipe/schedules.h>
#include <gpipe/simulate.h>
#include <gpipe/skip.h>
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
#include <initializer_list>
#include <map>
#include <memory>
#include <optional>
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
    skip_layout_ = detail::skip_layout(sequential, options.balance());
    if (!skip_layout_.empty()) {
      skip_channels_.incoming.resize(partitions_.size());
      skip_channels_.outgoing.resize(partitions_.size());
      for (size_t r = 0; r < skip_layout_.routes.size(); ++r) {
        const auto& route = skip_layout_.routes[r];
        const auto channel = static_cast<int64_t>(r + 1);
        skip_channels_.outgoing[static_cast<size_t>(route.from)].push_back(
            {channel, route.to, route.name});
        skip_channels_.incoming[static_cast<size_t>(route.to)].push_back(
            {channel, route.from, route.name});
      }
    }
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
  ///
  /// As Sequential's `forward<ReturnType>`: `input` is a tensor or a
  /// `std::vector<torch::Tensor>` (every tensor split along dimension 0),
  /// and `ReturnType` is `torch::Tensor` or `std::vector<torch::Tensor>`,
  /// whatever the last layer returns (detail/bundle.h).
  template <typename ReturnType = torch::Tensor, typename Input>
  ReturnType forward(const Input& input) {
    static_assert(
        std::is_same<Input, torch::Tensor>::value ||
            std::is_same<Input, std::vector<torch::Tensor>>::value,
        "gpipe: a pipe's input is a torch::Tensor or a "
        "std::vector<torch::Tensor>");
    detail::Value out = forward_value(detail::value_of(input));
    if constexpr (std::is_same<ReturnType, std::vector<torch::Tensor>>::value) {
      return std::move(out.tensors);
    } else {
      static_assert(
          std::is_same<ReturnType, torch::Tensor>::value,
          "gpipe: forward returns a torch::Tensor or a "
          "std::vector<torch::Tensor>");
      TORCH_CHECK(
          !out.is_list,
          "gpipe: the last layer returned a list of ",
          out.tensors.size(),
          " tensors; ask for them with forward<std::vector<torch::Tensor>>");
      return std::move(out.tensors.front());
    }
  }

  /// `forward({h, mask})`: a braced list is a list, even of one tensor.
  template <typename ReturnType = torch::Tensor>
  ReturnType forward(std::initializer_list<torch::Tensor> inputs) {
    return forward<ReturnType>(std::vector<torch::Tensor>(inputs));
  }

  /// A loss for `step`: (output of a micro-batch, its target) -> scalar.
  using LossFunction = detail::LossFunction;

  /// Forward and backward of the whole batch on `options.schedule()` (or
  /// `options.program()`): `loss_fn` is applied to each micro-batch's output
  /// and target (split like `input`, moved to the last partition's device),
  /// the micro-batch losses are combined by `options.loss_reduction()`, and
  /// gradients accumulate into `.grad` exactly as `loss_fn(seq(input),
  /// target).backward()` would. Returns that loss, detached, on the last
  /// device.
  torch::Tensor step(
      const torch::Tensor& input,
      const torch::Tensor& target,
      const LossFunction& loss_fn) {
    return step_value(detail::value_of(input), target, loss_fn);
  }

  /// `step` for a model whose first layer takes several tensors (split
  /// like `input` above); its last layer returns one.
  torch::Tensor step(
      const std::vector<torch::Tensor>& inputs,
      const torch::Tensor& target,
      const LossFunction& loss_fn) {
    return step_value(detail::value_of(inputs), target, loss_fn);
  }

  /// `step({h, mask}, ...)`: a braced list is a list, even of one tensor.
  torch::Tensor step(
      std::initializer_list<torch::Tensor> inputs,
      const torch::Tensor& target,
      const LossFunction& loss_fn) {
    return step(std::vector<torch::Tensor>(inputs), target, loss_fn);
  }

 private:
  detail::Value forward_value(detail::Value input) {
    check_unchanged();
    detail::check_microbatches(options.microbatches());
    detail::check_bundle(input.tensors, "input");
    const int64_t m =
        std::min(options.microbatches(), input.tensors.front().size(0));
    auto activations = detail::scatter_bundle(input.tensors, m);
    CallScope scope(*this, m);
    scope.call->input_is_list = input.is_list;
    const bool needs_graph = torch::GradMode::is_enabled() &&
        (any_requires_grad(input.tensors) || !scope.call->parameters.empty());
    scope.call->lock_random_draws =
        scope.call->lock_random_draws && needs_graph;
    ForwardRunner runner(*this, activations, scope.call, needs_graph);
    auto outputs = execute(forward_program_for(m), runner);
    scope.commit();
    const auto last = partitions_.size() - 1;
    return {
        detail::gather_bundle(outputs),
        scope.call->output_is_list[last].load() == 1};
  }

  static bool any_requires_grad(const detail::Bundle& tensors) {
    return std::any_of(tensors.begin(), tensors.end(), [](const auto& t) {
      return t.defined() && t.requires_grad();
    });
  }

  torch::Tensor step_value(
      detail::Value input_value,
      const torch::Tensor& target,
      const LossFunction& loss_fn) {
    check_unchanged();
    TORCH_CHECK(
        static_cast<bool>(loss_fn),
        "gpipe: step needs a loss function, got an empty one");
    TORCH_CHECK(
        torch::GradMode::is_enabled(),
        "gpipe: step runs backward and cannot run with grad mode disabled (use forward under NoGradGuard)");
    detail::check_microbatches(options.microbatches());
    detail::check_bundle(input_value.tensors, "input");
    const auto& input = input_value.tensors.front();
    const int64_t m_asked = std::min(options.microbatches(), input.size(0));
    auto inputs = detail::scatter_bundle(input_value.tensors, m_asked);
    detail::check_batch(target, "target");
    TORCH_CHECK(
        target.size(0) == input.size(0),
        "gpipe: target and input have different batch sizes (input: ",
        input.size(0),
        ", target: ",
        target.size(0),
        ")");
    const auto m = static_cast<int64_t>(inputs.size());
    const Program& program = step_program_for(m);
    CallScope scope(*this, m);
    detail::LaneGradients lane_gradients(
        lane_devices_.size(), scope.call->parameters);
    scope.call->lane_gradients = &lane_gradients;
    scope.call->input_is_list = input_value.is_list;
    const bool needs_graph = any_requires_grad(input_value.tensors) ||
        !scope.call->parameters.empty();
    scope.call->lock_random_draws =
        scope.call->lock_random_draws && needs_graph;
    detail::StepRunner<GPipeImpl> runner(
        *this,
        m,
        inputs,
        torch::tensor_split(target, m, /*dim=*/0),
        loss_fn,
        static_cast<double>(input.size(0)),
        scope.call,
        needs_graph);
    execute(program, runner);
    lane_gradients.deliver();
    scope.commit();
    torch::Tensor total = runner.loss_values.front();
    for (size_t i = 1; i < runner.loss_values.size(); ++i) {
      total = total + runner.loss_values[i];
    }
    return total;
  }

 public:
  /// The program `step` runs for m micro-batches: `options.program()` when
  /// set, else the schedule's, lowered and validated.
  const Program& step_program_for(int64_t m) {
    const auto n = static_cast<int64_t>(partitions_.size());
    if (options.program()) {
      const Program& mine = *options.program();
      TORCH_CHECK(
          mine.stages == n && mine.microbatches == m,
          "gpipe: the program has ",
          mine.stages,
          " stages and ",
          mine.microbatches,
          " micro-batches, but the pipe has ",
          n,
          " partitions and this batch ",
          m,
          " micro-batches (a batch smaller than microbatches() gives fewer)");
      TORCH_CHECK(
          mine.lane_of_stage == lane_of_stage(),
          "gpipe: the program places stages on lanes [",
          c10::Join(", ", mine.lane_of_stage),
          "], but the pipe runs its partitions on lanes [",
          c10::Join(", ", lane_of_stage()),
          "] (set GPipeOptions::lanes to match)");
      if (!user_program_ || !(user_program_->first == mine)) {
        Program lowered = lower(mine);
        simulate(lowered); // validates, throws with the grid
        user_program_.emplace(mine, std::move(lowered));
      }
      return user_program_->second;
    }
    const auto key = std::make_pair(static_cast<int>(options.schedule()), m);
    auto found = programs_.find(key);
    if (found == programs_.end()) {
      Program program =
          build_program(options.schedule(), n, m, lane_of_stage());
      simulate(program);
      found = programs_.emplace(key, std::move(program)).first;
    }
    return found->second;
  }

  /// The lane each partition runs on (GPipeOptions::lanes as resolved).
  std::vector<int64_t> lane_of_stage() const {
    return {lane_of_partition_.begin(), lane_of_partition_.end()};
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
    if (!built_.lanes().empty()) {
      stream << ", lanes=[" << c10::Join(", ", built_.lanes()) << "]";
    }
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

  /// The number of layers, as the wrapped Sequential's `size()`.
  size_t size() const noexcept {
    return layers_.size();
  }

  /// Layer `index` of the wrapped Sequential (whatever partition runs it),
  /// so code written against a Sequential keeps working on a pipe.
  std::shared_ptr<torch::nn::Module> ptr(size_t index) const {
    TORCH_CHECK(
        index < size(),
        "gpipe: index ",
        index,
        " is out of range for a pipe of ",
        size(),
        " layers");
    return sequential_->ptr(index);
  }

  std::shared_ptr<torch::nn::Module> operator[](size_t index) const {
    return ptr(index);
  }

  /// Layer `index` as its module type, as Sequential's `at<T>()`.
  template <typename T>
  T& at(size_t index) {
    ptr(index); // range check with a gpipe: message
    return sequential_->template at<T>(index);
  }

  /// Iteration over the layers (`torch::nn::AnyModule`s), as a Sequential's.
  auto begin() {
    return sequential_->begin();
  }
  auto end() {
    return sequential_->end();
  }
  auto begin() const {
    return sequential_->begin();
  }
  auto end() const {
    return sequential_->end();
  }

  /// The partitions, each a Sequential sharing the wrapped one's modules.
  const std::vector<torch::nn::Sequential>& partitions() const {
    return partitions_;
  }

  /// The options, with balance and devices filled in as resolved.
  GPipeOptions options;

 private:
  friend class detail::StepRunner<GPipeImpl>;

  int64_t stage_count() const {
    return static_cast<int64_t>(partitions_.size());
  }

  Reduction loss_reduction() const {
    return options.loss_reduction();
  }

  bool checkpointed(int64_t i, int64_t m) const {
    return is_training() && detail::checkpointed(options.checkpoint(), i, m);
  }

  /// Gives each partition a lane: the worker that runs it (Note [One
  /// worker per device]), and each parameter the lane that owns it.
  /// Partitions on one device share a lane, unless `concurrent_cpu_partitions`
  /// gives CPU partitions one each. The caller's thread serves lane 0.
  void place_on_devices() {
    lane_of_partition_.clear();
    lane_devices_.clear();
    const auto& lanes = options.lanes();
    const auto n = partitions_.size();
    if (!lanes.empty()) {
      check_lanes(lanes);
    }
    for (size_t j = 0; j < n; ++j) {
      const auto& device = options.devices()[j];
      partitions_[j]->to(device);
      if (!lanes.empty()) {
        const auto lane = static_cast<size_t>(lanes[j]);
        if (lane >= lane_devices_.size()) {
          lane_devices_.resize(lane + 1, device);
        }
        lane_devices_[lane] = device;
        lane_of_partition_.push_back(lane);
        continue;
      }
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

  /// Explicit lanes: one per partition, numbered 0..L-1 with none unused,
  /// each lane on one device, and a CUDA device on one lane only (its
  /// compute stream is one queue: two lanes would only take turns on it).
  void check_lanes(const std::vector<int64_t>& lanes) const {
    const auto n = static_cast<int64_t>(partitions_.size());
    TORCH_CHECK(
        !options.concurrent_cpu_partitions(),
        "gpipe: give either lanes or concurrent_cpu_partitions, not both ",
        "(concurrent_cpu_partitions(true) is the shorthand for one lane per ",
        "CPU partition)");
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
      const auto& device = options.devices()[static_cast<size_t>(j)];
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
          c10::Join(", ", options.devices()),
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
    fixed("lanes", built_.lanes(), options.lanes());
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
    CallScope(GPipeImpl& pipe, int64_t m)
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
      call->split = m > 1;
      call->lock_random_draws =
          pipe.lane_devices_.size() > 1 && pipe.checkpointed(0, m);
      call->outputs_require_grad.assign(pipe.partitions_.size(), {});
      call->output_is_list.reset(new std::atomic<int>[pipe.partitions_.size()]);
      for (size_t j = 0; j < pipe.partitions_.size(); ++j) {
        call->output_is_list[j].store(-1);
      }
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

  /// `forward()`'s stages: each cell one autograd node of the caller's graph
  /// (Note [A cell is one autograd node]); activations cross lanes with
  /// their history, so the user's backward reaches every cell.
  class ForwardRunner final : public detail::StageRunner {
   public:
    ForwardRunner(
        GPipeImpl& pipe,
        const std::vector<detail::Bundle>& inputs,
        std::shared_ptr<detail::PipeCall> call,
        bool needs_graph)
        : pipe_(pipe),
          inputs_(inputs),
          call_(std::move(call)),
          needs_graph_(needs_graph),
          m_(static_cast<int64_t>(inputs.size())) {}

    detail::Bundle input(int64_t i) override {
      return pipe_.receive_all(inputs_[static_cast<size_t>(i)], i, 0);
    }
    detail::Bundle move(
        detail::Bundle x,
        int64_t s,
        int64_t i,
        detail::Direction /*direction: forward only*/) override {
      return pipe_.receive_all(x, i, s);
    }
    detail::Bundle forward(int64_t s, int64_t i, detail::Bundle x) override {
      return pipe_.run_cell(i, s, m_, x, call_, needs_graph_);
    }
    detail::Bundle backward(
        int64_t s,
        int64_t i,
        detail::Bundle /*grad_outputs*/,
        bool /*input_only*/) override {
      TORCH_CHECK(
          false,
          "gpipe: forward() runs forward-only programs (stage ",
          s,
          ", micro-batch ",
          i,
          ")");
      return {};
    }
    void backward_weight(int64_t s, int64_t i) override {
      backward(s, i, {}, false);
    }

   private:
    GPipeImpl& pipe_;
    const std::vector<detail::Bundle>& inputs_;
    std::shared_ptr<detail::PipeCall> call_;
    bool needs_graph_;
    int64_t m_;
  };

  /// The forward-only program for m micro-batches (clock_cycles' order).
  const Program& forward_program_for(int64_t m) {
    auto found = forward_programs_.find(m);
    if (found == forward_programs_.end()) {
      Program program = forward_program(
          static_cast<int64_t>(partitions_.size()), m, lane_of_stage());
      simulate(program);
      found = forward_programs_.emplace(m, std::move(program)).first;
    }
    return found->second;
  }

  /// Runs `program` on the lanes (Note [A failed lane stops every lane]).
  std::vector<detail::Bundle> execute(
      const Program& program,
      detail::StageRunner& runner) {
    const detail::CallerContext caller = capture_caller_context();
    detail::MailboxTransport transport;
    std::vector<detail::DeviceTask> tasks;
    for (size_t lane = 0; lane < lane_devices_.size(); ++lane) {
      detail::Worker* worker = nullptr;
      if (lane_devices_.size() > 1 && lane != 0) {
        if (!workers_[lane]) {
          workers_[lane] = std::make_unique<detail::Worker>();
        }
        worker = workers_[lane].get();
      }
      tasks.push_back(detail::DeviceTask{worker, lane_devices_[lane], {}});
    }
    detail::Executor executor(
        program,
        runner,
        transport,
        skip_layout_.empty() ? nullptr : &skip_channels_);
    return executor.run(std::move(tasks), caller);
  }

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

  /// Every tensor of `x` moved to partition j's device (undefined ones
  /// stay undefined).
  detail::Bundle receive_all(const detail::Bundle& x, int64_t i, int64_t j) {
    detail::Bundle moved;
    moved.reserve(x.size());
    for (const auto& t : x) {
      moved.push_back(t.defined() ? receive(t, i, j) : t);
    }
    return moved;
  }

  c10::intrusive_ptr<detail::StageState> make_state(
      int64_t i,
      int64_t j,
      int64_t m,
      const std::shared_ptr<detail::PipeCall>& call) {
    const auto jj = static_cast<size_t>(j);
    const bool input_is_list =
        j == 0 ? call->input_is_list : call->output_is_list[jj - 1].load() == 1;
    return c10::make_intrusive<detail::StageState>(
        partitions_[jj],
        detail::CellIndex{i, j},
        options.devices()[jj],
        lane_of_partition_[jj],
        checkpointed(i, m),
        call,
        traits_[jj].get(),
        timeline_,
        input_is_list,
        skip_layout_.empty() ? nullptr : &skip_layout_.partitions[jj]);
  }

  void check_batch_kept(
      int64_t i,
      int64_t j,
      const detail::Bundle& x,
      const detail::Bundle& out,
      const detail::PipeCall& call) const {
    const size_t skips = skip_layout_.empty()
        ? 0
        : skip_layout_.partitions[static_cast<size_t>(j)].outgoing.size();
    detail::check_batch_kept(i, j, x, out, call, skips);
  }

  /// Partition j applied to micro-batch i (of m) as one autograd node
  /// (Note [A cell is one autograd node]), or plainly when no gradient can
  /// flow through it.
  detail::Bundle run_cell(
      int64_t i,
      int64_t j,
      int64_t m,
      const detail::Bundle& x,
      const std::shared_ptr<detail::PipeCall>& call,
      bool needs_graph) {
    const auto& device = options.devices()[static_cast<size_t>(j)];
    const detail::CellIndex cell{i, j};
    auto state = make_state(i, j, m, call);
    detail::Bundle out;
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
          cell, "forward", [&] { return state->run_partition(x); });
    } else {
      out = detail::with_cell_context(cell, "forward", [&] {
        // As TensorLists: apply() finds the tensors that require grad among
        // arguments of that type only, not in a std::vector.
        return detail::StageFunction::apply(
            state, at::TensorList(x), at::TensorList(call->parameters));
      });
    }
    check_batch_kept(i, j, x, out, *call);
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

  SequentialT sequential_{nullptr};
  std::vector<const torch::nn::Module*> layers_; // as built, to notice edits
  GPipeOptions built_{1}; // the structure as built
  std::vector<torch::nn::Sequential> partitions_;
  std::vector<std::unique_ptr<detail::PartitionTraits>> traits_;
  detail::SkipLayout skip_layout_;
  detail::SkipChannels skip_channels_; // the routes, for the executor
  /// Per parameter: the one lane whose partitions register it, or -1.
  std::unordered_map<const c10::TensorImpl*, int64_t> owner_lane_;
  // Validated programs, per (schedule, m) and per m for forward().
  std::map<std::pair<int, int64_t>, Program> programs_;
  std::map<int64_t, Program> forward_programs_;
  std::optional<std::pair<Program, Program>> user_program_; // as given, lowered
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

  /// `pipe(x)` calls `forward(x)`. Defined here because ModuleHolder's own
  /// cannot see through a templated forward.
  template <typename Input>
  torch::Tensor operator()(const Input& input) {
    return this->get()->forward(input);
  }
  torch::Tensor operator()(std::initializer_list<torch::Tensor> inputs) {
    return this->get()->forward(inputs);
  }
};

} // namespace gpipe
