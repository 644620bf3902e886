// One cell of the pipeline, partition j applied to micro-batch i, from its
// forward to its backward: StageState composes the pieces under cell/
// (recompute, gradient routing, the I/W split, inputs it may overwrite) and
// runs the partition's layers with the cell's skips. forward() wraps it in
// one autograd node per cell (stage_function.h); step() calls it directly
// (step_runner.h).
#pragma once

#include <gpipe/detail/bundle.h>
#include <gpipe/detail/cell/gradients.h>
#include <gpipe/detail/cell/inputs.h>
#include <gpipe/detail/cell/layers.h>
#include <gpipe/detail/cell/recompute.h>
#include <gpipe/detail/cell/split.h>
#include <gpipe/detail/cell_context.h>
#include <gpipe/detail/observer.h>
#include <gpipe/detail/pipe_call.h>
#include <gpipe/detail/skip_layout.h>
#include <gpipe/recompute.h>
#include <gpipe/timeline.h>

#include <ATen/core/ivalue.h>
#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace gpipe::detail {

/// What one cell keeps between its forward and its backward.
///
/// A cell's inputs are a bundle (bundle.h): the tensors the previous
/// partition returned, then the skips it pops that were stashed in earlier
/// partitions. Its outputs are what its last layer returned, then the skips
/// it stashes for later partitions (skip_layout.h).
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

  // Checkpointed: the inputs and what forward recorded, for the recompute.
  // Not checkpointed: the inner graph.
  Bundle inputs;
  ForwardRecord record;
  CellGraph graph;

  /// Set by each run of the partition: whether it wrote into an input.
  bool wrote_input = false;

  /// Between I and W: what W needs.
  bool weight_pending = false;
  GradientPlan pending_plan;
  std::vector<WeightGroup> pending_groups;

  /// Every micro-batch of a partition returns as many tensors.
  void check_output_count(const std::vector<char>& known, size_t count) const {
    TORCH_CHECK(
        known.empty() || known.size() == count,
        "gpipe: ",
        where_is(cell),
        " returned ",
        count,
        " tensors, but ",
        known.size(),
        " on an earlier micro-batch; a pipe gathers the micro-batches' ",
        "outputs tensor by tensor, so every micro-batch returns as many");
  }

  /// The partition's layers applied to `fed` (cell/layers.h).
  Bundle run_partition(const Bundle& fed) {
    return run_layers(*partition, fed, input_is_list, skips, cell, *call);
  }

  /// Runs the cell; returns its outputs, detached.
  Bundle forward(const Bundle& x) {
    TimelineScope recording = scope(Phase::Forward);
    inputs_require_grad.clear();
    for (const auto& t : x) {
      inputs_require_grad.push_back(t.requires_grad() ? 1 : 0);
    }
    if (checkpointed) {
      record.state.emplace(); // before the observer joins the thread
    }
    CellObserver observer;
    observer.device = device;
    observer.lock_draws = call->lock_random_draws;
    observer.batch_norm = call->batch_norm;
    if (checkpointed) {
      observer.mode = CellObserver::Draws::Record;
      observer.draws = &record.draws;
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
      Bundle out = build_graph(x);
      check_output_count(known, outputs_require_grad.size());
      known = outputs_require_grad;
      return out;
    }
    const int mutates = traits->mutates_input.load();
    inputs = inputs_kept_for_recompute(x, mutates);
    Bundle out;
    if (known.empty()) {
      // The first cell of the partition in this call learns which outputs
      // require grad (a layer may detach one), with a graph it drops.
      out = build_graph(x);
      known = outputs_require_grad;
      graph.clear();
    } else {
      torch::NoGradGuard no_grad;
      Bundle fed;
      for (const auto& t : x) {
        fed.push_back(alias_of_input(t, cell.partition));
      }
      const InputVersions versions(fed);
      for (auto& t : run_partition(fed)) {
        out.push_back(t.detach());
      }
      wrote_input = versions.changed(fed);
      check_output_count(known, out.size());
    }
    outputs_require_grad = known;
    learn_input_writes(*traits, mutates, wrote_input, cell);
    return out;
  }

  void recompute() {
    TimelineScope recording = scope(Phase::Recompute);
    const auto known = outputs_require_grad;
    {
      ReplayingForward replaying(
          record, *partition, device, call->lock_random_draws);
      build_graph(inputs);
      TORCH_CHECK(
          replaying.finished_replay(),
          "gpipe: partition ",
          cell.partition,
          " drew random numbers in its recompute of micro-batch ",
          cell.microbatch,
          " in another order than in its forward (",
          record.draws.before.size(),
          " random operators in forward); randomness that depends on the ",
          "data cannot be checkpointed: use Checkpoint::Never");
    }
    TORCH_CHECK(
        graph.roots.size() == known.size(),
        "gpipe: ",
        where_is(cell),
        " returned ",
        graph.roots.size(),
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
    if (graph.has_work(grad_outputs)) {
      const bool retain_graph = keep_graph && !checkpointed;
      const GradientPlan plan = routing().classify(graph, graph_task_runs_all);
      if (!plan.wrt.empty()) {
        routing().differentiate(graph, plan, grad_outputs, retain_graph, grads);
      }
    }
    if (checkpointed || !keep_graph) {
      graph.clear();
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
    if (!graph.has_work(grad_outputs)) {
      return grads;
    }
    GradientPlan plan = routing().classify(graph, /*graph_task_runs_all=*/true);
    if (plan.wrt.empty()) {
      return grads;
    }
    auto groups = weight_groups(plan, graph.roots);
    if (!groups) {
      // No clean split (a weight used twice, or no input to differentiate):
      // I does all of it, W nothing.
      routing().differentiate(
          graph, plan, grad_outputs, /*retain_graph=*/false, grads);
      graph.clear();
      return grads;
    }
    {
      CapturingWeightGroups capturing(*groups);
      routing().differentiate(
          graph,
          plan.inputs_only(),
          grad_outputs,
          /*retain_graph=*/true,
          grads);
    }
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
      auto computed = weight_gradients(pending_plan, pending_groups);
      Bundle grads(inputs_require_grad.size());
      routing().route(pending_plan, computed, grads, grads.size());
    }
    release();
  }

  /// Drops everything kept for backward.
  void release() {
    graph.clear();
    inputs.clear();
    record.clear();
    pending_groups.clear();
    pending_plan = GradientPlan();
    released = true;
  }

  /// Drops what a recompute built, keeping what a retry needs.
  void drop_recomputed_graph() {
    if (checkpointed) {
      graph.clear();
    }
  }

 private:
  TimelineScope scope(Phase phase) const {
    return TimelineScope(
        timeline.get(), cell.partition, cell.microbatch, phase, device);
  }

  GradientRouting routing() const {
    return {*call, lane};
  }

  /// Runs the partition on leaf aliases of `x`, with a graph from the
  /// leaves; returns its outputs, detached.
  Bundle build_graph(const Bundle& x) {
    torch::AutoGradMode enable_grad(true);
    graph.leaves.clear();
    Bundle fed;
    for (size_t k = 0; k < x.size(); ++k) {
      const bool wants_grad = inputs_require_grad[k] != 0;
      graph.leaves.push_back(
          alias_of_input(x[k], cell.partition).requires_grad_(wants_grad));
      fed.push_back(
          wants_grad ? InPlaceableInput::apply(graph.leaves.back())[0]
                     : graph.leaves.back());
    }
    const InputVersions versions(graph.leaves);
    const Bundle outputs = run_partition(fed);
    wrote_input = versions.changed(graph.leaves);
    graph.roots.clear();
    outputs_require_grad.clear();
    Bundle detached;
    for (const auto& output : outputs) {
      graph.roots.push_back(root_edge(output));
      outputs_require_grad.push_back(graph.roots.back().is_valid() ? 1 : 0);
      detached.push_back(output.detach());
    }
    return detached;
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

  /// After I, W needs only what the graph saved: the inputs kept for the
  /// recompute and the storage of every input leaf that requires grad go
  /// now, so that an input nothing saved (a popped skip, typically) is
  /// freed when I is done, as B would free it. Such a leaf is held only by
  /// this state and its AccumulateGrad (the graph's ops saw the alias
  /// InPlaceableInput made, which keeps its own reference), so emptying it
  /// changes nothing W computes.
  void release_inputs_for_weight() {
    inputs.clear();
    for (size_t k = 0; k < graph.leaves.size(); ++k) {
      if (inputs_require_grad[k] != 0) {
        auto& leaf = graph.leaves[k];
        leaf.set_data(torch::empty({0}, leaf.options()));
      }
    }
  }
};

} // namespace gpipe::detail
