// One cell of the pipeline: partition j applied to micro-batch i.
//
// Note [A cell is one autograd node]
// Each cell runs its partition inside a custom autograd Function
// (StageFunction). In forward it either keeps the partition's own graph (no
// checkpoint) or runs without a graph and keeps only its input (checkpoint);
// in backward it recomputes if needed and differentiates that inner graph.
// Why one node per cell rather than the bare layers' graph:
//   * checkpointing and plain cells look the same to the outer graph, so the
//     three modes differ only in what a cell keeps, never in the numbers;
//   * the backward of a cell is one place to stamp the partition and
//     micro-batch on an error and to record its timing;
//   * the node stays in the graph for the first partition, whose input need
//     not require grad, because its inputs also hold tensors that do.
// Its extra inputs are every trainable parameter of the pipe (so that
// `torch::autograd::grad(loss, parameters)` finds each one, including a
// weight one partition borrows from another, e.g. a tied output projection).
// `step()` runs every backward itself and needs no outer graph: it calls the
// cell's StageState directly (forward, backward, or backward_input then
// backward_weight), and activations cross cells detached.
//
// Note [Where parameter gradients go]
// The inner backward reaches the leaves of the partition's graph: the cell's
// input, the parameters its modules register, and any tensor a layer
// borrows. Plain training accumulates each leaf's gradient once per backward,
// with its hooks run once on the whole gradient; a pipe computes it per
// micro-batch, so each gradient is sent where that promise holds:
//   * a parameter only partitions of this cell's lane register, without
//     hooks: accumulated into `.grad` in place, as plain training's
//     AccumulateGrad does (returning it instead would make the engine hold a
//     summed copy of every gradient until the partition's last micro-batch:
//     one extra gradient-sized buffer per step);
//   * any other parameter of the pipe (borrowed, registered on several lanes,
//     or with hooks): returned through the outer graph under `forward()`, so
//     the engine sums the micro-batches and runs hooks once; summed per lane
//     under `step()`, then delivered once at the end of the step in lane
//     order, so concurrent lanes give bit-identical results;
//   * a tensor from outside the pipe: accumulated as plain backward would;
//   * when the graph task asks for particular tensors
//     (`torch::autograd::grad`, `backward(inputs=...)`), every pipe parameter
//     goes through the outer graph and `.grad` is left alone.
// The inner backward runs reentrantly on the engine thread that runs the
// cell, so no cell ever waits on another thread and partitions sharing a
// device cannot deadlock.
#pragma once

#include <gpipe/detail/observer.h>
#include <gpipe/recompute.h>
#include <gpipe/timeline.h>

#include <ATen/ThreadLocalState.h>
#include <ATen/core/ivalue.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/functions/accumulate_grad.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/types.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace gpipe::detail {

/// Where a cell sits in the pipe, for error messages and timelines.
struct CellIndex {
  int64_t microbatch = 0;
  int64_t partition = 0;
};

inline std::string cell_context(const CellIndex& cell, const char* phase) {
  return "gpipe: partition " + std::to_string(cell.partition) +
      " failed on micro-batch " + std::to_string(cell.microbatch) + " in " +
      phase;
}

inline bool starts_with_cell_context(const std::string& text) {
  return text.rfind("gpipe: partition ", 0) == 0;
}

/// Calls `fn`; an error escaping it learns which cell failed and in what. A
/// c10::Error keeps its type (a c10::OutOfMemoryError stays catchable as
/// one) and gets the cell as context; any other exception becomes a
/// c10::Error whose message starts with the cell. Context is added once.
template <typename Fn>
decltype(auto) with_cell_context(
    const CellIndex& cell,
    const char* phase,
    Fn&& fn) {
  try {
    return std::forward<Fn>(fn)();
  } catch (c10::Error& e) {
    bool known = starts_with_cell_context(e.msg());
    for (const auto& context : e.context()) {
      known = known || starts_with_cell_context(context);
    }
    if (!known) {
      e.add_context(cell_context(cell, phase));
    }
    throw;
  } catch (const std::exception& e) {
    if (starts_with_cell_context(e.what())) {
      throw;
    }
    TORCH_CHECK(false, cell_context(cell, phase), ": ", e.what());
  }
}

/// Per partition, what the pipe has learned about it across calls.
struct PartitionTraits {
  /// Whether its forward writes into its own input (an in-place first
  /// layer): -1 not yet known, 0 no, 1 yes. A checkpointed cell then keeps a
  /// copy of its input, since the input it would keep is overwritten.
  std::atomic<int> mutates_input{-1};
};

/// Gradients of parameters that lanes must not accumulate in place, summed
/// per lane during a step and delivered once at its end
/// (Note [Where parameter gradients go]).
class LaneGradients {
 public:
  LaneGradients(size_t lanes, std::vector<torch::Tensor> parameters)
      : parameters_(std::move(parameters)),
        sums_(lanes, std::vector<torch::Tensor>(parameters_.size())) {}

  /// Called only by the lane's own cells, one at a time.
  void add(size_t lane, size_t slot, const torch::Tensor& grad) {
    auto& sum = sums_[lane][slot];
    sum = sum.defined() ? sum + grad : grad;
  }

  /// Sums the lanes in lane order and accumulates each parameter's total
  /// through its AccumulateGrad, so its hooks run once on the whole gradient.
  void deliver() {
    std::vector<torch::Tensor> roots;
    std::vector<torch::Tensor> grads;
    for (size_t slot = 0; slot < parameters_.size(); ++slot) {
      torch::Tensor total;
      for (auto& lane : sums_) {
        if (lane[slot].defined()) {
          total = total.defined() ? total + lane[slot] : lane[slot];
          lane[slot].reset();
        }
      }
      if (total.defined() && parameters_[slot].requires_grad()) {
        roots.push_back(parameters_[slot]);
        grads.push_back(std::move(total));
      }
    }
    if (!roots.empty()) {
      torch::autograd::backward(roots, grads);
    }
  }

 private:
  std::vector<torch::Tensor> parameters_;
  std::vector<std::vector<torch::Tensor>> sums_;
};

/// What the cells of one `forward()` or `step()` call share.
struct PipeCall {
  /// Trainable parameters of the whole pipe, each once: the extra node
  /// inputs under `forward()` (Note [A cell is one autograd node]).
  std::vector<torch::Tensor> parameters;
  std::unordered_map<const c10::TensorImpl*, size_t> slot_of;
  /// Per slot: the one lane whose partitions register it, or -1.
  std::vector<int64_t> owner_lane;
  /// Per slot: whether it had hooks when the call began.
  std::vector<char> hooked;
  /// Under `step()`: where gradients that must not be accumulated in place
  /// go. Null under `forward()`.
  LaneGradients* lane_gradients = nullptr;
  /// Lanes run at once and some cell is checkpointed: random operators take
  /// turns (Note [Random draws are recorded per operator]).
  bool lock_random_draws = false;
  /// Deferred BatchNorm's collector, or null (batch_norm.h).
  BatchNormObserver* batch_norm = nullptr;
  /// More than one micro-batch: every partition must keep the batch in
  /// dimension 0.
  bool split = false;
  /// Per partition: whether its output requires grad, learned from its first
  /// cell of the call (-1 not yet).
  std::vector<int> output_requires_grad;
};

/// Every buffer of a module tree as it is now, put back when the guard
/// ends: a recompute must not update running statistics a second time.
/// Written back through `variable_data()`, an alias with its own version
/// counter: the graphs of other micro-batches saved these buffers (BatchNorm
/// saves its running statistics), and plain training never bumps them
/// behind their back either (BatchNorm's kernels update them untracked).
class BufferGuard {
 public:
  explicit BufferGuard(const torch::nn::Module& module) {
    torch::NoGradGuard no_grad;
    for (const auto& buffer : module.buffers()) {
      if (buffer.defined()) {
        saved_.push_back({buffer, buffer.clone()});
      }
    }
  }

  ~BufferGuard() {
    torch::NoGradGuard no_grad;
    for (auto& saved : saved_) {
      saved.buffer.variable_data().copy_(saved.copy);
    }
  }

  BufferGuard(const BufferGuard&) = delete;
  BufferGuard& operator=(const BufferGuard&) = delete;

 private:
  struct Saved {
    torch::Tensor buffer;
    torch::Tensor copy;
  };
  std::vector<Saved> saved_;
};

/// A parameter's hooks set aside while cells compute its partial gradients:
/// the engine runs a tensor's hooks whenever it computes that tensor's
/// gradient, and plain training runs them once, on the whole gradient.
/// Counted, so that cells on several threads may park the same parameter.
class ParkedHooks {
 public:
  static ParkedHooks& instance() {
    static ParkedHooks parked;
    return parked;
  }

  void park(const torch::Tensor& parameter) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto& entry = parked_[parameter.unsafeGetTensorImpl()];
    if (entry.count++ == 0) {
      std::swap(entry.hooks, torch::autograd::impl::hooks(parameter));
    }
  }

  void unpark(const torch::Tensor& parameter) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto found = parked_.find(parameter.unsafeGetTensorImpl());
    if (found != parked_.end() && --found->second.count == 0) {
      std::swap(found->second.hooks, torch::autograd::impl::hooks(parameter));
      parked_.erase(found);
    }
  }

 private:
  struct Entry {
    int count = 0;
    std::vector<std::unique_ptr<torch::autograd::FunctionPreHook>> hooks;
  };
  std::mutex mutex_;
  std::unordered_map<const c10::TensorImpl*, Entry> parked_;
};

/// Parks the hooks of `parameters` for the guard's lifetime.
class HooksParkedGuard {
 public:
  explicit HooksParkedGuard(std::vector<torch::Tensor> parameters)
      : parameters_(std::move(parameters)) {
    for (const auto& p : parameters_) {
      ParkedHooks::instance().park(p);
    }
  }
  ~HooksParkedGuard() {
    for (const auto& p : parameters_) {
      ParkedHooks::instance().unpark(p);
    }
  }
  HooksParkedGuard(const HooksParkedGuard&) = delete;
  HooksParkedGuard& operator=(const HooksParkedGuard&) = delete;

 private:
  std::vector<torch::Tensor> parameters_;
};

/// The identity as an autograd node: a partition's input that is not a leaf
/// (a leaf that requires grad refuses in-place operations, which plain
/// training allows on the activations a partition receives).
struct InPlaceableInput : torch::autograd::Function<InPlaceableInput> {
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* /*ctx*/,
      const torch::Tensor& x) {
    return {x.detach()};
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* /*ctx*/,
      torch::autograd::variable_list grad_outputs) {
    return {grad_outputs[0]};
  }
};

/// The leaves (tensors with an AccumulateGrad) that a backward from `output`
/// reaches.
inline std::vector<torch::Tensor> reachable_leaves(
    const torch::Tensor& output) {
  std::vector<torch::Tensor> leaves;
  const auto root = output.grad_fn();
  if (!root) {
    if (output.requires_grad()) {
      leaves.push_back(output);
    }
    return leaves;
  }
  std::vector<torch::autograd::Node*> stack{root.get()};
  std::unordered_set<torch::autograd::Node*> seen{root.get()};
  while (!stack.empty()) {
    auto* node = stack.back();
    stack.pop_back();
    for (const auto& edge : node->next_edges()) {
      auto* next = edge.function.get();
      if (next == nullptr || !seen.insert(next).second) {
        continue;
      }
      if (auto* accumulate =
              dynamic_cast<torch::autograd::AccumulateGrad*>(next)) {
        leaves.push_back(accumulate->variable);
      } else {
        stack.push_back(next);
      }
    }
  }
  return leaves;
}

inline bool has_hooks(const torch::Tensor& tensor) {
  return !torch::autograd::impl::hooks(tensor).empty() ||
      torch::autograd::impl::post_acc_grad_hooks(tensor) != nullptr;
}

/// What one cell keeps between its forward and its backward.
struct StageState : torch::CustomClassHolder {
  StageState(
      torch::nn::Sequential partition_,
      CellIndex cell_,
      torch::Device device_,
      size_t lane_,
      bool checkpointed_,
      std::shared_ptr<PipeCall> call_,
      PartitionTraits* traits_,
      std::shared_ptr<Timeline> timeline_)
      : partition(std::move(partition_)),
        cell(cell_),
        device(device_),
        lane(lane_),
        checkpointed(checkpointed_),
        call(std::move(call_)),
        traits(traits_),
        timeline(std::move(timeline_)) {}

  torch::nn::Sequential partition;
  CellIndex cell;
  torch::Device device;
  size_t lane;
  bool checkpointed;
  std::shared_ptr<PipeCall> call;
  PartitionTraits* traits; // owned by the pipe, which outlives its graphs
  std::shared_ptr<Timeline> timeline; // null: record nothing

  bool input_requires_grad = false;
  bool output_requires_grad = true;
  /// Set once a backward without retain_graph has run (or failed).
  bool released = false;

  // Checkpointed: the input, the thread-local state (autocast, ...) and the
  // random draws of forward, for the recompute. Not checkpointed: the inner
  // graph, from `leaf` (a detached alias of the input) to `output`.
  torch::Tensor input;
  std::optional<at::ThreadLocalState> forward_state;
  RandomDraws draws;
  torch::Tensor leaf;
  torch::Tensor output;

  /// Set by each run of the partition: whether it wrote into its input.
  bool wrote_input = false;

  /// The tensor a partition runs on: an alias of `x`, so that an in-place
  /// first layer writes where plain training would. Partition 0's inputs
  /// are slices of one batch and share its version counter; each gets its
  /// own, so that writing into one micro-batch does not invalidate what
  /// another saved (plain training writes the batch once). Later partitions
  /// share the counter of the output they receive, so that overwriting an
  /// output its producer saved fails as it does in plain training.
  torch::Tensor alias_of_input(const torch::Tensor& x) const {
    return cell.partition == 0 ? x.variable_data() : x.detach();
  }

  /// Runs the partition on a leaf alias of `x`, with a graph from the leaf.
  void build_graph(const torch::Tensor& x) {
    torch::AutoGradMode enable_grad(true);
    leaf = alias_of_input(x).requires_grad_(input_requires_grad);
    const auto version = leaf._version();
    const torch::Tensor fed =
        input_requires_grad ? InPlaceableInput::apply(leaf)[0] : leaf;
    output = partition->forward(fed);
    wrote_input = leaf._version() != version;
  }

  TimelineScope scope(Phase phase) const {
    return TimelineScope(
        timeline.get(), cell.partition, cell.microbatch, phase, device);
  }

  torch::Tensor forward(const torch::Tensor& x) {
    TimelineScope recording = scope(Phase::Forward);
    input_requires_grad = x.requires_grad();
    if (checkpointed) {
      forward_state.emplace(); // before the observer joins the thread
    }
    CellObserver observer;
    observer.device = device;
    observer.lock_draws = call->lock_random_draws;
    observer.batch_norm = call->batch_norm;
    if (checkpointed) {
      observer.mode = CellObserver::Draws::Record;
      observer.draws = &draws;
    }
    std::optional<ObserverScope> observing;
    if (checkpointed || observer.lock_draws || observer.batch_norm) {
      observing.emplace(observer);
    }
    const RecomputeFlagGuard checkpointing(
        &RecomputeFlags::checkpointing, checkpointed);
    auto& known =
        call->output_requires_grad[static_cast<size_t>(cell.partition)];
    if (!checkpointed) {
      build_graph(x);
      output_requires_grad = output.requires_grad();
      known = output_requires_grad ? 1 : 0;
      return output.detach();
    }
    // Checkpointed: keep the input as forward saw it. A partition that
    // writes into its input (or might: the first time) keeps a copy.
    const int mutates = traits->mutates_input.load();
    input = mutates != 0 ? x.detach().clone() : x.detach();
    torch::Tensor out;
    if (known < 0) {
      // The first cell of the partition in this call learns whether the
      // output requires grad (a layer may detach it), with a graph it drops.
      build_graph(x);
      known = output.requires_grad() ? 1 : 0;
      out = output.detach();
      leaf.reset();
      output.reset();
    } else {
      torch::NoGradGuard no_grad;
      const auto fed = alias_of_input(x);
      const auto version = fed._version();
      out = partition->forward(fed).detach();
      wrote_input = fed._version() != version;
    }
    output_requires_grad = known == 1;
    if (mutates < 0) {
      traits->mutates_input.store(wrote_input ? 1 : 0);
    } else if (mutates == 0 && wrote_input) {
      traits->mutates_input.store(1);
      TORCH_CHECK(
          false,
          "gpipe: partition ",
          cell.partition,
          " wrote into its input in place on micro-batch ",
          cell.microbatch,
          " although it did not on earlier micro-batches, so the input kept ",
          "for its recompute is lost; the pipe now keeps a copy: call again");
    }
    return out;
  }

  void recompute() {
    TimelineScope recording = scope(Phase::Recompute);
    // Autocast and every other thread-local setting as forward had them,
    // but the profiler callbacks of now (forward's may be gone).
    const auto callbacks = at::get_record_function_tls_();
    at::ThreadLocalStateGuard forward_tls(*forward_state);
    at::set_record_function_tls_(callbacks);
    BufferGuard buffers(*partition);
    CellObserver observer;
    observer.mode = CellObserver::Draws::Replay;
    observer.device = device;
    observer.lock_draws = call->lock_random_draws;
    observer.draws = &draws;
    {
      ObserverScope observing(observer);
      const RecomputeFlagGuard recomputing(&RecomputeFlags::recomputing, true);
      build_graph(input);
    }
    TORCH_CHECK(
        observer.finished_replay(),
        "gpipe: partition ",
        cell.partition,
        " drew random numbers in its recompute of micro-batch ",
        cell.microbatch,
        " in another order than in its forward (",
        draws.before.size(),
        " random operators in forward); randomness that depends on the data ",
        "cannot be checkpointed: use Checkpoint::Never");
  }

  /// Gradients for [input, extra node inputs...]; undefined where there is
  /// none (Note [Where parameter gradients go]).
  std::vector<torch::Tensor> backward(
      const torch::Tensor& grad_output,
      size_t extra_inputs,
      bool keep_graph,
      bool graph_task_runs_all) {
    check_not_released();
    if (checkpointed) {
      recompute();
    }
    TimelineScope recording = scope(Phase::Backward);
    std::vector<torch::Tensor> grads(1 + extra_inputs);
    if (grad_output.defined() && output.requires_grad()) {
      const bool retain_graph = keep_graph && !checkpointed;
      differentiate(grad_output, retain_graph, graph_task_runs_all, grads);
    }
    if (checkpointed || !keep_graph) {
      leaf.reset();
      output.reset();
    }
    if (!keep_graph) {
      release();
    }
    return grads;
  }

  /// I of a zero-bubble schedule: the gradient of the input only, leaving
  /// the parameter gradients to `backward_weight` (Note [Splitting a
  /// backward into I and W]). Under `step()` only.
  torch::Tensor backward_input(const torch::Tensor& grad_output) {
    check_not_released();
    if (checkpointed) {
      recompute();
    }
    TimelineScope recording = scope(Phase::BackwardInput);
    weight_pending = true;
    std::vector<torch::Tensor> grads(1);
    if (!grad_output.defined() || !output.requires_grad()) {
      return torch::Tensor();
    }
    Plan plan = classify(/*graph_task_runs_all=*/true);
    if (plan.wrt.empty()) {
      return torch::Tensor();
    }
    auto groups = weight_groups(plan);
    if (!groups) {
      // No clean split (a weight used twice, or no input to differentiate):
      // I does all of it, W nothing.
      differentiate_with(plan, grad_output, /*retain_graph=*/false, grads);
      release_graph();
      return grads[0];
    }
    std::vector<std::pair<torch::autograd::Node*, FunctionPreHookHandle>> hooks;
    for (auto& group : *groups) {
      hooks.emplace_back(
          group.node.get(), add_capture_hook(*group.node, &group.grads));
    }
    std::vector<torch::Tensor> computed;
    try {
      computed = torch::autograd::grad(
          {output},
          {leaf},
          {grad_output},
          /*retain_graph=*/true,
          /*create_graph=*/false,
          /*allow_unused=*/true);
    } catch (...) {
      remove_capture_hooks(hooks);
      throw;
    }
    remove_capture_hooks(hooks);
    pending_plan = std::move(plan);
    pending_groups = std::move(*groups);
    return computed[0];
  }

  /// W: the parameter gradients `backward_input` left, from the gradients
  /// it captured, without redoing the input gradient.
  void backward_weight() {
    check_not_released();
    TORCH_CHECK(
        weight_pending,
        "gpipe: backward_weight of partition ",
        cell.partition,
        " on micro-batch ",
        cell.microbatch,
        " before its backward_input");
    weight_pending = false;
    TimelineScope recording = scope(Phase::BackwardWeight);
    if (!pending_groups.empty()) {
      std::vector<torch::Tensor> computed(pending_plan.wrt.size());
      {
        HooksParkedGuard parked(pending_plan.hooked);
        auto& engine = torch::autograd::Engine::get_default_engine();
        for (auto& group : pending_groups) {
          torch::autograd::edge_list roots;
          torch::autograd::variable_list root_grads;
          for (size_t k = 0; k < group.grads.size(); ++k) {
            if (group.grads[k].defined()) {
              roots.emplace_back(group.node, static_cast<uint32_t>(k));
              root_grads.push_back(std::move(group.grads[k]));
            }
          }
          if (roots.empty()) {
            continue;
          }
          torch::autograd::edge_list outputs;
          for (size_t k : group.wrt) {
            outputs.emplace_back(
                torch::autograd::impl::try_get_grad_accumulator(
                    pending_plan.wrt[k]),
                0);
          }
          auto values = engine.execute(
              roots,
              root_grads,
              /*keep_graph=*/true,
              /*create_graph=*/false,
              /*accumulate_grad=*/false,
              outputs);
          for (size_t n = 0; n < group.wrt.size(); ++n) {
            computed[group.wrt[n]] = std::move(values[n]);
          }
        }
      }
      std::vector<torch::Tensor> grads(1);
      route(pending_plan, computed, grads);
    }
    release();
  }

  /// Drops everything kept for backward.
  void release() {
    release_graph();
    input.reset();
    forward_state.reset();
    draws.before.clear();
    pending_groups.clear();
    pending_plan = Plan();
    released = true;
  }

  /// Drops what a recompute built, keeping what a retry needs.
  void drop_recomputed_graph() {
    if (checkpointed) {
      release_graph();
    }
  }

 private:
  // Note [Splitting a backward into I and W]
  // A zero-bubble schedule runs a cell's backward in two parts: I, the
  // gradient of the input (which the previous stage waits for), and later W,
  // the parameter gradients (which nobody waits for). W must not redo I's
  // work. The graph says where the two separate: a node on the input's path
  // (one from which the input is reachable) with an edge off that path
  // towards parameters (Linear's addmm: its mat2 edge leads to the weight) is
  // an "intermediate". I differentiates the input alone, so the engine skips
  // every edge that does not lead to the input (an autograd node computes
  // only the outputs its graph task needs), and a pre-hook captures the
  // gradient each intermediate receives. W then starts the engine at each
  // intermediate with its captured gradient, asking only for the parameters
  // behind it: the edges back towards the input are not needed, so nothing
  // of I runs again. The split needs every parameter behind exactly one
  // intermediate; a weight used twice in one partition (two intermediates)
  // makes I do the whole backward and W nothing, which is still correct.

  /// Where the gradients of one inner backward go
  /// (Note [Where parameter gradients go]).
  enum class Goes { Input, InPlace, Slot, Lane };
  struct Plan {
    std::vector<torch::Tensor> wrt;
    std::vector<std::pair<Goes, size_t>> where;
    std::vector<torch::Tensor> hooked;
    bool only_in_place = true;
  };

  /// One intermediate of Note [Splitting a backward into I and W].
  struct WeightGroup {
    std::shared_ptr<torch::autograd::Node> node;
    torch::autograd::variable_list grads; // captured during I
    std::vector<size_t> wrt; // indices into Plan::wrt
  };

  using FunctionPreHookHandle = const torch::autograd::FunctionPreHook*;

  struct CaptureGradients : torch::autograd::FunctionPreHook {
    explicit CaptureGradients(torch::autograd::variable_list* into_)
        : into(into_) {}
    torch::autograd::variable_list operator()(
        const torch::autograd::variable_list& grads) override {
      *into = grads;
      return grads;
    }
    torch::autograd::variable_list* into;
  };

  static FunctionPreHookHandle add_capture_hook(
      torch::autograd::Node& node,
      torch::autograd::variable_list* into) {
    auto hook = std::make_unique<CaptureGradients>(into);
    const FunctionPreHookHandle handle = hook.get();
    node.add_pre_hook(std::move(hook));
    return handle;
  }

  static void remove_capture_hooks(
      const std::vector<
          std::pair<torch::autograd::Node*, FunctionPreHookHandle>>& hooks) {
    for (const auto& [node, handle] : hooks) {
      auto& all = node->pre_hooks();
      all.erase(
          std::remove_if(
              all.begin(),
              all.end(),
              [handle = handle](const auto& hook) {
                return hook.get() == handle;
              }),
          all.end());
    }
  }

  /// The intermediates of `plan`'s parameters, or nothing when the split is
  /// not clean (Note [Splitting a backward into I and W]).
  std::optional<std::vector<WeightGroup>> weight_groups(const Plan& plan) {
    if (!input_requires_grad || !output.grad_fn()) {
      return std::nullopt;
    }
    const auto target = torch::autograd::impl::try_get_grad_accumulator(leaf);
    if (!target) {
      return std::nullopt;
    }
    using torch::autograd::Node;
    std::unordered_map<Node*, bool> reaches_input;
    std::function<bool(Node*)> reaches = [&](Node* node) {
      const auto found = reaches_input.find(node);
      if (found != reaches_input.end()) {
        return found->second;
      }
      bool yes = node == target.get();
      for (const auto& edge : node->next_edges()) {
        if (edge.function && reaches(edge.function.get())) {
          yes = true;
        }
      }
      reaches_input[node] = yes;
      return yes;
    };
    if (!reaches(output.grad_fn().get())) {
      return std::nullopt;
    }
    std::unordered_map<Node*, size_t> index_of_leaf; // accumulator -> wrt
    for (size_t k = 0; k < plan.wrt.size(); ++k) {
      if (plan.where[k].first == Goes::Input) {
        continue;
      }
      if (auto accumulator =
              torch::autograd::impl::try_get_grad_accumulator(plan.wrt[k])) {
        index_of_leaf.emplace(accumulator.get(), k);
      }
    }
    std::vector<WeightGroup> groups;
    std::unordered_map<size_t, Node*> owner; // wrt index -> intermediate
    for (const auto& [node, on_path] : reaches_input) {
      if (!on_path) {
        continue;
      }
      std::vector<size_t> behind;
      std::vector<Node*> stack;
      std::unordered_set<Node*> seen;
      for (const auto& edge : node->next_edges()) {
        if (edge.function && !reaches_input.at(edge.function.get()) &&
            seen.insert(edge.function.get()).second) {
          stack.push_back(edge.function.get());
        }
      }
      while (!stack.empty()) {
        Node* next = stack.back();
        stack.pop_back();
        const auto leaf_index = index_of_leaf.find(next);
        if (leaf_index != index_of_leaf.end()) {
          behind.push_back(leaf_index->second);
        }
        for (const auto& edge : next->next_edges()) {
          if (edge.function && seen.insert(edge.function.get()).second) {
            stack.push_back(edge.function.get());
          }
        }
      }
      if (behind.empty()) {
        continue;
      }
      for (size_t k : behind) {
        if (!owner.emplace(k, node).second) {
          return std::nullopt; // behind two intermediates
        }
      }
      std::shared_ptr<Node> shared = node->getptr();
      groups.push_back({std::move(shared), {}, std::move(behind)});
    }
    if (owner.size() + 1 != plan.wrt.size()) {
      return std::nullopt; // a parameter not behind any intermediate
    }
    return groups;
  }

  void check_not_released() const {
    TORCH_CHECK(
        !released,
        "gpipe: trying to backward through partition ",
        cell.partition,
        " on micro-batch ",
        cell.microbatch,
        " a second time (or directly access saved tensors after they have ",
        "already been freed); specify retain_graph=true if you need to ",
        "backward a second time");
  }

  void release_graph() {
    leaf.reset();
    output.reset();
  }

  /// Classifies what the inner backward reaches.
  Plan classify(bool graph_task_runs_all) const {
    const bool under_step = call->lane_gradients != nullptr;
    Plan plan;
    plan.only_in_place = graph_task_runs_all;
    for (auto& reached : reachable_leaves(output)) {
      if (!reached.requires_grad()) {
        continue; // frozen after forward: plain training skips it too
      }
      if (reached.is_same(leaf)) {
        plan.wrt.push_back(reached);
        plan.where.emplace_back(Goes::Input, 0);
        continue;
      }
      const auto found = call->slot_of.find(reached.unsafeGetTensorImpl());
      if (found == call->slot_of.end()) {
        if (graph_task_runs_all) { // a tensor from outside the pipe
          plan.wrt.push_back(reached);
          plan.where.emplace_back(Goes::InPlace, 0);
        }
        continue;
      }
      const size_t slot = found->second;
      const bool owned = call->owner_lane[slot] == static_cast<int64_t>(lane);
      if (call->hooked[slot]) {
        plan.hooked.push_back(reached);
      }
      if (graph_task_runs_all && owned && !call->hooked[slot]) {
        plan.wrt.push_back(reached);
        plan.where.emplace_back(Goes::InPlace, 0);
      } else if (graph_task_runs_all && under_step) {
        plan.wrt.push_back(reached);
        plan.where.emplace_back(Goes::Lane, slot);
        plan.only_in_place = false;
      } else if (!under_step) {
        plan.wrt.push_back(reached);
        plan.where.emplace_back(Goes::Slot, slot);
        plan.only_in_place = false;
      }
    }
    return plan;
  }

  void differentiate(
      const torch::Tensor& grad_output,
      bool retain_graph,
      bool graph_task_runs_all,
      std::vector<torch::Tensor>& grads) {
    const Plan plan = classify(graph_task_runs_all);
    if (!plan.wrt.empty()) {
      differentiate_with(plan, grad_output, retain_graph, grads);
    }
  }

  void differentiate_with(
      const Plan& plan,
      const torch::Tensor& grad_output,
      bool retain_graph,
      std::vector<torch::Tensor>& grads) {
    if (plan.only_in_place) {
      // The common case: plain backward semantics, straight into `.grad`.
      torch::autograd::backward(
          {output},
          {grad_output},
          retain_graph,
          /*create_graph=*/false,
          plan.wrt);
      if (input_requires_grad && leaf.grad().defined()) {
        grads[0] = leaf.grad();
        leaf.mutable_grad().reset();
      }
      return;
    }
    std::vector<torch::Tensor> computed;
    {
      HooksParkedGuard parked(plan.hooked);
      computed = torch::autograd::grad(
          {output},
          plan.wrt,
          {grad_output},
          retain_graph,
          /*create_graph=*/false,
          /*allow_unused=*/true);
    }
    route(plan, computed, grads);
  }

  /// Sends each computed gradient where `plan` says.
  void route(
      const Plan& plan,
      std::vector<torch::Tensor>& computed,
      std::vector<torch::Tensor>& grads) {
    std::vector<torch::Tensor> in_place_roots;
    std::vector<torch::Tensor> in_place_grads;
    for (size_t k = 0; k < plan.wrt.size(); ++k) {
      if (!computed[k].defined()) {
        continue;
      }
      const auto [goes, slot] = plan.where[k];
      switch (goes) {
        case Goes::Input:
          grads[0] = std::move(computed[k]);
          break;
        case Goes::InPlace:
          in_place_roots.push_back(plan.wrt[k]);
          in_place_grads.push_back(std::move(computed[k]));
          break;
        case Goes::Slot:
          grads[1 + slot] = std::move(computed[k]);
          break;
        case Goes::Lane:
          call->lane_gradients->add(lane, slot, computed[k]);
          break;
      }
    }
    if (!in_place_roots.empty()) {
      torch::autograd::backward(in_place_roots, in_place_grads);
    }
  }

 public:
  /// Between I and W: what W needs.
  bool weight_pending = false;
  Plan pending_plan;
  std::vector<WeightGroup> pending_groups;
};

/// The autograd Function of Note [A cell is one autograd node].
struct StageFunction : torch::autograd::Function<StageFunction> {
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx,
      c10::intrusive_ptr<StageState> state,
      const torch::Tensor& x,
      at::TensorList extra_inputs) {
    auto out = state->forward(x);
    if (!state->output_requires_grad) {
      ctx->mark_non_differentiable({out});
    }
    ctx->saved_data["state"] = c10::IValue::make_capsule(state);
    ctx->saved_data["extra_inputs"] = static_cast<int64_t>(extra_inputs.size());
    return {out};
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx,
      torch::autograd::variable_list grad_outputs) {
    auto state = c10::static_intrusive_pointer_cast<StageState>(
        ctx->saved_data["state"].toCapsule());
    const auto extra_inputs =
        static_cast<size_t>(ctx->saved_data["extra_inputs"].toInt());
    TORCH_CHECK(
        !torch::GradMode::is_enabled(),
        "gpipe: double backward through a pipe is not supported "
        "(call backward without create_graph=true)");
    const bool keep_graph =
        torch::autograd::get_current_graph_task_keep_graph();
    // An empty exec_info means the graph task runs everything: a plain
    // backward that accumulates into .grad.
    const auto* exec_info = torch::autograd::get_current_graph_task_exec_info();
    const bool runs_all = exec_info == nullptr || exec_info->empty();
    auto grads = with_cell_context(state->cell, "backward", [&] {
      try {
        return state->backward(
            grad_outputs[0], extra_inputs, keep_graph, runs_all);
      } catch (...) {
        // A failed backward must not keep the recomputed graph: it would
        // outlive the step (and, with a hook that threw, never be freed).
        // With retain_graph the input stays, so a retry can succeed.
        state->drop_recomputed_graph();
        if (!keep_graph) {
          state->release();
        }
        throw;
      }
    });
    torch::autograd::variable_list result;
    result.reserve(1 + grads.size());
    result.emplace_back(); // state
    for (auto& grad : grads) {
      result.push_back(std::move(grad));
    }
    return result;
  }
};

} // namespace gpipe::detail
