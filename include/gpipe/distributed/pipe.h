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
//
// Note [Replicas average to the global batch]
// Under Reduction::Mean replica r computes the gradient of its own batch's
// mean, g_r, over n_r samples; plain training of the global batch of
// N = sum n_r samples has gradient sum_r (n_r / N) g_r. So each rank scales
// by n_r, the replicas sum, and every rank divides by N, which is summed
// alongside. Under Reduction::Sum the gradients add. Only this step's
// gradient is summed: `.grad` accumulated by earlier steps is set aside
// during the step and added back after.
#pragma once

#include <gpipe/detail/bundle.h>
#include <gpipe/detail/executor.h>
#include <gpipe/detail/microbatch.h>
#include <gpipe/detail/ordered_messages.h>
#include <gpipe/detail/partition.h>
#include <gpipe/detail/skip_layout.h>
#include <gpipe/detail/stage.h>
#include <gpipe/detail/step_runner.h>
#include <gpipe/distributed/transport.h>
#include <gpipe/distributed/world.h>
#include <gpipe/options.h>
#include <gpipe/program.h>
#include <gpipe/schedule.h>
#include <gpipe/schedules.h>
#include <gpipe/simulate.h>
#include <gpipe/timeline.h>

#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>
#include <torch/arg.h>
#include <torch/cuda.h>
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
#include <unordered_set>
#include <utility>
#include <vector>

namespace gpipe::distributed {

/// What carries a pipe's tensors between ranks.
enum class Backend {
  /// NCCL for a CUDA device where this build has NCCL, else Gloo.
  Auto,
  /// Gloo, staging CUDA tensors through the CPU (also how ranks that
  /// share one GPU talk: NCCL refuses that).
  Gloo,
  /// NCCL, between CUDA devices: one GPU per rank (Note [Ordered steps]).
  Nccl,
};

inline const char* to_string(Backend backend) {
  switch (backend) {
    case Backend::Auto:
      return "auto";
    case Backend::Gloo:
      return "gloo";
    case Backend::Nccl:
      return "nccl";
  }
  return "unknown";
}

inline std::ostream& operator<<(std::ostream& stream, Backend backend) {
  return stream << to_string(backend);
}

/// Options of a distributed pipe; every rank passes the same ones (checked
/// at construction).
struct DistributedOptions {
  /// `stages` ranks per pipeline; the World's size must be a multiple:
  /// replicas = world size / stages.
  /* implicit */ DistributedOptions(int64_t stages) : stages_(stages) {}

  TORCH_ARG(int64_t, stages);
  /// Stages each rank runs (Note [Interleaved stages across ranks]).
  TORCH_ARG(int64_t, stages_per_rank) = 1;
  /// Micro-batches per step (fewer when a batch is smaller).
  TORCH_ARG(int64_t, microbatches) = 1;
  TORCH_ARG(Schedule, schedule) = Schedule::FillDrain;
  TORCH_ARG(Checkpoint, checkpoint) = Checkpoint::ExceptLast;
  TORCH_ARG(Reduction, loss_reduction) = Reduction::Mean;
  /// Layers per (virtual) stage, when built from a whole Sequential; empty:
  /// as even as the layer count allows.
  TORCH_ARG(std::vector<int64_t>, balance) = {};
  /// Send every bundle's shapes with it, for a model whose activation
  /// shapes change while the input's do not (Note [Shapes are agreed once
  /// per batch shape]); costs a message per bundle.
  TORCH_ARG(bool, agree_shapes_every_step) = false;
  /// Where this rank's stages run; a CUDA device without an index is
  /// cuda:LOCAL_RANK.
  TORCH_ARG(torch::Device, device) = torch::kCPU;
  /// What carries tensors between ranks.
  TORCH_ARG(Backend, backend) = Backend::Auto;
  /// Gloo on CPUs only: once a batch shape's shapes are agreed, match
  /// messages by order in coalesced batches, with the program and the
  /// waits NCCL gets (Note [Messages matched by order]), to run on CPUs
  /// what NCCL would run. NCCL always does.
  TORCH_ARG(bool, match_by_order) = false;
};

inline std::ostream& operator<<(
    std::ostream& stream,
    const DistributedOptions& options) {
  return stream << "stages=" << options.stages()
                << ", stages_per_rank=" << options.stages_per_rank()
                << ", microbatches=" << options.microbatches()
                << ", schedule=" << options.schedule()
                << ", checkpoint=" << options.checkpoint()
                << ", loss_reduction=" << to_string(options.loss_reduction())
                << ", balance=[" << c10::Join(", ", options.balance()) << "]"
                << ", agree_shapes_every_step="
                << options.agree_shapes_every_step()
                << ", backend=" << options.backend()
                << ", match_by_order=" << options.match_by_order();
}

class DistributedGPipeImpl : public torch::nn::Module {
 public:
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
    const auto skips =
        gpipe::detail::skip_layout(sequential, options.balance());
    TORCH_CHECK(
        skips.empty(),
        "gpipe: skip '",
        skips.empty() ? std::string() : skips.routes.front().name,
        "' crosses from stage ",
        skips.empty() ? 0 : skips.routes.front().from,
        " to stage ",
        skips.empty() ? 0 : skips.routes.front().to,
        "; across processes a skip must stay within one stage (choose the ",
        "balance so that its stash and pop share a stage)");
    auto parts = gpipe::detail::split_sequential(sequential, options.balance());
    std::ostringstream model;
    for (int64_t s = 0; s < n_; ++s) {
      model << "stage " << s << ": " << shapes_of(parts[static_cast<size_t>(s)])
            << "\n";
    }
    partitions_.resize(static_cast<size_t>(n_));
    for (const int64_t s : my_stages_) {
      auto& part = partitions_[static_cast<size_t>(s)];
      part = parts[static_cast<size_t>(s)];
      for (const auto& child : part->named_children()) {
        register_module(child.key(), child.value());
      }
    }
    finish_construction(model.str());
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
    partitions_.resize(static_cast<size_t>(n_));
    for (const int64_t s : my_stages_) {
      auto stage = build_stage(s);
      TORCH_CHECK(
          !stage.is_empty() && stage->size() > 0,
          "gpipe: the stage builder returned an empty Sequential for stage ",
          s);
      // Its skips must stay inside it (a skip to another stage is "never
      // popped" or "popped before it was stashed" here).
      gpipe::detail::skip_layout(stage, {static_cast<int64_t>(stage->size())});
      partitions_[static_cast<size_t>(s)] = stage;
      register_module("stage" + std::to_string(s), stage);
    }
    finish_construction("");
  }

  ~DistributedGPipeImpl() override = default;

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
  int64_t replicas() const {
    return replicas_;
  }
  int64_t replica() const {
    return replica_;
  }
  /// This rank's position in its pipeline, in [0, stages).
  int64_t position() const {
    return position_;
  }
  /// The (virtual) stages this rank runs, ascending.
  const std::vector<int64_t>& my_stages() const {
    return my_stages_;
  }
  bool is_first() const {
    return my_stages_.front() == 0;
  }
  bool is_last() const {
    return my_stages_.back() == n_ - 1;
  }
  const std::shared_ptr<World>& world() const {
    return world_;
  }

  /// Records this rank's cells (forward, backward, recompute, I, W) from
  /// now on; null stops. Partition numbers are global stage indices, so the
  /// ranks' events together draw the whole pipeline (on one host the ranks'
  /// steady clocks agree once each timeline is cleared after a barrier).
  void set_timeline(std::shared_ptr<Timeline> timeline) {
    timeline_ = std::move(timeline);
  }
  const std::shared_ptr<Timeline>& timeline() const {
    return timeline_;
  }

  /// The program each rank runs its lane of, for m micro-batches; with
  /// `by_order`, the one for messages matched by order (Note [Messages
  /// matched by order]), checked before it runs.
  const Program& program_for(int64_t m, bool by_order = false) {
    auto found = programs_.find({m, by_order});
    if (found == programs_.end()) {
      std::vector<int64_t> lanes;
      for (int64_t s = 0; s < n_; ++s) {
        lanes.push_back(s % options.stages());
      }
      Program program = build_program(options.schedule(), n_, m, lanes);
      simulate(program);
      if (by_order) {
        program = gpipe::detail::lower_for_ordered_messages(program);
        simulate(program);
        gpipe::detail::check_ordered_messages(program);
      }
      found = programs_.emplace(std::make_pair(m, by_order), std::move(program))
                  .first;
    }
    return found->second;
  }

  /// Whether tensors travel over NCCL.
  bool uses_nccl() const {
    return nccl_;
  }

  /// Whether the last step's messages went by order (Note [Ordered
  /// steps]): never on Gloo without match_by_order, and never on the first
  /// step of a batch shape, which agrees the shapes.
  bool last_step_by_order() const {
    return last_by_order_;
  }

  void pretty_print(std::ostream& stream) const override {
    stream << "gpipe::distributed::DistributedGPipe(rank=" << world_->rank()
           << ", replica=" << replica_ << ", position=" << position_
           << ", stages=[" << c10::Join(", ", my_stages_) << "], " << options
           << ", device=" << options.device() << ")";
  }

  DistributedOptions options;

 private:
  friend class gpipe::detail::StepRunner<DistributedGPipeImpl>;

  void place() {
    TORCH_CHECK(
        world_ != nullptr, "gpipe: DistributedGPipe needs a World, got null");
    const int64_t stages = options.stages();
    TORCH_CHECK(stages >= 1, "gpipe: stages must be at least 1, got ", stages);
    TORCH_CHECK(
        world_->size() % stages == 0,
        "gpipe: the world size ",
        world_->size(),
        " is not replicas x stages: ",
        stages,
        " stages do not divide ",
        world_->size(),
        " ranks");
    TORCH_CHECK(
        options.stages_per_rank() >= 1,
        "gpipe: stages_per_rank must be at least 1, got ",
        options.stages_per_rank());
    gpipe::detail::check_microbatches(options.microbatches());
    n_ = stages * options.stages_per_rank();
    TORCH_CHECK(
        n_ <= detail::kMaxStages,
        "gpipe: at most ",
        detail::kMaxStages,
        " stages across processes, got ",
        n_);
    TORCH_CHECK(
        options.microbatches() <= detail::kMaxMicrobatches,
        "gpipe: at most ",
        detail::kMaxMicrobatches,
        " micro-batches across processes, got ",
        options.microbatches());
    if (options.device().is_cuda() && !options.device().has_index()) {
      options.device(torch::Device(
          torch::kCUDA, static_cast<c10::DeviceIndex>(world_->local_rank())));
    }
    if (options.device().is_cuda()) {
      const int64_t visible = static_cast<int64_t>(torch::cuda::device_count());
      TORCH_CHECK(
          options.device().index() < visible,
          "gpipe: rank ",
          world_->rank(),
          " is to run on ",
          options.device(),
          " but sees ",
          visible,
          " CUDA devices (a CUDA device without an index is ",
          "cuda:LOCAL_RANK, here ",
          world_->local_rank(),
          ")");
    }
    const auto backend = options.backend();
    TORCH_CHECK(
        backend != Backend::Nccl || options.device().is_cuda(),
        "gpipe: Backend::Nccl needs a CUDA device, got ",
        options.device());
    nccl_ = backend == Backend::Nccl ||
        (backend == Backend::Auto && options.device().is_cuda() &&
         GPIPE_HAS_NCCL);
    TORCH_CHECK(
        !options.match_by_order() ||
            (!nccl_ && options.device().type() == torch::kCPU),
        "gpipe: match_by_order is for Gloo on CPUs (NCCL always matches by ",
        "order); got backend ",
        backend,
        " on ",
        options.device());
    replicas_ = world_->size() / stages;
    replica_ = world_->rank() / stages;
    position_ = world_->rank() % stages;
    for (int64_t s = position_; s < n_; s += stages) {
      my_stages_.push_back(s);
    }
    for (int64_t s = 0; s < n_; ++s) {
      rank_of_stage_.push_back(replica_ * stages + s % stages);
    }
  }

  void finish_construction(const std::string& whole_model) {
    const std::string prefix = world_->next_pipe_prefix();
    board_ = std::make_unique<detail::FailureBoard>(world_->store(), prefix);
    to(options.device());
    for (size_t s = 0; s < partitions_.size(); ++s) {
      traits_.push_back(std::make_unique<gpipe::detail::PartitionTraits>());
    }
    check_same_everywhere(prefix, whole_model);
    // Note [Ordered steps]: NCCL carries the data of steps whose shapes are
    // agreed; Gloo does with match_by_order.
    detail::OrderedPath path;
    if (nccl_) {
      // The group's ranks are this pipeline's, in stage order, so stage s
      // is its rank s % stages.
      const auto first = rank_of_stage_.begin();
      path.group = world_->new_nccl_group(
          prefix + "nccl_pipeline_" + std::to_string(replica_),
          std::vector<int64_t>(first, first + options.stages()),
          options.device());
      for (int64_t s = 0; s < n_; ++s) {
        path.rank_of_stage.push_back(s % options.stages());
      }
      path.device = options.device();
      path.coalesce = true;
    } else if (options.match_by_order()) {
      path.group = world_->group();
      path.rank_of_stage = rank_of_stage_;
    }
    transport_ = std::make_unique<detail::ProcessGroupTransport>(
        world_->group(),
        rank_of_stage_,
        *board_,
        [this](int64_t rank) { return describe(rank); },
        world_->timeout(),
        std::move(path));
    if (replicas_ > 1) {
      std::vector<int64_t> peers;
      for (int64_t r = 0; r < replicas_; ++r) {
        peers.push_back(r * options.stages() + position_);
      }
      const std::string name = prefix + "data_" + std::to_string(position_);
      data_group_ = nccl_
          ? world_->new_nccl_group(name, peers, options.device())
          : world_->new_group(name, peers);
    }
  }

  static std::string shapes_of(const torch::nn::Sequential& part) {
    std::ostringstream text;
    text << part->size() << " layers";
    for (const auto& p : part->named_parameters()) {
      text << "; " << p.key() << " " << p.value().sizes() << " "
           << p.value().scalar_type();
    }
    for (const auto& b : part->named_buffers()) {
      text << "; " << b.key() << " " << b.value().sizes();
    }
    return text.str();
  }

  /// Every rank must run the same options and, replica by replica, the same
  /// stages: each posts a fingerprint and compares it with rank 0's (the
  /// options, and the whole model when built from one) and with its first
  /// replica's (its own stages).
  void check_same_everywhere(
      const std::string& prefix,
      const std::string& whole_model) {
    std::ostringstream common;
    common << "world=" << world_->size() << "; " << options
           << "; device type=" << options.device().type() << "\n"
           << whole_model;
    std::ostringstream mine;
    for (const int64_t s : my_stages_) {
      mine << "stage " << s << ": "
           << shapes_of(partitions_[static_cast<size_t>(s)]) << "\n";
    }
    auto& store = *world_->store();
    const std::string rank = std::to_string(world_->rank());
    store.set(prefix + "common/" + rank, bytes(common.str()));
    store.set(prefix + "stages/" + rank, bytes(mine.str()));
    const auto text = [&](const std::string& key) {
      try {
        const auto value = store.get(key);
        return std::string(value.begin(), value.end());
      } catch (const std::exception& e) {
        TORCH_CHECK(
            false,
            "gpipe: rank ",
            world_->rank(),
            " waited ",
            world_->timeout().count(),
            " ms for ",
            key,
            " from another rank building the same pipe: ",
            e.what());
      }
      return std::string();
    };
    for (int64_t other = 0; other < world_->size(); ++other) {
      const std::string theirs =
          text(prefix + "common/" + std::to_string(other));
      TORCH_CHECK(
          theirs == common.str(),
          "gpipe: rank ",
          world_->rank(),
          " and rank ",
          other,
          " built different pipes: every rank must pass the same options ",
          "and model.\nrank ",
          other,
          ":\n",
          theirs,
          "\nrank ",
          world_->rank(),
          ":\n",
          common.str());
    }
    const std::string twin =
        text(prefix + "stages/" + std::to_string(position_));
    TORCH_CHECK(
        twin == mine.str(),
        "gpipe: rank ",
        world_->rank(),
        " (replica ",
        replica_,
        ") built stages that differ from rank ",
        position_,
        "'s (replica 0): replicas must hold the same stages.\nrank ",
        position_,
        ":\n",
        twin,
        "\nrank ",
        world_->rank(),
        ":\n",
        mine.str());
  }

  static std::vector<uint8_t> bytes(const std::string& text) {
    return {text.begin(), text.end()};
  }

  std::string describe(int64_t rank) const {
    const int64_t position = rank % options.stages();
    std::ostringstream text;
    text << "rank " << rank << " (stage";
    if (options.stages_per_rank() > 1) {
      text << "s";
      for (int64_t s = position; s < n_; s += options.stages()) {
        text << " " << s;
      }
    } else {
      text << " " << position;
    }
    text << ")";
    return text.str();
  }

  // --- the StepRunner's host interface ---
  int64_t stage_count() const {
    return n_;
  }

  Reduction loss_reduction() const {
    return options.loss_reduction();
  }

  c10::intrusive_ptr<gpipe::detail::StageState> make_state(
      int64_t i,
      int64_t j,
      int64_t m,
      const std::shared_ptr<gpipe::detail::PipeCall>& call) {
    const auto jj = static_cast<size_t>(j);
    const bool input_is_list =
        j == 0 ? call->input_is_list : call->output_is_list[jj - 1].load() == 1;
    return c10::make_intrusive<gpipe::detail::StageState>(
        partitions_[jj],
        gpipe::detail::CellIndex{i, j},
        options.device(),
        /*lane=*/0,
        is_training() &&
            gpipe::detail::checkpointed(options.checkpoint(), i, m),
        call,
        traits_[jj].get(),
        timeline_,
        input_is_list);
  }

  gpipe::detail::Bundle run_cell(
      int64_t i,
      int64_t j,
      int64_t m,
      const gpipe::detail::Bundle& x,
      const std::shared_ptr<gpipe::detail::PipeCall>& call,
      bool /*needs_graph: false*/) {
    auto state = make_state(i, j, m, call);
    auto out = gpipe::detail::with_cell_context(
        {i, j}, "forward", [&] { return state->run_partition(x); });
    check_batch_kept(i, j, x, out, *call);
    return out;
  }

  torch::Tensor receive(const torch::Tensor& x, int64_t /*i*/, int64_t /*j*/)
      const {
    return x.device() == options.device() ? x : x.to(options.device());
  }

  gpipe::detail::Bundle receive_all(
      const gpipe::detail::Bundle& x,
      int64_t i,
      int64_t j) const {
    gpipe::detail::Bundle moved;
    moved.reserve(x.size());
    for (const auto& t : x) {
      moved.push_back(t.defined() ? receive(t, i, j) : t);
    }
    return moved;
  }

  void check_batch_kept(
      int64_t i,
      int64_t j,
      const gpipe::detail::Bundle& x,
      const gpipe::detail::Bundle& out,
      const gpipe::detail::PipeCall& call) const {
    gpipe::detail::check_batch_kept(i, j, x, out, call, 0);
  }
  // ---

  std::shared_ptr<gpipe::detail::PipeCall> make_call(int64_t m, bool is_list) {
    auto call = std::make_shared<gpipe::detail::PipeCall>();
    std::unordered_set<const c10::TensorImpl*> seen;
    for (const auto& parameter : parameters()) {
      if (!parameter.requires_grad() ||
          !seen.insert(parameter.unsafeGetTensorImpl()).second) {
        continue;
      }
      call->slot_of.emplace(
          parameter.unsafeGetTensorImpl(), call->parameters.size());
      call->parameters.push_back(parameter);
      call->owner_lane.push_back(0); // one lane per process owns them all
      call->hooked.push_back(gpipe::detail::has_hooks(parameter) ? 1 : 0);
    }
    call->split = m > 1;
    call->input_is_list = is_list;
    call->outputs_require_grad.assign(static_cast<size_t>(n_), {});
    call->output_is_list.reset(new std::atomic<int>[static_cast<size_t>(n_)]);
    for (int64_t s = 0; s < n_; ++s) {
      call->output_is_list[static_cast<size_t>(s)].store(-1);
    }
    return call;
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
      detail::Watchdog watchdog(*board_, transport);
      auto loss =
          run_step(transport, std::move(input), is_list, target, loss_fn);
      transport.finish_sends();
      return loss;
    } catch (const std::exception& e) {
      broken_ = true;
      broken_reason_ = e.what();
      // The first post wins. A failure this rank saw in a peer (the
      // transport's errors name it) is passed on as the peer's, for ranks
      // further away.
      const std::string message = e.what();
      const std::string seen_in_peer = "gpipe: rank ";
      board_->post(
          message.rfind(seen_in_peer, 0) == 0
              ? message.substr(7) + " (seen by " + describe(world_->rank()) +
                  ")"
              : describe(world_->rank()) + " failed: " + message);
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
    const int64_t first_rank = rank_of_stage_.front();
    const int64_t last_rank = rank_of_stage_.back();
    // The batch: known to the first stage, told to the others.
    // [batch, micro-batches, input is a list, the step's signature (Note
    // [Shapes are agreed once per batch shape])].
    auto batch_message = torch::zeros({4}, torch::kInt64);
    std::vector<gpipe::detail::Bundle> inputs;
    if (is_first()) {
      gpipe::detail::check_bundle(input, "input");
      const int64_t batch = input.front().size(0);
      inputs = gpipe::detail::scatter_bundle(
          input, std::min(options.microbatches(), batch));
      batch_message[0] = batch;
      batch_message[1] = static_cast<int64_t>(inputs.size());
      batch_message[2] = is_list ? 1 : 0;
      std::ostringstream signature;
      signature << batch << " " << inputs.size() << " " << is_list;
      for (const auto& tensor : input) {
        signature << " " << tensor.scalar_type() << tensor.sizes()
                  << tensor.requires_grad();
      }
      batch_message[3] =
          static_cast<int64_t>(std::hash<std::string>{}(signature.str()));
      for (int64_t p = 1; p < options.stages(); ++p) {
        transport.send_control(
            batch_message, replica_ * options.stages() + p, kBatch);
      }
    } else {
      transport.recv_control(
          batch_message, first_rank, kBatch, "the batch size of this step");
    }
    const int64_t batch = batch_message[0].item<int64_t>();
    const int64_t m = batch_message[1].item<int64_t>();
    std::vector<torch::Tensor> targets;
    if (is_last()) {
      gpipe::detail::check_batch(target, "target");
      TORCH_CHECK(
          target.size(0) == batch,
          "gpipe: target and input have different batch sizes (input on ",
          describe(first_rank),
          ": ",
          batch,
          ", target on ",
          describe(world_->rank()),
          ": ",
          target.size(0),
          ")");
      targets = torch::tensor_split(target, m, /*dim=*/0);
    }
    const int64_t signature = batch_message[3].item<int64_t>();
    const bool by_order =
        !options.agree_shapes_every_step() && transport.can_order(signature);
    const Program& program = program_for(m, by_order);
    last_by_order_ = by_order;
    auto call = make_call(m, batch_message[2].item<int64_t>() == 1);
    gpipe::detail::LaneGradients lane_gradients(1, call->parameters);
    call->lane_gradients = &lane_gradients;
    // Note [Replicas average to the global batch]: this step's gradient
    // alone is summed across replicas.
    std::vector<torch::Tensor> earlier;
    if (replicas_ > 1) {
      for (auto& parameter : call->parameters) {
        earlier.push_back(parameter.grad());
        parameter.mutable_grad().reset();
      }
    }
    gpipe::detail::StepRunner<DistributedGPipeImpl> runner(
        *this,
        m,
        inputs,
        std::move(targets),
        loss_fn,
        static_cast<double>(batch),
        call,
        /*needs_graph=*/true);
    gpipe::detail::Executor executor(program, runner, transport);
    transport.begin(
        call.get(), signature, options.agree_shapes_every_step(), by_order);
    {
      c10::DeviceGuard on_device(options.device());
      executor.run_one_lane(static_cast<size_t>(position_));
    }
    transport.rethrow_if_aborted();
    transport.end();
    lane_gradients.deliver();
    call->lane_gradients = nullptr;
    // The loss: known to the last stage, told to the others.
    auto loss = torch::zeros({1}, torch::kFloat64);
    if (is_last()) {
      torch::Tensor total = runner.loss_values.front();
      for (size_t i = 1; i < runner.loss_values.size(); ++i) {
        total = total + runner.loss_values[i];
      }
      loss[0] = total.to(torch::kCPU, torch::kFloat64).item<double>();
      for (int64_t p = 0; p + 1 < options.stages(); ++p) {
        transport.send_control(
            loss.clone(), replica_ * options.stages() + p, kLoss);
      }
    } else {
      transport.recv_control(loss, last_rank, kLoss, "the loss of this step");
    }
    if (replicas_ > 1) {
      loss = reduce_across_replicas(call->parameters, earlier, batch, loss);
    }
    return loss.reshape({});
  }

  /// Note [Replicas average to the global batch].
  torch::Tensor reduce_across_replicas(
      const std::vector<torch::Tensor>& parameters,
      std::vector<torch::Tensor>& earlier,
      int64_t batch,
      const torch::Tensor& loss) {
    torch::NoGradGuard no_grad;
    const bool mean = options.loss_reduction() == Reduction::Mean;
    const double weight = mean ? static_cast<double>(batch) : 1.0;
    const torch::Device on = nccl_ ? options.device() : torch::kCPU;
    // [N, loss * weight, then per parameter: whether it has a gradient].
    auto meta = torch::zeros(
        {2 + static_cast<int64_t>(parameters.size())}, torch::kFloat64);
    meta[0] = static_cast<double>(batch);
    meta[1] = loss.item<double>() * weight;
    std::map<c10::ScalarType, std::vector<size_t>> by_dtype;
    for (size_t k = 0; k < parameters.size(); ++k) {
      if (parameters[k].grad().defined()) {
        meta[2 + static_cast<int64_t>(k)] = 1.0;
      }
      by_dtype[parameters[k].scalar_type()].push_back(k);
    }
    meta = meta.to(on);
    allreduce(meta, "the batch sizes and losses");
    meta = meta.to(torch::kCPU);
    const double total = meta[0].item<double>();
    for (const auto& [dtype, slots] : by_dtype) {
      std::vector<torch::Tensor> flat;
      for (const size_t k : slots) {
        const auto& grad = parameters[k].grad();
        flat.push_back(
            grad.defined()
                ? grad.reshape({-1}).to(on)
                : torch::zeros(
                      {parameters[k].numel()},
                      torch::TensorOptions().dtype(dtype).device(on)));
      }
      auto bucket = torch::cat(flat);
      if (mean) {
        bucket.mul_(weight);
      }
      allreduce(bucket, "the gradients");
      if (mean) {
        bucket.div_(total);
      }
      int64_t at = 0;
      for (const size_t k : slots) {
        const auto& parameter = parameters[k];
        const int64_t numel = parameter.numel();
        auto grad = bucket.narrow(0, at, numel)
                        .view(parameter.sizes())
                        .to(parameter.device());
        at += numel;
        const bool any = meta[2 + static_cast<int64_t>(k)].item<double>() > 0;
        auto& previous = earlier[k];
        auto& slot = parameter.mutable_grad();
        if (previous.defined()) {
          if (any) {
            previous.add_(grad);
          }
          slot = previous;
        } else {
          slot = any ? grad.clone() : torch::Tensor();
        }
      }
    }
    auto global = torch::empty({1}, torch::kFloat64);
    global[0] = mean ? meta[1].item<double>() / total : meta[1].item<double>();
    return global;
  }

  void allreduce(torch::Tensor& tensor, const char* what) {
    std::vector<torch::Tensor> tensors{tensor};
    c10d::AllreduceOptions reduce;
    reduce.reduceOp = c10d::ReduceOp::SUM;
    reduce.timeout = world_->timeout();
    try {
      data_group_->allreduce(tensors, reduce)->wait();
    } catch (const std::exception& e) {
      const auto posted = board_->find_within(std::chrono::milliseconds(1000));
      TORCH_CHECK(
          false,
          "gpipe: ",
          posted ? *posted
                 : "a replica of " + describe(world_->rank()) +
                  " failed, exited or timed out while summing " + what +
                  " across replicas (" + e.what() + ")");
    }
  }

  std::shared_ptr<World> world_;
  int64_t n_ = 0; // stages * stages_per_rank
  int64_t replicas_ = 1;
  int64_t replica_ = 0;
  int64_t position_ = 0;
  std::vector<int64_t> my_stages_;
  std::vector<int64_t> rank_of_stage_; // in this rank's pipeline
  std::vector<torch::nn::Sequential> partitions_; // null where not ours
  std::vector<std::unique_ptr<gpipe::detail::PartitionTraits>> traits_;
  std::map<std::pair<int64_t, bool>, Program> programs_; // (m, by order)
  bool nccl_ = false;
  bool last_by_order_ = false;
  std::unique_ptr<detail::FailureBoard> board_;
  std::unique_ptr<detail::ProcessGroupTransport> transport_;
  std::shared_ptr<Timeline> timeline_;
  c10::intrusive_ptr<c10d::Backend> data_group_; // null: one replica
  bool broken_ = false;
  std::string broken_reason_;
};

/// A ModuleHolder for DistributedGPipeImpl.
class DistributedGPipe : public torch::nn::ModuleHolder<DistributedGPipeImpl> {
 public:
  using torch::nn::ModuleHolder<DistributedGPipeImpl>::ModuleHolder;
};

} // namespace gpipe::distributed
