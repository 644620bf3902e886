// What `step()` does to each cell, for any host of stages: a pipe in one
// process (pipe.h) or one rank of a pipe across processes (distributed/).
//
// The host (stage_host.h) owns the partitions and says where tensors go;
// the runner keeps each cell's StageState from its F to its B (or W),
// applies the loss on the last stage and hands the first stage's input
// gradients back to the caller's graph. A host in one process runs every
// stage, a rank only its own.
#pragma once

#include <gpipe/detail/bundle.h>
#include <gpipe/detail/cell_context.h>
#include <gpipe/detail/executor.h>
#include <gpipe/detail/stage.h>
#include <gpipe/detail/stage_host.h>
#include <gpipe/options.h>

#include <c10/util/Exception.h>
#include <torch/autograd.h>
#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

namespace gpipe::detail {

/// (output of a micro-batch, its target) -> scalar loss.
using LossFunction =
    std::function<torch::Tensor(const torch::Tensor&, const torch::Tensor&)>;

/// Told when a runner's last weight-gradient op of a step (its last B or W)
/// runs its cell's backward: from then on, the parameter gradients that
/// backward accumulates into `.grad` are final, and all are once the op is
/// over.
class LastWeightsWatch {
 public:
  virtual ~LastWeightsWatch() = default;
  virtual void last_begins() = 0;
  /// Once the op is over; `completed`: false when it threw (then it must
  /// not throw itself).
  virtual void last_ended(bool completed) = 0;
};

/// The ops of a lane that compute weight gradients: B and W (not I).
inline int64_t weight_ops_of(const std::vector<Action>& lane) {
  int64_t ops = 0;
  for (const Action& action : lane) {
    ops += action.op == Op::B || action.op == Op::W ? 1 : 0;
  }
  return ops;
}

/// `step()`'s stages: the host calls each cell's StageState itself, so a
/// cell's backward can be split into I and W (Note [Splitting a backward
/// into I and W]) and no graph spans two cells: activations cross lanes
/// detached, gradients travel back as tensors.
class StepRunner final : public StageRunner {
 public:
  /// `inputs` and `targets` per micro-batch, read only on the first and
  /// the last stage; `batch` is the batch that Reduction::Mean divides by;
  /// `checkpoint` is Checkpoint::Never outside training.
  StepRunner(
      StageHost& pipe,
      Checkpoint checkpoint,
      Reduction reduction,
      int64_t microbatches,
      const std::vector<Bundle>& inputs,
      std::vector<torch::Tensor> targets,
      const LossFunction& loss_fn,
      double batch,
      std::shared_ptr<PipeCall> call,
      bool needs_graph)
      : loss_values(static_cast<size_t>(microbatches)),
        pipe_(pipe),
        checkpoint_(checkpoint),
        reduction_(reduction),
        inputs_(inputs),
        targets_(std::move(targets)),
        loss_fn_(loss_fn),
        batch_(batch),
        call_(std::move(call)),
        needs_graph_(needs_graph),
        m_(microbatches),
        n_(pipe.stage_count()),
        states_(
            static_cast<size_t>(n_),
            std::vector<c10::intrusive_ptr<StageState>>(
                static_cast<size_t>(m_))),
        input_counts_(
            static_cast<size_t>(n_),
            std::vector<size_t>(static_cast<size_t>(m_))),
        first_inputs_(static_cast<size_t>(m_)),
        last_outputs_(static_cast<size_t>(m_)),
        losses_(static_cast<size_t>(m_)) {}

  Bundle input(int64_t i) override {
    auto& x = first_inputs_[static_cast<size_t>(i)];
    x = pipe_.receive_all(inputs_[static_cast<size_t>(i)], i, 0);
    return x;
  }

  Bundle move(Bundle x, int64_t s, int64_t i, Direction direction) override {
    if (direction == Direction::Backward) {
      torch::NoGradGuard no_grad;
      return pipe_.receive_all(x, i, s);
    }
    Bundle moved;
    {
      torch::NoGradGuard no_grad;
      moved = pipe_.receive_all(x, i, s);
    }
    // A fresh leaf per cell: each cell's graph is differentiated alone.
    for (size_t k = 0; k < moved.size(); ++k) {
      moved[k] = moved[k].detach().requires_grad_(x[k].requires_grad());
    }
    return moved;
  }

  Bundle forward(int64_t s, int64_t i, Bundle x) override {
    const auto ss = static_cast<size_t>(s);
    const auto ii = static_cast<size_t>(i);
    input_counts_[ss][ii] = x.size();
    Bundle out;
    if (!needs_graph_) {
      out = pipe_.run_without_graph(i, s, x, call_);
    } else {
      auto state =
          pipe_.make_state(i, s, checkpointed(checkpoint_, i, m_), call_);
      out = with_cell_context(
          {i, s}, "forward", [&] { return state->forward(x); });
      pipe_.check_batch_kept(i, s, x, out, *call_);
      for (size_t k = 0; k < out.size(); ++k) {
        if (state->outputs_require_grad[k]) {
          out[k].requires_grad_(true);
        }
      }
      states_[ss][ii] = std::move(state);
    }
    if (s < n_ - 1) {
      return out;
    }
    TORCH_CHECK(
        out.size() == 1 && call_->output_is_list[ss].load() != 1,
        "gpipe: step applies loss_fn to the last layer's output, which "
        "must be one tensor, but it returned a list of ",
        out.size(),
        " (call forward<std::vector<torch::Tensor>> and backward instead)");
    const torch::Tensor& output = out.front();
    torch::Tensor loss = with_cell_context({i, s}, "loss_fn", [&] {
      return loss_fn_(output, pipe_.receive(targets_[ii], i, s));
    });
    TORCH_CHECK(
        loss.numel() == 1,
        "gpipe: loss_fn must return a scalar (micro-batch ",
        i,
        ", loss shape: ",
        loss.sizes(),
        ")");
    TORCH_CHECK(
        loss.requires_grad(),
        "gpipe: the loss of micro-batch ",
        i,
        " does not require grad, so step has nothing to differentiate ",
        "(plain training fails the same way: element 0 of tensors does ",
        "not require grad and does not have a grad_fn); check that ",
        "loss_fn and the last layers do not detach their output");
    if (reduction_ == Reduction::Mean) {
      loss = loss * (static_cast<double>(output.size(0)) / batch_);
    }
    losses_[ii] = loss.reshape({});
    loss_values[ii] = losses_[ii].detach();
    last_outputs_[ii] = output;
    return Bundle(); // nothing travels on
  }

  Bundle backward(int64_t s, int64_t i, Bundle grad_outputs, bool input_only)
      override {
    const auto ss = static_cast<size_t>(s);
    const auto ii = static_cast<size_t>(i);
    if (s == n_ - 1) {
      with_cell_context({i, s}, "backward", [&] {
        torch::autograd::backward({std::exchange(losses_[ii], {})});
      });
      auto out = std::exchange(last_outputs_[ii], {});
      grad_outputs = {out.requires_grad() ? out.grad() : torch::Tensor()};
    }
    auto state = states_[ss][ii];
    if (!input_only) {
      states_[ss][ii].reset(); // B frees the cell's graph when done
    }
    Bundle grad_inputs(input_counts_[ss][ii]);
    // The first stage's inputs' backward below may reach a pipe parameter
    // too (an input computed from one): there the watch waits for it.
    WatchedBackward watched(
        !input_only && is_last_weight_op() ? watch_ : nullptr,
        /*arm=*/s > 0 || !any_requires_grad(first_inputs_[ii]));
    if (state) {
      grad_inputs = with_cell_context(
          {i, s}, input_only ? "backward_input" : "backward", [&] {
            try {
              return input_only ? state->backward_input(grad_outputs)
                                : state->backward(
                                      grad_outputs,
                                      /*extra_inputs=*/0,
                                      /*keep_graph=*/false,
                                      /*graph_task_runs_all=*/true);
            } catch (...) {
              state->release();
              throw;
            }
          });
    }
    if (s > 0) {
      watched.completed();
      return grad_inputs;
    }
    auto x = std::exchange(first_inputs_[ii], {});
    std::vector<torch::Tensor> roots;
    std::vector<torch::Tensor> grads;
    for (size_t k = 0; k < x.size() && k < grad_inputs.size(); ++k) {
      if (grad_inputs[k].defined() && x[k].requires_grad()) {
        roots.push_back(x[k]);
        grads.push_back(grad_inputs[k]);
      }
    }
    if (!roots.empty()) {
      torch::autograd::backward(roots, grads);
    }
    watched.completed();
    return Bundle();
  }

  void backward_weight(int64_t s, int64_t i) override {
    auto state = std::exchange(
        states_[static_cast<size_t>(s)][static_cast<size_t>(i)], {});
    WatchedBackward watched(
        is_last_weight_op() ? watch_ : nullptr, /*arm=*/true);
    if (state) {
      with_cell_context({i, s}, "backward_weight", [&] {
        try {
          state->backward_weight();
        } catch (...) {
          state->release();
          throw;
        }
      });
    }
    watched.completed();
  }

  /// Tells `watch` (null: no one) of the last of `weight_ops` B and W ops
  /// this runner will run in the step.
  void watch_last_weights(int64_t weight_ops, LastWeightsWatch* watch) {
    weight_ops_left_ = weight_ops;
    watch_ = watch;
  }

  /// The batch's loss: the micro-batches' losses added in order.
  torch::Tensor total_loss() const {
    torch::Tensor total = loss_values.front();
    for (size_t i = 1; i < loss_values.size(); ++i) {
      total = total + loss_values[i];
    }
    return total;
  }

  std::vector<torch::Tensor> loss_values;

 private:
  StageHost& pipe_;
  Checkpoint checkpoint_;
  Reduction reduction_;
  const std::vector<Bundle>& inputs_;
  std::vector<torch::Tensor> targets_;
  const LossFunction& loss_fn_;
  double batch_;
  std::shared_ptr<PipeCall> call_;
  bool needs_graph_;
  int64_t m_;
  int64_t n_;
  // Per [stage][micro-batch]: the cell, from its F to its B (or W).
  std::vector<std::vector<c10::intrusive_ptr<StageState>>> states_;
  std::vector<std::vector<size_t>> input_counts_;
  std::vector<Bundle> first_inputs_; // for the inputs' gradients
  std::vector<torch::Tensor> last_outputs_; // the losses' leaves
  std::vector<torch::Tensor> losses_;
  LastWeightsWatch* watch_ = nullptr;
  int64_t weight_ops_left_ = -1; // -1: not counted

  static bool any_requires_grad(const Bundle& tensors) {
    for (const auto& tensor : tensors) {
      if (tensor.defined() && tensor.requires_grad()) {
        return true;
      }
    }
    return false;
  }

  /// Counts a B or W op; whether it is the last.
  bool is_last_weight_op() {
    return weight_ops_left_ > 0 && --weight_ops_left_ == 0;
  }

  /// Tells a watch that the last weight-gradient backward begins, and how
  /// it ended.
  class WatchedBackward {
   public:
    /// `arm`: whether the watch may see gradients as they are accumulated
    /// (else it sees them when the op completes).
    WatchedBackward(LastWeightsWatch* watch, bool arm) : watch_(watch) {
      if (watch_ != nullptr && arm) {
        watch_->last_begins();
      }
    }
    ~WatchedBackward() {
      if (watch_ != nullptr) {
        watch_->last_ended(/*completed=*/false);
      }
    }
    WatchedBackward(const WatchedBackward&) = delete;
    WatchedBackward& operator=(const WatchedBackward&) = delete;
    /// May throw (the watch may start messages), so not in the destructor.
    void completed() {
      if (auto* watch = std::exchange(watch_, nullptr)) {
        watch->last_ended(/*completed=*/true);
      }
    }

   private:
    LastWeightsWatch* watch_;
  };
};

} // namespace gpipe::detail
