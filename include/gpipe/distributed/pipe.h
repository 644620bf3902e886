// DistributedGPipe: one pipe across processes, each rank running its stages.
//
// Why: a model that no longer fits one host's devices, or more replicas than
// one host holds. The ranks of a World form `replicas` pipelines of
// `stages` ranks each (rank = replica * stages + position); each rank keeps
// only its own stages and runs its lane of the same program the in-process
// pipe runs (schedules.h), through the same executor and StepRunner, with a
// process-group transport instead of mailboxes: Gloo, or NCCL between GPUs
// (Backend; NCCL needs the messages matched by order, ordered_messages.h).
// After the drain, each stage's gradients are summed across its replicas so
// that they equal plain training of the global batch.
//
// Note [Interleaved stages across ranks]
// With `stages_per_rank(v)`, the model is cut into stages * v virtual stages
// and rank position p runs stages p, p + stages, p + 2 * stages, ...: the
// placement of interleaved 1F1B, whose program the executor runs unchanged.
// The V schedules (ZeroBubbleV, DualPipeV; v = 2) fold the stages instead:
// position p runs stages p and 2 stages - 1 - p, so position 0 holds the
// first stage and the last (it takes the input and the target, and tells
// the others the loss).
#pragma once

#include <gpipe/detail/auto_schedule.h>
#include <gpipe/detail/bundle.h>
#include <gpipe/detail/executor.h>
#include <gpipe/detail/microbatch.h>
#include <gpipe/detail/partition.h>
#include <gpipe/detail/pipe_call.h>
#include <gpipe/detail/program_cache.h>
#include <gpipe/detail/skip_layout.h>
#include <gpipe/detail/stage_host.h>
#include <gpipe/detail/step_runner.h>
#include <gpipe/distributed/agreement.h>
#include <gpipe/distributed/auto_schedule.h>
#include <gpipe/distributed/declared_ties.h>
#include <gpipe/distributed/failure.h>
#include <gpipe/distributed/options.h>
#include <gpipe/distributed/placement.h>
#include <gpipe/distributed/step_header.h>
#include <gpipe/distributed/step_sums.h>
#include <gpipe/distributed/ties.h>
#include <gpipe/distributed/transport.h>
#include <gpipe/distributed/world.h>
#include <gpipe/gradients.h>
#include <gpipe/options.h>
#include <gpipe/ordered_messages.h>
#include <gpipe/program.h>
#include <gpipe/schedule.h>
#include <gpipe/schedules.h>
#include <gpipe/simulate.h>
#include <gpipe/stage_costs.h>
#include <gpipe/timeline.h>

#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <ostream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace gpipe::distributed {
namespace detail {

/// A step's call on one rank: its one lane owns every parameter.
inline std::shared_ptr<gpipe::detail::PipeCall> rank_call(
    const std::vector<torch::Tensor>& parameters,
    int64_t stages,
    int64_t m,
    bool input_is_list) {
  auto call = gpipe::detail::make_pipe_call(
      parameters,
      static_cast<size_t>(stages),
      m,
      [](const c10::TensorImpl* /*parameter*/) -> int64_t { return 0; });
  call->input_is_list = input_is_list;
  return call;
}

} // namespace detail

/// One rank's share of a pipe across processes; use it through its holder,
/// DistributedGPipe.
class DistributedGPipeImpl : public torch::nn::Module {
 public:
  /// (output of a micro-batch, its target) -> scalar loss.
  using LossFunction = gpipe::detail::LossFunction;
  /// Builds stage s (of stages * stages_per_rank) as a Sequential.
  using StageBuilder = std::function<torch::nn::Sequential(int64_t stage)>;

  /// From the whole model: every rank passes the same Sequential (same
  /// seed), cut by `balance`, and keeps only its own stages. Checkpoints
  /// name layers as the Sequential does (Note [Checkpoints do not depend on
  /// K]), so the stages' state dicts together are the Sequential's.
  DistributedGPipeImpl(
      std::shared_ptr<World> world,
      const torch::nn::Sequential& sequential,
      DistributedOptions options_)
      : options(std::move(options_)), world_(std::move(world)) {
    TORCH_CHECK(
        !sequential.is_empty(),
        "gpipe: DistributedGPipe needs a Sequential, got an empty holder");
    place();
    options.balance(gpipe::detail::resolve_balance(
        static_cast<int64_t>(sequential->size()), n_, options.balance()));
    detail::reject_skips_across_stages(
        gpipe::detail::skip_layout(sequential, options.balance()));
    auto parts = gpipe::detail::split_sequential(sequential, options.balance());
    std::vector<torch::nn::Sequential> mine(static_cast<size_t>(n_));
    for (const int64_t s : placement_.my_stages) {
      auto& part = mine[static_cast<size_t>(s)];
      part = parts[static_cast<size_t>(s)];
      for (const auto& child : part->named_children()) {
        register_module(child.key(), child.value());
      }
    }
    finish_construction(
        std::move(mine),
        detail::stages_fingerprint(parts),
        detail::find_ties(parts, placement_),
        /*built_by_stage=*/false);
  }

  /// From a builder called with this rank's stage indices only, so no rank
  /// ever builds the whole model. Stage s's layers are named "stage<s>.*"
  /// in checkpoints.
  DistributedGPipeImpl(
      std::shared_ptr<World> world,
      const StageBuilder& build_stage,
      DistributedOptions options_)
      : options(std::move(options_)), world_(std::move(world)) {
    TORCH_CHECK(
        static_cast<bool>(build_stage),
        "gpipe: DistributedGPipe needs a stage builder, got an empty one");
    TORCH_CHECK(
        options.balance().empty(),
        "gpipe: a pipe built stage by stage takes its balance from the ",
        "builder; balance must be empty, got [",
        c10::Join(", ", options.balance()),
        "]");
    place();
    std::vector<torch::nn::Sequential> mine(static_cast<size_t>(n_));
    for (const int64_t s : placement_.my_stages) {
      auto stage = build_stage(s);
      TORCH_CHECK(
          !stage.is_empty() && stage->size() > 0,
          "gpipe: the stage builder returned an empty Sequential for stage ",
          s);
      // Its skips must stay inside it (a skip to another stage is "never
      // popped" or "popped before it was stashed" here).
      gpipe::detail::skip_layout(stage, {static_cast<int64_t>(stage->size())});
      mine[static_cast<size_t>(s)] = stage;
      register_module("stage" + std::to_string(s), stage);
    }
    finish_construction(std::move(mine), "", {}, /*built_by_stage=*/true);
  }

  /// Forward and backward of this rank's share of one step, on every rank
  /// of the pipe: `input` is read on the ranks of the first stage, `target`
  /// on those of the last (others may pass undefined tensors). Gradients of
  /// this rank's parameters accumulate into `.grad` as plain training of
  /// the global batch would (Note [Replicas average to the global batch]).
  /// Returns the global batch's loss, on the CPU, on every rank.
  torch::Tensor step(
      const torch::Tensor& input,
      const torch::Tensor& target,
      const LossFunction& loss_fn) {
    return step_bundle(
        input.defined() ? gpipe::detail::Bundle{input}
                        : gpipe::detail::Bundle{},
        false,
        target,
        loss_fn);
  }

  /// `step` for a first layer that takes several tensors.
  torch::Tensor step(
      const std::vector<torch::Tensor>& inputs,
      const torch::Tensor& target,
      const LossFunction& loss_fn) {
    return step_bundle(inputs, true, target, loss_fn);
  }

  /// Positions and counts.
  int64_t stages() const {
    return options.stages();
  }
  /// How many pipelines the World holds.
  int64_t replicas() const {
    return placement_.replicas;
  }
  /// Which pipeline this rank is in, in [0, replicas).
  int64_t replica() const {
    return placement_.replica;
  }
  /// This rank's position in its pipeline, in [0, stages).
  int64_t position() const {
    return placement_.position;
  }
  /// The (virtual) stages this rank runs, ascending.
  const std::vector<int64_t>& my_stages() const {
    return placement_.my_stages;
  }
  /// Whether this rank runs the first stage (and reads the input).
  bool is_first() const {
    return placement_.my_stages.front() == 0;
  }
  /// Whether this rank runs the last stage (and reads the target).
  bool is_last() const {
    return placement_.my_stages.back() == n_ - 1;
  }
  /// The processes this pipe runs on.
  const std::shared_ptr<World>& world() const {
    return world_;
  }

  /// Records this rank's cells (forward, backward, recompute, I, W) from
  /// now on; null stops. Partition numbers are global stage indices, so the
  /// ranks' events together draw the whole pipeline (on one host the ranks'
  /// steady clocks agree once each timeline is cleared after a barrier).
  void set_timeline(std::shared_ptr<Timeline> timeline) {
    stages_.timeline = std::move(timeline);
  }
  /// The timeline that records, or null.
  const std::shared_ptr<Timeline>& timeline() const {
    return stages_.timeline;
  }

  /// The program each rank runs its lane of, for m micro-batches; with
  /// `by_order`, the one for messages matched by order (Note [Messages
  /// matched by order]), checked before it runs.
  const Program& program_for(int64_t m, bool by_order = false) {
    if (options.program()) {
      return programs_.given(
          *options.program(),
          n_,
          m,
          placement_.lane_of_stage(),
          by_order,
          "the pipe was built with another program; build it with this one");
    }
    return programs_.scheduled(
        options.schedule(), n_, m, placement_.lane_of_stage(), by_order);
  }

  /// The parameters stages on several ranks share; their gradients are
  /// summed over their owners each step (Note [Ties are found, and
  /// watched]).
  const std::vector<TiedParameter>& ties() const {
    return sums_->ties().all();
  }

  /// This rank's parameters, each once, less tied copies another rank
  /// counts: over a pipeline's ranks, the model's, each once.
  std::vector<torch::Tensor> counted_parameters() const {
    return sums_->ties().counted(gpipe::unique_parameters(parameters()));
  }

  /// When the last step's sums over the replicas started: how many of its
  /// buckets overlapped this rank's last backward (Note [Replica sums
  /// overlap the drain]).
  ReplicaSums last_step_replica_sums() const {
    return sums_->replica_sums();
  }

  /// Whether tensors travel over NCCL.
  bool uses_nccl() const {
    return placement_.nccl;
  }
  /// Whether tensors travel over the pipe's own sockets (Auto on CPUs).
  bool uses_sockets() const {
    return placement_.sockets;
  }

  /// Whether the last step's messages went by order (Note [Ordered
  /// steps]): never on Gloo without match_by_order, and never on the first
  /// step of a batch shape, which agrees the shapes.
  bool last_step_by_order() const {
    return last_by_order_;
  }

  /// This rank's place and the options, as LibTorch prints modules.
  void pretty_print(std::ostream& stream) const override {
    stream << "gpipe::distributed::DistributedGPipe(rank=" << world_->rank()
           << ", replica=" << placement_.replica
           << ", position=" << placement_.position << ", stages=["
           << c10::Join(", ", placement_.my_stages) << "], " << options
           << ", device=" << options.device() << ")";
  }

  /// The options, with balance and device filled in as resolved.
  DistributedOptions options;

 private:
  void place() {
    TORCH_CHECK(
        world_ != nullptr, "gpipe: DistributedGPipe needs a World, got null");
    placement_ = detail::place_on_ranks(*world_, options);
    gpipe::detail::check_modes(
        options.checkpoint(), options.schedule(), options.loss_reduction());
    n_ = placement_.stages_total;
  }

  void finish_construction(
      std::vector<torch::nn::Sequential> mine,
      const std::string& whole_model,
      std::vector<detail::FoundTie> ties,
      bool built_by_stage) {
    const std::string prefix = world_->next_pipe_prefix();
    board_ = std::make_unique<detail::FailureBoard>(world_->store(), prefix);
    to(options.device());
    detail::check_same_everywhere(
        *world_, prefix, options, whole_model, mine, placement_);
    detail::add_declared_ties(
        ties, *world_, prefix, placement_, options, mine, built_by_stage);
    stages_.host(
        std::move(mine),
        std::vector<torch::Device>(static_cast<size_t>(n_), options.device()),
        std::vector<size_t>(static_cast<size_t>(n_), 0));
    transport_ =
        detail::pipe_transport(*world_, placement_, options, prefix, *board_);
    watchdog_ = std::make_unique<detail::Watchdog>(
        *board_, [this] { transport_->abort(); });
    sums_ = std::make_unique<detail::StepSums>(
        detail::ReplicaGroup::of_stage(
            world_, placement_, options, prefix, *board_),
        std::make_unique<detail::Ties>(
            std::move(ties), world_, placement_, options, prefix, *board_));
  }

  std::string describe(int64_t rank) const {
    return placement_.describe(rank);
  }

  /// Control message kinds (transport.h's control tags).
  enum Control : int64_t { kBatch = 0, kLoss = 1 };

  torch::Tensor step_bundle(
      gpipe::detail::Bundle input,
      bool is_list,
      const torch::Tensor& target,
      const LossFunction& loss_fn) {
    TORCH_CHECK(
        !broken_,
        "gpipe: a previous step of this distributed pipe failed (",
        broken_reason_,
        "); its process group cannot be trusted after a failure: exit and ",
        "let torchrun --max-restarts restart the job");
    TORCH_CHECK(
        static_cast<bool>(loss_fn),
        "gpipe: step needs a loss function, got an empty one");
    TORCH_CHECK(
        torch::GradMode::is_enabled(),
        "gpipe: step runs backward and cannot run with grad mode disabled");
    auto& transport = *transport_;
    try {
      detail::Watchdog::Armed watching(*watchdog_);
      auto loss =
          run_step(transport, std::move(input), is_list, target, loss_fn);
      transport.messages().finish_sends();
      return loss;
    } catch (...) {
      // Note [Exceptions keep their type]: this rank rethrows its own; its
      // peers read the type and message (the first post wins).
      broken_ = true;
      broken_reason_ = describe_current_exception();
      board_->post_failure(broken_reason_, describe(world_->rank()));
      transport.abort();
      throw;
    }
  }

  torch::Tensor run_step(
      detail::ProcessGroupTransport& transport,
      gpipe::detail::Bundle input,
      bool is_list,
      const torch::Tensor& target,
      const LossFunction& loss_fn) {
    gpipe::detail::check_modes(
        options.checkpoint(), options.schedule(), options.loss_reduction());
    const int64_t first_rank = placement_.rank_of_stage.front();
    const int64_t last_rank = placement_.rank_of_stage.back();
    // The batch: known to the first stage, told to the others.
    std::vector<gpipe::detail::Bundle> inputs;
    const auto header = detail::agree_step_header(
        transport,
        placement_,
        input,
        is_list,
        options.microbatches(),
        inputs,
        kBatch);
    const int64_t batch = header.batch;
    const int64_t m = header.microbatches;
    std::vector<torch::Tensor> targets;
    if (is_last()) {
      targets = header.split_target(
          target, describe(first_rank), describe(world_->rank()));
    }
    const int64_t signature = header.signature;
    const bool by_order =
        !options.agree_shapes_every_step() && transport.can_order(signature);
    gpipe::detail::AutoMeasurement measure(
        options.program().has_value(),
        options.schedule(),
        options.activation_limit(),
        programs_,
        m,
        placement_.lane_of_stage());
    const Program& program = program_for(m, by_order);
    last_by_order_ = by_order;
    measure.record(stages_.timeline);
    auto call = detail::rank_call(parameters(), n_, m, header.input_is_list);
    gpipe::detail::LaneGradients lane_gradients(1, call->parameters);
    call->lane_gradients = &lane_gradients;
    auto* last_weights = sums_->begin(*call, batch, options.loss_reduction());
    gpipe::detail::StepRunner runner(
        stages_,
        is_training() ? options.checkpoint() : Checkpoint::Never,
        options.loss_reduction(),
        m,
        inputs,
        std::move(targets),
        loss_fn,
        static_cast<double>(batch),
        call,
        /*needs_graph=*/true);
    const auto& lane = program.lanes[static_cast<size_t>(placement_.position)];
    runner.watch_last_weights(gpipe::detail::weight_ops_of(lane), last_weights);
    gpipe::detail::Executor executor(program, runner, transport);
    transport.begin(
        call.get(),
        signature,
        options.agree_shapes_every_step(),
        by_order,
        detail::receives_of(lane));
    // The loss's receive too is posted ahead (Note [Receives are posted
    // ahead]).
    auto loss = torch::zeros({1}, torch::kFloat64);
    if (!is_last()) {
      transport.messages().post_control(loss, last_rank, kLoss);
    }
    {
      c10::DeviceGuard on_device(options.device());
      executor.run_one_lane(static_cast<size_t>(placement_.position));
    }
    transport.messages().rethrow_if_aborted();
    transport.end();
    lane_gradients.deliver();
    call->lane_gradients = nullptr;
    sums_->check_ties();
    // The loss: known to the last stage, told to the others.
    if (is_last()) {
      loss[0] =
          runner.total_loss().to(torch::kCPU, torch::kFloat64).item<double>();
      detail::tell_the_pipeline(transport, placement_, loss, kLoss);
    } else {
      transport.messages().wait_control(kLoss, "the loss of this step");
    }
    sums_->sum_ties();
    loss =
        sums_->finish(call->parameters, batch, loss, options.loss_reduction());
    measure.search([&](const std::vector<TimelineEvent>& events) {
      return detail::agreed_stage_costs(*world_, placement_, events);
    }); // Note [Schedule::Auto measures its first step]
    return loss.reshape({});
  }

  std::shared_ptr<World> world_;
  detail::RankPlacement placement_;
  int64_t n_ = 0; // stages * stages_per_rank
  gpipe::detail::StageHost stages_; // null layers where not ours
  gpipe::detail::ProgramCache programs_; // validated, per shape
  bool last_by_order_ = false;
  std::unique_ptr<detail::FailureBoard> board_;
  std::unique_ptr<detail::ProcessGroupTransport> transport_;
  std::unique_ptr<detail::Watchdog> watchdog_; // ends before transport_
  std::unique_ptr<detail::StepSums> sums_; // ties, then replicas
  bool broken_ = false;
  std::string broken_reason_;
};

/// A ModuleHolder for DistributedGPipeImpl.
class DistributedGPipe : public torch::nn::ModuleHolder<DistributedGPipeImpl> {
 public:
  using torch::nn::ModuleHolder<DistributedGPipeImpl>::ModuleHolder;
};

} // namespace gpipe::distributed
