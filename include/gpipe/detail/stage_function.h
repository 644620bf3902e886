// One cell as one node of the caller's autograd graph, for `forward()`.
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
#pragma once

#include <gpipe/detail/cell_context.h>
#include <gpipe/detail/stage.h>

#include <ATen/core/ivalue.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/types.h>

#include <cstdint>

namespace gpipe::detail {

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
