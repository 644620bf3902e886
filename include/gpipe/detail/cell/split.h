// How a backward splits into I and W for the zero-bubble schedules: where
// the graph separates the inputs' gradients from the parameters', how I
// captures what W will start from, and how W runs without redoing I.
//
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
#pragma once

#include <gpipe/detail/cell/gradients.h>

#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/types.h>

#include <algorithm>
#include <functional>
#include <memory>
#include <optional>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace gpipe::detail {

/// One intermediate of Note [Splitting a backward into I and W].
struct WeightGroup {
  std::shared_ptr<torch::autograd::Node> node;
  torch::autograd::variable_list grads; // captured during I
  std::vector<size_t> wrt; // indices into GradientPlan::wrt
};

/// The intermediates of `plan`'s parameters, or nothing when the split is
/// not clean (Note [Splitting a backward into I and W]).
inline std::optional<std::vector<WeightGroup>> weight_groups(
    const GradientPlan& plan,
    const torch::autograd::edge_list& roots) {
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

/// While it lives, each group's node copies the gradients it receives
/// into the group (during I).
class CapturingWeightGroups {
 public:
  explicit CapturingWeightGroups(std::vector<WeightGroup>& groups) {
    for (auto& group : groups) {
      auto hook = std::make_unique<Capture>(&group.grads);
      hooks_.emplace_back(group.node.get(), hook.get());
      group.node->add_pre_hook(std::move(hook));
    }
  }

  ~CapturingWeightGroups() {
    for (const auto& [node, handle] : hooks_) {
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

  CapturingWeightGroups(const CapturingWeightGroups&) = delete;
  CapturingWeightGroups& operator=(const CapturingWeightGroups&) = delete;

 private:
  struct Capture : torch::autograd::FunctionPreHook {
    explicit Capture(torch::autograd::variable_list* into_) : into(into_) {}
    torch::autograd::variable_list operator()(
        const torch::autograd::variable_list& grads) override {
      *into = grads;
      return grads;
    }
    torch::autograd::variable_list* into;
  };

  std::vector<std::pair<torch::autograd::Node*, const Capture*>> hooks_;
};

/// W: the gradients of `plan`'s parameters (indexed like plan.wrt), each
/// from its group's captured gradients, asking the engine for nothing else.
inline std::vector<torch::Tensor> weight_gradients(
    const GradientPlan& plan,
    std::vector<WeightGroup>& groups) {
  std::vector<torch::Tensor> computed(plan.wrt.size());
  HooksParkedGuard parked(plan.hooked);
  auto& engine = torch::autograd::Engine::get_default_engine();
  for (auto& group : groups) {
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
          torch::autograd::impl::try_get_grad_accumulator(plan.wrt[k]), 0);
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
  return computed;
}

} // namespace gpipe::detail
