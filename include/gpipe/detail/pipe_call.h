// What the cells of one `forward()` or `step()` call share: the pipe's
// trainable parameters as slots, what each partition has shown so far in
// this call (its outputs' kinds, which require grad), and where gradients
// that lanes must not accumulate in place are summed.
//
// Why a room of its own: both pipes build a call the same way, and a cell
// reads it without knowing which pipe made it.
#pragma once

#include <gpipe/detail/observer.h>

#include <c10/util/Exception.h>
#include <torch/autograd.h>
#include <torch/types.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace gpipe::detail {

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

inline bool has_hooks(const torch::Tensor& tensor) {
  return !torch::autograd::impl::hooks(tensor).empty() ||
      torch::autograd::impl::post_acc_grad_hooks(tensor) != nullptr;
}

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

  /// Whether partition j's first layer takes a list.
  bool input_of_is_list(int64_t j) const {
    return j == 0 ? input_is_list
                  : output_is_list[static_cast<size_t>(j - 1)].load() == 1;
  }

  /// Records that partition j returned a list (or one tensor); every
  /// micro-batch must return the same kind.
  void learn_output_kind(int64_t j, bool is_list, const std::string& where) {
    const int kind = is_list ? 1 : 0;
    int expected = -1;
    auto& known = output_is_list[static_cast<size_t>(j)];
    if (!known.compare_exchange_strong(expected, kind)) {
      TORCH_CHECK(
          expected == kind,
          "gpipe: ",
          where,
          " returned ",
          is_list ? "a list of tensors" : "one tensor",
          " but ",
          expected == 1 ? "a list" : "one tensor",
          " before; a pipe needs every micro-batch to return the same kind");
    }
  }
};

/// A call over `partitions` partitions and m micro-batches, whose slots are
/// the trainable tensors of `parameters`, each once; `owner_lane(impl)` says
/// which lane alone registers a parameter (-1: several).
template <typename OwnerLane>
std::shared_ptr<PipeCall> make_pipe_call(
    const std::vector<torch::Tensor>& parameters,
    size_t partitions,
    int64_t m,
    const OwnerLane& owner_lane) {
  auto call = std::make_shared<PipeCall>();
  for (const auto& parameter : parameters) {
    const auto* key = parameter.unsafeGetTensorImpl();
    if (!parameter.requires_grad() ||
        !call->slot_of.emplace(key, call->parameters.size()).second) {
      continue;
    }
    call->parameters.push_back(parameter);
    call->owner_lane.push_back(owner_lane(key));
    call->hooked.push_back(has_hooks(parameter) ? 1 : 0);
  }
  call->split = m > 1;
  call->outputs_require_grad.assign(partitions, {});
  call->output_is_list.reset(new std::atomic<int>[partitions]);
  for (size_t j = 0; j < partitions; ++j) {
    call->output_is_list[j].store(-1);
  }
  return call;
}

} // namespace gpipe::detail
