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

#include <gpipe/detail/bundle.h>
#include <gpipe/detail/observer.h>
#include <gpipe/detail/skip_layout.h>
#include <gpipe/recompute.h>
#include <gpipe/skip.h>
#include <gpipe/timeline.h>

#include <ATen/ThreadLocalState.h>
#include <ATen/core/ivalue.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/functions/accumulate_grad.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
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
  /// Per partition: which of its outputs require grad, learned from its
  /// first cell of the call (empty: not yet).
  std::vector<std::vector<char>> outputs_require_grad;
  /// Whether the pipe's input is a list (else one tensor), and per
  /// partition whether its output is (-1: not yet known), learned from its
  /// first cell of the call: the next partition's first layer takes that.
  bool input_is_list = false;
  std::unique_ptr<std::atomic<int>[]> output_is_list;
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

/// The edge a backward from `tensor` starts at: its grad_fn, or its
/// accumulator for a leaf. Invalid when it does not require grad.
inline torch::autograd::Edge root_edge(const torch::Tensor& tensor) {
  if (!tensor.defined() || !tensor.requires_grad()) {
    return {};
  }
  return torch::autograd::impl::gradient_edge(tensor);
}

/// The edge whose gradient a backward is asked for, as
/// `torch::autograd::grad` builds it.
inline torch::autograd::Edge wanted_edge(const torch::Tensor& tensor) {
  auto grad_fn = tensor.grad_fn();
  if (!grad_fn) {
    grad_fn = torch::autograd::impl::try_get_grad_accumulator(tensor);
  }
  if (!grad_fn) {
    return {std::make_shared<torch::autograd::Identity>(), 0};
  }
  return {std::move(grad_fn), static_cast<uint32_t>(tensor.output_nr())};
}

/// The leaves (tensors with an AccumulateGrad) that a backward from `roots`
/// reaches.
inline std::vector<torch::Tensor> reachable_leaves(
    const torch::autograd::edge_list& roots) {
  std::vector<torch::Tensor> leaves;
  std::vector<torch::autograd::Node*> stack;
  std::unordered_set<torch::autograd::Node*> seen;
  auto visit = [&](torch::autograd::Node* next) {
    if (next == nullptr || !seen.insert(next).second) {
      return;
    }
    if (auto* accumulate =
            dynamic_cast<torch::autograd::AccumulateGrad*>(next)) {
      leaves.push_back(accumulate->variable);
    } else {
      stack.push_back(next);
    }
  };
  for (const auto& root : roots) {
    visit(root.function.get());
  }
  while (!stack.empty()) {
    auto* node = stack.back();
    stack.pop_back();
    for (const auto& edge : node->next_edges()) {
      visit(edge.function.get());
    }
  }
  return leaves;
}

inline bool has_hooks(const torch::Tensor& tensor) {
  return !torch::autograd::impl::hooks(tensor).empty() ||
      torch::autograd::impl::post_acc_grad_hooks(tensor) != nullptr;
}

/// What one cell keeps between its forward and its backward.
///
/// A cell's inputs are a bundle (bundle.h): the tensors the previous
/// partition returned, then the skips it pops that were stashed in earlier
/// partitions. Its outputs are what its last layer returned, then the skips
/// it stashes for later partitions (skip_layout.h). The inner graph is kept
/// from its roots' edges, not from the output tensors, so that an output
/// no later op saved (a skip tensor, typically) is freed as soon as its
/// consumer is done with it.
struct StageState : torch::CustomClassHolder {
  StageState(
      torch::nn::Sequential partition_,
      CellIndex cell_,
      torch::Device device_,
      size_t lane_,
      bool checkpointed_,
      std::shared_ptr<PipeCall> call_,
      PartitionTraits* traits_,
      std::shared_ptr<Timeline> timeline_,
      bool input_is_list_ = false,
      const PartitionSkips* skips_ = nullptr)
      : partition(std::move(partition_)),
        cell(cell_),
        device(device_),
        lane(lane_),
        checkpointed(checkpointed_),
        call(std::move(call_)),
        traits(traits_),
        timeline(std::move(timeline_)),
        input_is_list(input_is_list_),
        skips(skips_) {}

  torch::nn::Sequential partition;
  CellIndex cell;
  torch::Device device;
  size_t lane;
  bool checkpointed;
  std::shared_ptr<PipeCall> call;
  PartitionTraits* traits; // owned by the pipe, which outlives its graphs
  std::shared_ptr<Timeline> timeline; // null: record nothing
  /// Whether the partition's first layer takes a list (else one tensor).
  bool input_is_list;
  const PartitionSkips* skips; // owned by the pipe; null: none

  std::vector<char> inputs_require_grad;
  std::vector<char> outputs_require_grad;
  /// Set once a backward without retain_graph has run (or failed).
  bool released = false;

  // Checkpointed: the inputs, the thread-local state (autocast, ...) and the
  // random draws of forward, for the recompute. Not checkpointed: the inner
  // graph, from `leaves` (detached aliases of the inputs) to `roots` (the
  // outputs' edges).
  Bundle inputs;
  std::optional<at::ThreadLocalState> forward_state;
  RandomDraws draws;
  Bundle leaves;
  torch::autograd::edge_list roots;

  /// Set by each run of the partition: whether it wrote into an input.
  bool wrote_input = false;

  bool any_input_requires_grad() const {
    return std::any_of(
        inputs_require_grad.begin(), inputs_require_grad.end(), [](char c) {
          return c != 0;
        });
  }

  bool any_output_requires_grad() const {
    return std::any_of(
        outputs_require_grad.begin(), outputs_require_grad.end(), [](char c) {
          return c != 0;
        });
  }

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

  /// Every micro-batch of a partition returns as many tensors.
  void check_output_count(const std::vector<char>& known, size_t count) const {
    TORCH_CHECK(
        known.empty() || known.size() == count,
        "gpipe: ",
        where(),
        " returned ",
        count,
        " tensors, but ",
        known.size(),
        " on an earlier micro-batch; a pipe gathers the micro-batches' ",
        "outputs tensor by tensor, so every micro-batch returns as many");
  }

  std::string where() const {
    return "partition " + std::to_string(cell.partition) + " on micro-batch " +
        std::to_string(cell.microbatch);
  }

  /// The partition's layers applied to `fed` (main inputs, then incoming
  /// skips); returns its outputs (main, then outgoing skips).
  Bundle run_partition(const Bundle& fed) {
    const size_t incoming = skips == nullptr ? 0 : skips->incoming.size();
    TORCH_INTERNAL_ASSERT(
        fed.size() > incoming,
        "gpipe: ",
        where(),
        " has no input besides its skips");
    const size_t main = fed.size() - incoming;
    SkipFrame frame;
    frame.partition = cell.partition;
    frame.microbatch = cell.microbatch;
    for (size_t k = 0; k < incoming; ++k) {
      frame.available.emplace(skips->incoming[k], fed[main + k]);
      frame.versions.emplace(skips->incoming[k], fed[main + k]._version());
    }
    Value out;
    {
      SkipFrameGuard current(&frame);
      torch::nn::AnyValue value =
          any_value_of(Bundle(fed.begin(), fed.begin() + main), input_is_list);
      for (auto& layer : *partition) {
        value = layer.any_forward(std::move(value));
      }
      out = value_of(std::move(value), where());
    }
    const int kind = out.is_list ? 1 : 0;
    int expected = -1;
    auto& known_kind =
        call->output_is_list[static_cast<size_t>(cell.partition)];
    if (!known_kind.compare_exchange_strong(expected, kind)) {
      TORCH_CHECK(
          expected == kind,
          "gpipe: ",
          where(),
          " returned ",
          out.is_list ? "a list of tensors" : "one tensor",
          " but ",
          expected == 1 ? "a list" : "one tensor",
          " before; a pipe needs every micro-batch to return the same kind");
    }
    for (size_t k = 0; k < out.tensors.size(); ++k) {
      TORCH_CHECK(
          out.tensors[k].defined(),
          "gpipe: ",
          where(),
          " returned an undefined tensor (output ",
          k,
          ")");
    }
    if (skips != nullptr) {
      for (const auto& name : skips->outgoing) {
        const auto found = frame.available.find(name);
        TORCH_CHECK(
            found != frame.available.end(),
            "gpipe: skip '",
            name,
            "' was not stashed in ",
            where(),
            ", although a layer there declares it (a declared stash must ",
            "happen on every micro-batch)");
        out.tensors.push_back(std::move(found->second));
        frame.available.erase(found);
      }
    }
    if (!frame.available.empty()) {
      std::vector<std::string> left;
      for (const auto& entry : frame.available) {
        left.push_back("'" + entry.first + "'");
      }
      TORCH_CHECK(
          false,
          "gpipe: skip ",
          c10::Join(", ", left),
          " was not popped in ",
          where(),
          ", although a layer there declares it (a declared pop must ",
          "happen on every micro-batch)");
    }
    return std::move(out.tensors);
  }

  /// Runs the partition on leaf aliases of `x`, with a graph from the leaves.
  void build_graph(const Bundle& x) {
    torch::AutoGradMode enable_grad(true);
    leaves.clear();
    Bundle fed;
    std::vector<int64_t> versions;
    for (size_t k = 0; k < x.size(); ++k) {
      const bool wants_grad = inputs_require_grad[k] != 0;
      leaves.push_back(alias_of_input(x[k]).requires_grad_(wants_grad));
      versions.push_back(leaves.back()._version());
      fed.push_back(
          wants_grad ? InPlaceableInput::apply(leaves.back())[0]
                     : leaves.back());
    }
    const Bundle outputs = run_partition(fed);
    wrote_input = false;
    for (size_t k = 0; k < x.size(); ++k) {
      wrote_input = wrote_input || leaves[k]._version() != versions[k];
    }
    roots.clear();
    outputs_require_grad.clear();
    for (const auto& output : outputs) {
      roots.push_back(root_edge(output));
      outputs_require_grad.push_back(roots.back().is_valid() ? 1 : 0);
    }
    detached_outputs.clear();
    for (const auto& output : outputs) {
      detached_outputs.push_back(output.detach());
    }
  }

  TimelineScope scope(Phase phase) const {
    return TimelineScope(
        timeline.get(), cell.partition, cell.microbatch, phase, device);
  }

  /// Runs the cell; returns its outputs, detached.
  Bundle forward(const Bundle& x) {
    TimelineScope recording = scope(Phase::Forward);
    inputs_require_grad.clear();
    for (const auto& t : x) {
      inputs_require_grad.push_back(t.requires_grad() ? 1 : 0);
    }
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
        call->outputs_require_grad[static_cast<size_t>(cell.partition)];
    if (!checkpointed) {
      build_graph(x);
      check_output_count(known, outputs_require_grad.size());
      known = outputs_require_grad;
      return std::exchange(detached_outputs, {});
    }
    // Checkpointed: keep the inputs as forward saw them. A partition that
    // writes into its input (or might: the first time) keeps a copy.
    const int mutates = traits->mutates_input.load();
    inputs.clear();
    for (const auto& t : x) {
      inputs.push_back(mutates != 0 ? t.detach().clone() : t.detach());
    }
    Bundle out;
    if (known.empty()) {
      // The first cell of the partition in this call learns which outputs
      // require grad (a layer may detach one), with a graph it drops.
      build_graph(x);
      known = outputs_require_grad;
      out = std::exchange(detached_outputs, {});
      release_graph();
    } else {
      torch::NoGradGuard no_grad;
      Bundle fed;
      std::vector<int64_t> versions;
      for (const auto& t : x) {
        fed.push_back(alias_of_input(t));
        versions.push_back(fed.back()._version());
      }
      for (auto& t : run_partition(fed)) {
        out.push_back(t.detach());
      }
      wrote_input = false;
      for (size_t k = 0; k < fed.size(); ++k) {
        wrote_input = wrote_input || fed[k]._version() != versions[k];
      }
      check_output_count(known, out.size());
    }
    outputs_require_grad = known;
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
    const auto known = outputs_require_grad;
    {
      ObserverScope observing(observer);
      const RecomputeFlagGuard recomputing(&RecomputeFlags::recomputing, true);
      build_graph(inputs);
      detached_outputs.clear();
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
    TORCH_CHECK(
        roots.size() == known.size(),
        "gpipe: ",
        where(),
        " returned ",
        roots.size(),
        " tensors in its recompute but ",
        known.size(),
        " in its forward");
  }

  /// Gradients for [inputs..., extra node inputs...]; undefined where there
  /// is none (Note [Where parameter gradients go]).
  Bundle backward(
      const Bundle& grad_outputs,
      size_t extra_inputs,
      bool keep_graph,
      bool graph_task_runs_all) {
    check_not_released();
    if (checkpointed) {
      recompute();
    }
    TimelineScope recording = scope(Phase::Backward);
    Bundle grads(inputs_require_grad.size() + extra_inputs);
    if (has_work(grad_outputs)) {
      const bool retain_graph = keep_graph && !checkpointed;
      differentiate(grad_outputs, retain_graph, graph_task_runs_all, grads);
    }
    if (checkpointed || !keep_graph) {
      release_graph();
    }
    if (!keep_graph) {
      release();
    }
    return grads;
  }

  /// I of a zero-bubble schedule: the gradients of the inputs only, leaving
  /// the parameter gradients to `backward_weight` (Note [Splitting a
  /// backward into I and W]). Under `step()` only.
  Bundle backward_input(const Bundle& grad_outputs) {
    check_not_released();
    if (checkpointed) {
      recompute();
    }
    TimelineScope recording = scope(Phase::BackwardInput);
    weight_pending = true;
    Bundle grads(inputs_require_grad.size());
    if (!has_work(grad_outputs)) {
      return grads;
    }
    Plan plan = classify(/*graph_task_runs_all=*/true);
    if (plan.wrt.empty()) {
      return grads;
    }
    auto groups = weight_groups(plan);
    if (!groups) {
      // No clean split (a weight used twice, or no input to differentiate):
      // I does all of it, W nothing.
      differentiate_with(plan, grad_outputs, /*retain_graph=*/false, grads);
      release_graph();
      return grads;
    }
    std::vector<std::pair<torch::autograd::Node*, FunctionPreHookHandle>> hooks;
    for (auto& group : *groups) {
      hooks.emplace_back(
          group.node.get(), add_capture_hook(*group.node, &group.grads));
    }
    Plan inputs_only;
    for (size_t k = 0; k < plan.wrt.size(); ++k) {
      if (plan.where[k].first == Goes::Input) {
        inputs_only.wrt.push_back(plan.wrt[k]);
        inputs_only.where.push_back(plan.where[k]);
      }
    }
    inputs_only.only_in_place = false;
    try {
      differentiate_with(
          inputs_only, grad_outputs, /*retain_graph=*/true, grads);
    } catch (...) {
      remove_capture_hooks(hooks);
      throw;
    }
    remove_capture_hooks(hooks);
    pending_plan = std::move(plan);
    pending_groups = std::move(*groups);
    release_inputs_for_weight();
    return grads;
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
          torch::autograd::edge_list group_roots;
          torch::autograd::variable_list root_grads;
          for (size_t k = 0; k < group.grads.size(); ++k) {
            if (group.grads[k].defined()) {
              group_roots.emplace_back(group.node, static_cast<uint32_t>(k));
              root_grads.push_back(std::move(group.grads[k]));
            }
          }
          if (group_roots.empty()) {
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
              group_roots,
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
      Bundle grads(inputs_require_grad.size());
      route(pending_plan, computed, grads);
    }
    release();
  }

  /// Drops everything kept for backward.
  void release() {
    release_graph();
    inputs.clear();
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
  // gradients of the inputs (which the previous stage waits for), and later
  // W, the parameter gradients (which nobody waits for). W must not redo
  // I's work. The graph says where the two separate: a node on an input's
  // path (one from which an input is reachable) with an edge off that path
  // towards parameters (Linear's addmm: its mat2 edge leads to the weight)
  // is an "intermediate". I differentiates the inputs alone, so the engine
  // skips every edge that does not lead to an input (an autograd node
  // computes only the outputs its graph task needs), and a pre-hook
  // captures the gradient each intermediate receives. W then starts the
  // engine at each intermediate with its captured gradient, asking only for
  // the parameters behind it: the edges back towards the inputs are not
  // needed, so nothing of I runs again. The split needs every parameter
  // behind exactly one intermediate; a weight used twice in one partition
  // (two intermediates) makes I do the whole backward and W nothing, which
  // is still correct.

  /// Where the gradients of one inner backward go
  /// (Note [Where parameter gradients go]). For Input, the index of the
  /// input; for Slot and Lane, the parameter's slot.
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

  /// Whether a backward has anything to do: a defined gradient for an
  /// output that requires grad.
  bool has_work(const Bundle& grad_outputs) const {
    for (size_t k = 0; k < grad_outputs.size() && k < roots.size(); ++k) {
      if (grad_outputs[k].defined() && roots[k].is_valid()) {
        return true;
      }
    }
    return false;
  }

  /// The roots with a gradient, and those gradients.
  std::pair<torch::autograd::edge_list, torch::autograd::variable_list> rooted(
      const Bundle& grad_outputs) const {
    torch::autograd::edge_list edges;
    torch::autograd::variable_list grads;
    for (size_t k = 0; k < grad_outputs.size() && k < roots.size(); ++k) {
      if (grad_outputs[k].defined() && roots[k].is_valid()) {
        edges.push_back(roots[k]);
        grads.push_back(grad_outputs[k]);
      }
    }
    return {std::move(edges), std::move(grads)};
  }

  /// The intermediates of `plan`'s parameters, or nothing when the split is
  /// not clean (Note [Splitting a backward into I and W]).
  std::optional<std::vector<WeightGroup>> weight_groups(const Plan& plan) {
    using torch::autograd::Node;
    std::unordered_set<Node*> targets;
    size_t input_entries = 0;
    for (size_t k = 0; k < plan.wrt.size(); ++k) {
      if (plan.where[k].first != Goes::Input) {
        continue;
      }
      ++input_entries;
      if (auto accumulator =
              torch::autograd::impl::try_get_grad_accumulator(plan.wrt[k])) {
        targets.insert(accumulator.get());
      }
    }
    if (targets.empty()) {
      return std::nullopt;
    }
    std::unordered_map<Node*, bool> reaches_input;
    std::function<bool(Node*)> reaches = [&](Node* node) {
      const auto found = reaches_input.find(node);
      if (found != reaches_input.end()) {
        return found->second;
      }
      bool yes = targets.count(node) != 0;
      for (const auto& edge : node->next_edges()) {
        if (edge.function && reaches(edge.function.get())) {
          yes = true;
        }
      }
      reaches_input[node] = yes;
      return yes;
    };
    // Every root must lead to an input: a root off the inputs' paths (a
    // skip made from parameters alone) would be skipped by I, and W starts
    // only at intermediates, so its gradient would be lost.
    for (const auto& root : roots) {
      if (root.is_valid() && !reaches(root.function.get())) {
        return std::nullopt;
      }
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
    if (owner.size() + input_entries != plan.wrt.size()) {
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
    leaves.clear();
    roots.clear();
  }

  /// After I, W needs only what the graph saved: the inputs kept for the
  /// recompute and the storage of every input leaf that requires grad go
  /// now, so that an input nothing saved (a popped skip, typically) is
  /// freed when I is done, as B would free it. Such a leaf is held only by
  /// this state and its AccumulateGrad (the graph's ops saw the alias
  /// InPlaceableInput made, which keeps its own reference), so emptying it
  /// changes nothing W computes.
  void release_inputs_for_weight() {
    inputs.clear();
    for (size_t k = 0; k < leaves.size(); ++k) {
      if (inputs_require_grad[k] != 0) {
        leaves[k].set_data(torch::empty({0}, leaves[k].options()));
      }
    }
  }

  /// Classifies what the inner backward reaches.
  Plan classify(bool graph_task_runs_all) const {
    const bool under_step = call->lane_gradients != nullptr;
    Plan plan;
    plan.only_in_place = graph_task_runs_all;
    for (auto& reached : reachable_leaves(roots)) {
      if (!reached.requires_grad()) {
        continue; // frozen after forward: plain training skips it too
      }
      const auto input = std::find_if(
          leaves.begin(), leaves.end(), [&](const torch::Tensor& leaf) {
            return leaf.is_same(reached);
          });
      if (input != leaves.end()) {
        plan.wrt.push_back(reached);
        plan.where.emplace_back(
            Goes::Input, static_cast<size_t>(input - leaves.begin()));
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
      const Bundle& grad_outputs,
      bool retain_graph,
      bool graph_task_runs_all,
      Bundle& grads) {
    const Plan plan = classify(graph_task_runs_all);
    if (!plan.wrt.empty()) {
      differentiate_with(plan, grad_outputs, retain_graph, grads);
    }
  }

  void differentiate_with(
      const Plan& plan,
      const Bundle& grad_outputs,
      bool retain_graph,
      Bundle& grads) {
    auto [edges, root_grads] = rooted(grad_outputs);
    torch::autograd::edge_list wanted;
    for (const auto& tensor : plan.wrt) {
      wanted.push_back(wanted_edge(tensor));
    }
    auto& engine = torch::autograd::Engine::get_default_engine();
    if (plan.only_in_place) {
      // The common case: plain backward semantics, straight into `.grad`.
      engine.execute(
          edges,
          root_grads,
          retain_graph,
          /*create_graph=*/false,
          /*accumulate_grad=*/true,
          wanted);
      for (size_t k = 0; k < plan.wrt.size(); ++k) {
        if (plan.where[k].first != Goes::Input) {
          continue;
        }
        auto& leaf = leaves[plan.where[k].second];
        if (leaf.grad().defined()) {
          grads[plan.where[k].second] = leaf.grad();
          leaf.mutable_grad().reset();
        }
      }
      return;
    }
    std::vector<torch::Tensor> computed;
    {
      HooksParkedGuard parked(plan.hooked);
      computed = engine.execute(
          edges,
          root_grads,
          retain_graph,
          /*create_graph=*/false,
          /*accumulate_grad=*/false,
          wanted);
    }
    route(plan, computed, grads);
  }

  /// Sends each computed gradient where `plan` says; `grads` holds the
  /// inputs' gradients, then the extra node inputs' (one per slot).
  void route(
      const Plan& plan,
      std::vector<torch::Tensor>& computed,
      Bundle& grads) {
    std::vector<torch::Tensor> in_place_roots;
    std::vector<torch::Tensor> in_place_grads;
    const size_t inputs_count = inputs_require_grad.size();
    for (size_t k = 0; k < plan.wrt.size(); ++k) {
      if (!computed[k].defined()) {
        continue;
      }
      const auto [goes, index] = plan.where[k];
      switch (goes) {
        case Goes::Input:
          grads[index] = std::move(computed[k]);
          break;
        case Goes::InPlace:
          in_place_roots.push_back(plan.wrt[k]);
          in_place_grads.push_back(std::move(computed[k]));
          break;
        case Goes::Slot:
          grads[inputs_count + index] = std::move(computed[k]);
          break;
        case Goes::Lane:
          call->lane_gradients->add(lane, index, computed[k]);
          break;
      }
    }
    if (!in_place_roots.empty()) {
      torch::autograd::backward(in_place_roots, in_place_grads);
    }
  }

  Bundle detached_outputs; // build_graph's outputs, until forward returns

 public:
  /// Between I and W: what W needs.
  bool weight_pending = false;
  Plan pending_plan;
  std::vector<WeightGroup> pending_groups;
};

/// The autograd Function of Note [A cell is one autograd node]: its inputs
/// are the state, the cell's input bundle and the pipe's parameters.
struct StageFunction : torch::autograd::Function<StageFunction> {
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx,
      c10::intrusive_ptr<StageState> state,
      at::TensorList inputs,
      at::TensorList extra_inputs) {
    Bundle outputs = state->forward(Bundle(inputs.begin(), inputs.end()));
    Bundle non_differentiable;
    for (size_t k = 0; k < outputs.size(); ++k) {
      if (!state->outputs_require_grad[k]) {
        non_differentiable.push_back(outputs[k]);
      }
    }
    if (!non_differentiable.empty()) {
      ctx->mark_non_differentiable(non_differentiable);
    }
    ctx->saved_data["state"] = c10::IValue::make_capsule(state);
    ctx->saved_data["extra_inputs"] = static_cast<int64_t>(extra_inputs.size());
    return outputs;
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
            grad_outputs, extra_inputs, keep_graph, runs_all);
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
