// One cell of the pipeline: partition j applied to micro-batch i.
//
// Note [A cell is one autograd node]
// Each cell runs its partition inside a custom autograd Function
// (StageFunction) whose inputs are the cell's input and the partition's
// parameters. In forward it either keeps the partition's own graph (no
// checkpoint) or runs without a graph and keeps only its input and RNG state
// (checkpoint); in backward it recomputes if needed and differentiates that
// inner graph with torch::autograd::grad, returning gradients for the input and
// for every parameter. Why one node per cell rather than the bare layers'
// graph:
//   * checkpointing and plain cells look the same to the outer graph, so the
//     three modes differ only in what a cell keeps, never in the numbers;
//   * the backward of a cell is one place to stamp the partition and
//     micro-batch on an error and to record its timing;
//   * the parameters are inputs of the node, so the node stays in the graph
//     for the first partition (whose input need not require grad), and
//     torch::autograd::grad(loss, parameters) finds them.
// Note [Parameter gradients accumulate in place]
// Returning each cell's parameter gradients to the outer graph would make
// the engine hold a summed copy of every parameter's gradient until the last
// micro-batch of its partition is done: one extra gradient-sized buffer per
// step. So in a plain backward (the graph task computes everything) a cell
// accumulates straight into `.grad`, as plain training's AccumulateGrad does,
// and returns no parameter gradients. Only when the graph task asks for
// particular inputs (torch::autograd::grad, backward(inputs=...)) does it
// return them through the graph instead, leaving `.grad` untouched.
// The inner backward runs reentrantly on the engine thread that runs the
// cell, so no cell ever waits on another thread and partitions sharing a
// device cannot deadlock.
#pragma once

#include <gpipe/detail/rng.h>
#include <gpipe/timeline.h>

#include <ATen/core/ivalue.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/types.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

namespace gpipe::detail {

/// Where a cell sits in the pipe, for error messages and timelines.
struct CellIndex {
  int64_t microbatch = 0;
  int64_t partition = 0;
};

/// Calls `fn`, prefixing any c10::Error with which cell failed and in what.
template <typename Fn>
decltype(auto) with_cell_context(
    const CellIndex& cell,
    const char* phase,
    Fn&& fn) {
  try {
    return std::forward<Fn>(fn)();
  } catch (const c10::Error& e) {
    TORCH_CHECK(
        false,
        "gpipe: partition ",
        cell.partition,
        " failed on micro-batch ",
        cell.microbatch,
        " in ",
        phase,
        ": ",
        e.what_without_backtrace());
  } catch (const std::exception& e) {
    TORCH_CHECK(
        false,
        "gpipe: partition ",
        cell.partition,
        " failed on micro-batch ",
        cell.microbatch,
        " in ",
        phase,
        ": ",
        e.what());
  }
}

/// What one cell keeps between its forward and its backward.
struct StageState : torch::CustomClassHolder {
  StageState(
      torch::nn::Sequential partition_,
      CellIndex cell_,
      torch::Device device_,
      bool checkpointed_,
      std::shared_ptr<Timeline> timeline_)
      : partition(std::move(partition_)),
        cell(cell_),
        device(device_),
        checkpointed(checkpointed_),
        timeline(std::move(timeline_)) {}

  torch::nn::Sequential partition;
  CellIndex cell;
  torch::Device device;
  bool checkpointed;
  std::shared_ptr<Timeline> timeline; // null: record nothing
  /// The partition's parameters that require grad, in the order they were
  /// passed to the Function (their gradients come back in that order).
  std::vector<torch::Tensor> parameters;

  // Checkpointed: the input and the RNG state to replay. Not checkpointed:
  // the inner graph, from `leaf` (a detached alias of the input) to `output`.
  torch::Tensor input;
  bool input_requires_grad = false;
  std::optional<RngSnapshot> rng;
  torch::Tensor leaf;
  torch::Tensor output;

  /// Runs the partition on a leaf alias of `x`, with a graph from the leaf.
  void build_graph(const torch::Tensor& x) {
    torch::AutoGradMode enable_grad(true);
    leaf = x.detach().requires_grad_(input_requires_grad);
    output = partition->forward(leaf);
  }

  TimelineScope scope(Phase phase) const {
    return TimelineScope(
        timeline.get(), cell.partition, cell.microbatch, phase, device);
  }

  torch::Tensor forward(const torch::Tensor& x) {
    TimelineScope recording = scope(Phase::Forward);
    input_requires_grad = x.requires_grad();
    if (checkpointed) {
      rng = RngSnapshot::capture(device);
      input = x.detach();
      torch::NoGradGuard no_grad;
      return partition->forward(input);
    }
    build_graph(x);
    return output.detach();
  }

  /// Gradients for [input, parameters...]; undefined where there is none.
  /// With `accumulate_parameters` the parameters' gradients go into their
  /// `.grad` instead (Note [Parameter gradients accumulate in place]).
  std::vector<torch::Tensor> backward(
      const torch::Tensor& grad_output,
      bool keep_graph,
      bool accumulate_parameters) {
    if (checkpointed) {
      TimelineScope recording = scope(Phase::Recompute);
      RngReplayGuard replay(*rng);
      build_graph(input);
    }
    TimelineScope recording = scope(Phase::Backward);
    std::vector<torch::Tensor> grads(1 + parameters.size());
    if (grad_output.defined() && output.requires_grad()) {
      std::vector<torch::Tensor> wrt;
      wrt.reserve(1 + parameters.size());
      if (input_requires_grad) {
        wrt.push_back(leaf);
      }
      wrt.insert(wrt.end(), parameters.begin(), parameters.end());
      const bool retain_graph = keep_graph && !checkpointed;
      if (accumulate_parameters) {
        torch::autograd::backward(
            {output}, {grad_output}, retain_graph, /*create_graph=*/false, wrt);
        if (input_requires_grad) {
          grads[0] = leaf.grad();
          leaf.mutable_grad().reset();
        }
      } else {
        auto computed = torch::autograd::grad(
            {output},
            wrt,
            {grad_output},
            retain_graph,
            /*create_graph=*/false,
            /*allow_unused=*/true);
        std::move(
            computed.begin(),
            computed.end(),
            grads.begin() + (input_requires_grad ? 0 : 1));
      }
    }
    if (checkpointed || !keep_graph) {
      leaf.reset();
      output.reset();
    }
    if (!keep_graph) {
      input.reset();
      rng.reset();
    }
    return grads;
  }

  /// Drops everything kept for backward.
  void release() {
    leaf.reset();
    output.reset();
    input.reset();
    rng.reset();
  }
};

/// The autograd Function of Note [A cell is one autograd node].
struct StageFunction : torch::autograd::Function<StageFunction> {
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx,
      c10::intrusive_ptr<StageState> state,
      const torch::Tensor& x,
      at::TensorList /*parameters: inputs so their gradients flow out*/) {
    ctx->saved_data["state"] = c10::IValue::make_capsule(state);
    return {state->forward(x)};
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx,
      torch::autograd::variable_list grad_outputs) {
    auto state = c10::static_intrusive_pointer_cast<StageState>(
        ctx->saved_data["state"].toCapsule());
    TORCH_CHECK(
        !torch::GradMode::is_enabled(),
        "gpipe: double backward through a pipe is not supported "
        "(call backward without create_graph=true)");
    const bool keep_graph =
        torch::autograd::get_current_graph_task_keep_graph();
    // An empty exec_info means the graph task runs everything: a plain
    // backward that accumulates into .grad.
    const auto* exec_info = torch::autograd::get_current_graph_task_exec_info();
    const bool accumulate_parameters =
        exec_info == nullptr || exec_info->empty();
    auto grads = with_cell_context(state->cell, "backward", [&] {
      try {
        return state->backward(
            grad_outputs[0], keep_graph, accumulate_parameters);
      } catch (...) {
        // A failed backward must not keep the recomputed graph: it would
        // outlive the step (and, with a hook that threw, never be freed).
        state->release();
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
