// Where a cell's gradients go: the inputs' back to the caller, each
// parameter's into `.grad` in place, through the outer graph or into its
// lane's sum, as plain training's promise (each leaf accumulated once per
// backward, its hooks run once on the whole gradient) requires.
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
#include <gpipe/detail/pipe_call.h>

#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/functions/accumulate_grad.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/types.h>

#include <algorithm>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace gpipe::detail {

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

/// A cell's inner graph: from `leaves` (detached aliases of its inputs) to
/// `roots` (its outputs' edges). Kept from the roots' edges, not from the
/// output tensors, so that an output no later op saved (a skip tensor,
/// typically) is freed as soon as its consumer is done with it.
struct CellGraph {
  Bundle leaves;
  torch::autograd::edge_list roots;

  void clear() {
    leaves.clear();
    roots.clear();
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
};

/// Where the gradients of one inner backward go
/// (Note [Where parameter gradients go]). For Input, the index of the
/// input; for Slot and Lane, the parameter's slot.
enum class Goes { Input, InPlace, Slot, Lane };

struct GradientPlan {
  std::vector<torch::Tensor> wrt;
  std::vector<std::pair<Goes, size_t>> where;
  std::vector<torch::Tensor> hooked;
  bool only_in_place = true;

  void add(torch::Tensor tensor, Goes goes, size_t index) {
    wrt.push_back(std::move(tensor));
    where.emplace_back(goes, index);
    only_in_place =
        only_in_place && (goes == Goes::Input || goes == Goes::InPlace);
  }

  /// The entries that go to the inputs.
  GradientPlan inputs_only() const {
    GradientPlan plan;
    plan.only_in_place = false;
    for (size_t k = 0; k < wrt.size(); ++k) {
      if (where[k].first == Goes::Input) {
        plan.wrt.push_back(wrt[k]);
        plan.where.push_back(where[k]);
      }
    }
    return plan;
  }
};

/// A cell's gradients as its call and lane route them.
struct GradientRouting {
  PipeCall& call;
  size_t lane;

  /// Classifies what a backward from `graph`'s roots reaches.
  GradientPlan classify(const CellGraph& graph, bool graph_task_runs_all)
      const {
    const bool under_step = call.lane_gradients != nullptr;
    GradientPlan plan;
    plan.only_in_place = graph_task_runs_all;
    const Bundle& leaves = graph.leaves;
    for (auto& reached : reachable_leaves(graph.roots)) {
      if (!reached.requires_grad()) {
        continue; // frozen after forward: plain training skips it too
      }
      const auto input = std::find_if(
          leaves.begin(), leaves.end(), [&](const torch::Tensor& leaf) {
            return leaf.is_same(reached);
          });
      if (input != leaves.end()) {
        plan.add(
            reached, Goes::Input, static_cast<size_t>(input - leaves.begin()));
        continue;
      }
      const auto found = call.slot_of.find(reached.unsafeGetTensorImpl());
      if (found == call.slot_of.end()) {
        if (graph_task_runs_all) { // a tensor from outside the pipe
          plan.add(reached, Goes::InPlace, 0);
        }
        continue;
      }
      const size_t slot = found->second;
      const bool owned = call.owner_lane[slot] == static_cast<int64_t>(lane);
      if (call.hooked[slot]) {
        plan.hooked.push_back(reached);
      }
      if (graph_task_runs_all && owned && !call.hooked[slot]) {
        plan.add(reached, Goes::InPlace, 0);
      } else if (graph_task_runs_all && under_step) {
        plan.add(reached, Goes::Lane, slot);
      } else if (!under_step) {
        plan.add(reached, Goes::Slot, slot);
      }
    }
    return plan;
  }

  /// Runs the inner backward for `plan`; `grads` gets the inputs'
  /// gradients, then the extra node inputs' (one per slot).
  void differentiate(
      CellGraph& graph,
      const GradientPlan& plan,
      const Bundle& grad_outputs,
      bool retain_graph,
      Bundle& grads) const {
    auto [edges, root_grads] = graph.rooted(grad_outputs);
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
        auto& leaf = graph.leaves[plan.where[k].second];
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
    route(plan, computed, grads, graph.leaves.size());
  }

  /// Sends each computed gradient where `plan` says; `grads` holds the
  /// `inputs` inputs' gradients, then the extra node inputs' (one per slot).
  void route(
      const GradientPlan& plan,
      std::vector<torch::Tensor>& computed,
      Bundle& grads,
      size_t inputs) const {
    std::vector<torch::Tensor> in_place_roots;
    std::vector<torch::Tensor> in_place_grads;
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
          grads[inputs + index] = std::move(computed[k]);
          break;
        case Goes::Lane:
          call.lane_gradients->add(lane, index, computed[k]);
          break;
      }
    }
    if (!in_place_roots.empty()) {
      torch::autograd::backward(in_place_roots, in_place_grads);
    }
  }
};

} // namespace gpipe::detail
