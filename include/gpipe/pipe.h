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

#include <gpipe/detail/auto_schedule.h>
#include <gpipe/detail/bundle.h>
#include <gpipe/detail/call_scope.h>
#include <gpipe/detail/declared_ties.h>
#include <gpipe/detail/drift_guard.h>
#include <gpipe/detail/executor.h>
#include <gpipe/detail/forward_runner.h>
#include <gpipe/detail/local_stages.h>
#include <gpipe/detail/microbatch.h>
#include <gpipe/detail/partition.h>
#include <gpipe/detail/pipe_call.h>
#include <gpipe/detail/placement.h>
#include <gpipe/detail/program_cache.h>
#include <gpipe/detail/skip_layout.h>
#include <gpipe/detail/stage_host.h>
#include <gpipe/detail/step_runner.h>
#include <gpipe/detail/worker.h>
#include <gpipe/gradients.h>
#include <gpipe/options.h>
#include <gpipe/program.h>
#include <gpipe/schedule.h>
#include <gpipe/schedules.h>
#include <gpipe/simulate.h>
#include <gpipe/skip.h>
#include <gpipe/stage_costs.h>
#include <gpipe/timeline.h>

#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/util/StringUtil.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
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
namespace detail {

/// `options` checked, with balance and devices filled in for `sequential`.
inline GPipeOptions resolved(
    const torch::nn::Sequential& sequential,
    GPipeOptions options) {
  TORCH_CHECK(
      !sequential.is_empty(),
      "gpipe: GPipe needs a Sequential, got an empty holder");
  check_microbatches(options.microbatches());
  check_modes(
      options.checkpoint(), options.schedule(), options.loss_reduction());
  options.balance(resolve_balance(
      static_cast<int64_t>(sequential->size()),
      options.partitions(),
      options.balance()));
  options.devices(resolve_devices(options.partitions(), options.devices()));
  return options;
}

} // namespace detail

/// A Sequential cut into partitions on devices, trained on micro-batches as
/// if it were the Sequential itself; use it through its holder, GPipe.
template <typename SequentialT>
class GPipeImpl : public torch::nn::Module,
                  public detail::CountsParametersOnce {
  static_assert(
      std::is_same<SequentialT, torch::nn::Sequential>::value,
      "gpipe: GPipe wraps a torch::nn::Sequential");

 public:
  /// Wraps `sequential` (its own modules, not copies), split and placed as
  /// `options_` say; every bad option is a `gpipe:` error here.
  GPipeImpl(const SequentialT& sequential, GPipeOptions options_)
      : options(detail::resolved(sequential, std::move(options_))),
        sequential_(sequential),
        drift_(sequential, options) {
    // The Sequential's own layers under their own names: parameters, state
    // dicts and archives are the Sequential's whatever K, balance and
    // devices (Note [Checkpoints do not depend on K]).
    for (const auto& child : sequential->named_children()) {
      register_module(child.key(), child.value());
    }
    auto partitions = detail::split_sequential(sequential, options.balance());
    stages_.skip_layout = detail::skip_layout(sequential, options.balance());
    skip_channels_ = detail::skip_channels(stages_.skip_layout);
    detail::reject_modules_shared_across_devices(partitions, options.devices());
    auto placement = detail::place_on_lanes(
        options.devices(),
        options.lanes(),
        options.concurrent_cpu_partitions());
    for (size_t j = 0; j < partitions.size(); ++j) {
      partitions[j]->to(options.devices()[j]);
    }
    ties_ = detail::DeclaredTies(*sequential, options.ties());
    owner_lane_ = detail::owner_lanes(partitions, placement.lane_of_partition);
    lane_devices_ = std::move(placement.lane_devices);
    workers_.resize(lane_devices_.size());
    stages_.host(
        std::move(partitions),
        options.devices(),
        std::move(placement.lane_of_partition));
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

 public:
  /// The program `step` runs for m micro-batches: `options.program()` when
  /// set, else the schedule's, lowered and validated.
  const Program& step_program_for(int64_t m) {
    return programs_.step_program(
        options, stages_.stage_count(), m, lane_of_stage());
  }

  /// The lane each partition runs on (GPipeOptions::lanes as resolved).
  std::vector<int64_t> lane_of_stage() const {
    return {stages_.lane_of.begin(), stages_.lane_of.end()};
  }

  /// A pipe's partitions stay on the devices it was built with: `to()` a
  /// device is refused unless every partition is already there (then only
  /// the dtype changes). torchgpipe refuses it too; moving every partition
  /// to one device silently undoes the placement that is the pipe's point.
  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false)
      override {
    drift_.check_stays_on_its_devices(device);
    torch::nn::Module::to(device, dtype, non_blocking);
  }

  /// As `to(device, dtype)`: refused unless every partition is there.
  void to(torch::Device device, bool non_blocking = false) override {
    drift_.check_stays_on_its_devices(device);
    torch::nn::Module::to(device, non_blocking);
  }

  using torch::nn::Module::to;

  /// What runs: the structure fixed at construction, and the per-call knobs.
  void pretty_print(std::ostream& stream) const override {
    const GPipeOptions& built = drift_.built();
    stream << "gpipe::GPipe(partitions=" << built.partitions()
           << ", microbatches=" << options.microbatches()
           << ", checkpoint=" << options.checkpoint() << ", balance=["
           << c10::Join(", ", built.balance()) << "], devices=["
           << c10::Join(", ", built.devices()) << "]";
    if (!built.lanes().empty()) {
      stream << ", lanes=[" << c10::Join(", ", built.lanes()) << "]";
    }
    if (built.concurrent_cpu_partitions()) {
      stream << ", concurrent_cpu_partitions=true";
    }
    if (options.deferred_batch_norm()) {
      stream << ", deferred_batch_norm=true";
    }
    stream << ")";
  }

  /// Records every slice of later steps into `timeline` (null: stop).
  void set_timeline(std::shared_ptr<Timeline> timeline) {
    stages_.timeline = std::move(timeline);
  }

  /// The timeline that records, or null.
  const std::shared_ptr<Timeline>& timeline() const {
    return stages_.timeline;
  }

  /// The number of layers, as the wrapped Sequential's `size()`.
  size_t size() const noexcept {
    return drift_.built_layers();
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

  /// `ptr(index)`, as Sequential's `operator[]`.
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
  /// The end of the iteration over the layers.
  auto end() {
    return sequential_->end();
  }
  /// Iteration over the layers of a const pipe.
  auto begin() const {
    return sequential_->begin();
  }
  /// The end of the iteration over the layers of a const pipe.
  auto end() const {
    return sequential_->end();
  }

  /// Each trainable tensor once, a declared tie once: what a norm counts.
  std::vector<torch::Tensor> counted_parameters() const override {
    return ties_.counted(unique_parameters(*this));
  }

  /// The partitions, each a Sequential sharing the wrapped one's modules.
  const std::vector<torch::nn::Sequential>& partitions() const {
    return stages_.partitions;
  }

  /// The options, with balance and devices filled in as resolved.
  GPipeOptions options;

 private:
  /// What every call checks first: nothing fixed has changed, and the
  /// per-call knobs are valid.
  void check_call(const detail::Bundle& input) const {
    drift_.check_unchanged(sequential_, options);
    ties_.check_equal();
    detail::check_microbatches(options.microbatches());
    detail::check_modes(
        options.checkpoint(), options.schedule(), options.loss_reduction());
    detail::check_bundle(input, "input");
  }

  /// Checkpoint::Never outside training.
  Checkpoint checkpoint_mode() const {
    return is_training() ? options.checkpoint() : Checkpoint::Never;
  }

  std::unique_ptr<detail::CallScope> call_scope(
      int64_t m,
      const detail::Value& input) {
    return std::make_unique<detail::CallScope>(
        stages_,
        parameters(),
        owner_lane_,
        lane_devices_.size(),
        m,
        checkpoint_mode(),
        options.deferred_batch_norm() && is_training(),
        input.is_list,
        input.tensors);
  }

  detail::Value forward_value(detail::Value input) {
    check_call(input.tensors);
    const int64_t m =
        std::min(options.microbatches(), input.tensors.front().size(0));
    auto activations = detail::scatter_bundle(input.tensors, m);
    auto scope = call_scope(m, input);
    detail::ForwardRunner runner(
        stages_,
        checkpoint_mode(),
        activations,
        scope->call,
        scope->needs_graph);
    auto outputs = execute(
        programs_.forward_program(stages_.stage_count(), m, lane_of_stage()),
        runner);
    scope->commit();
    const auto last = static_cast<size_t>(stages_.stage_count() - 1);
    return {
        detail::gather_bundle(outputs),
        scope->call->output_is_list[last].load() == 1};
  }

  torch::Tensor step_value(
      detail::Value input_value,
      const torch::Tensor& target,
      const LossFunction& loss_fn) {
    TORCH_CHECK(
        static_cast<bool>(loss_fn),
        "gpipe: step needs a loss function, got an empty one");
    TORCH_CHECK(
        torch::GradMode::is_enabled(),
        "gpipe: step runs backward and cannot run with grad mode disabled (use forward under NoGradGuard)");
    check_call(input_value.tensors);
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
    detail::AutoMeasurement measure(
        options.program().has_value(),
        options.schedule(),
        options.activation_limit(),
        programs_,
        m,
        lane_of_stage());
    const Program& program = step_program_for(m);
    measure.record(stages_.timeline);
    auto scope = call_scope(m, input_value);
    detail::LaneGradients lane_gradients(
        lane_devices_.size(), scope->call->parameters);
    scope->call->lane_gradients = &lane_gradients;
    detail::StepRunner runner(
        stages_,
        checkpoint_mode(),
        options.loss_reduction(),
        m,
        inputs,
        torch::tensor_split(target, m, /*dim=*/0),
        loss_fn,
        static_cast<double>(input.size(0)),
        scope->call,
        scope->needs_graph);
    execute(program, runner);
    lane_gradients.deliver();
    scope->commit();
    measure.search([&](const std::vector<TimelineEvent>& events) {
      return stage_costs(events, stages_.stage_count());
    }); // Note [Schedule::Auto measures its first step]
    return runner.total_loss();
  }

  /// Runs `program` on the lanes (Note [A failed lane stops every lane]).
  std::vector<detail::Bundle> execute(
      const Program& program,
      detail::StageRunner& runner) {
    const detail::CallerContext caller =
        detail::capture_caller_context(lane_devices_);
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
        stages_.skip_layout.empty() ? nullptr : &skip_channels_);
    return executor.run(std::move(tasks), caller);
  }

  SequentialT sequential_{nullptr};
  detail::DriftGuard drift_; // the structure as built
  detail::DeclaredTies ties_; // GPipeOptions::tie
  detail::LocalStages stages_;
  detail::SkipChannels skip_channels_; // the routes, for the executor
  /// Per parameter: the one lane whose partitions register it, or -1.
  std::unordered_map<const c10::TensorImpl*, int64_t> owner_lane_;
  detail::ProgramCache programs_; // validated, per shape
  std::vector<torch::Device> lane_devices_;
  std::vector<std::unique_ptr<detail::Worker>>
      workers_; // per lane, made on first use
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
  /// `pipe({h, mask})`: a braced list is a list, even of one tensor.
  torch::Tensor operator()(std::initializer_list<torch::Tensor> inputs) {
    return this->get()->forward(inputs);
  }
};

} // namespace gpipe
