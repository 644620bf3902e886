// Ties declared between parameters of one process (GPipeOptions::tie):
// separate tensors, one per partition's device, that train as one tensor.
//
// Note [Declared ties train as one tensor]
// A module shared by partitions on different devices cannot be placed: a
// tensor lives on one device. So each partition holds its own copy (a head
// with a weight of its own, for example) and the copies are declared tied.
// The pipe then
//   * sets every copy to the first one's value when it is built;
//   * sums gradients in one order for every copy: a hook on each copy takes
//     that copy's whole gradient of a backward (the pipe runs hooks once
//     per backward, Note [Where parameter gradients go]) and lets zeros
//     through in its place; when the backward ends (the engine's final
//     callback) the copies' gradients are summed in copy order and the one
//     sum is added to every copy's `.grad`. So every copy's `.grad` is the
//     sum over all copies, as the one shared tensor's would be, whether the
//     backward is the user's (after `forward()`) or the step's, and it is
//     bit-identical on every copy under gradient accumulation too (adding
//     each copy's own gradient first would sum in a different order per
//     copy, and the copies would drift in the last bit);
//     (A backward that asks for particular tensors, `autograd::grad` or
//     `backward(inputs=...)`, leaves ties alone, as it leaves `.grad`.)
//   * checks before each call that the copies are still equal: every
//     element at the first call, then at most 65,536 from an offset that
//     moves each call. An optimizer that skipped a copy, or a copy changed
//     behind the pipe's back, is a `gpipe:` error, not silent drift.
// Every copy takes the identical optimizer step because it has the identical
// value, gradient and state. Copies on devices of different types are
// refused: an optimizer's arithmetic may differ in the last bit between a
// CPU and a GPU, and the copies would drift apart.
#pragma once

#include <c10/util/Exception.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/nn/module.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

namespace gpipe::detail {

class DeclaredTies {
 public:
  /// No ties.
  DeclaredTies() = default;

  /// Resolves each tie's names among `module`'s named parameters, sets the
  /// copies to the first's value and hooks them; every bad declaration is a
  /// `gpipe:` error.
  DeclaredTies(
      const torch::nn::Module& module,
      const std::vector<std::vector<std::string>>& declared)
      : state_(std::make_shared<State>()) {
    const auto named = module.named_parameters();
    std::unordered_set<std::string> seen_names;
    std::unordered_set<const c10::TensorImpl*> seen_tensors;
    for (const auto& names : declared) {
      TORCH_CHECK(
          names.size() >= 2,
          "gpipe: a tie names at least two parameters, got ",
          names.size(),
          names.empty() ? std::string() : " (" + names.front() + ")");
      Tie tie;
      tie.names = names;
      for (const auto& name : names) {
        const auto* found = named.find(name);
        TORCH_CHECK(
            found != nullptr,
            "gpipe: tie(): \"",
            name,
            "\" is not a parameter of the Sequential (its names are as "
            "named_parameters() lists them, e.g. \"0.weight\")");
        TORCH_CHECK(
            seen_names.insert(name).second,
            "gpipe: tie(): \"",
            name,
            "\" is named in a tie twice; name each parameter once");
        TORCH_CHECK(
            seen_tensors.insert(found->unsafeGetTensorImpl()).second,
            "gpipe: tie(): \"",
            name,
            "\" is the same tensor as another name in a tie: a module "
            "registered twice is already one tensor and needs no tie");
        check_like(tie, *found, name);
        tie.copies.push_back(*found);
      }
      state_->ties.push_back(std::move(tie));
    }
    state_->taken.resize(state_->ties.size());
    torch::NoGradGuard no_grad;
    for (size_t t = 0; t < state_->ties.size(); ++t) {
      auto& tie = state_->ties[t];
      state_->taken[t].resize(tie.copies.size());
      for (size_t c = 0; c < tie.copies.size(); ++c) {
        if (c > 0) {
          tie.copies[c].copy_(tie.copies[0]);
        }
        if (!tie.copies[c].requires_grad()) {
          continue; // frozen: nothing to sum
        }
        std::weak_ptr<State> weak = state_;
        tie.hooks.push_back(tie.copies[c].register_hook(
            [weak, t, c](const torch::Tensor& grad) -> torch::Tensor {
              auto state = weak.lock();
              return state ? state->take(t, c, grad) : grad;
            }));
      }
    }
  }

  DeclaredTies(const DeclaredTies&) = delete;
  DeclaredTies& operator=(const DeclaredTies&) = delete;
  DeclaredTies(DeclaredTies&&) = default;
  DeclaredTies& operator=(DeclaredTies&&) = default;

  ~DeclaredTies() {
    if (!state_) {
      return;
    }
    for (auto& tie : state_->ties) {
      for (size_t c = 0; c < tie.hooks.size(); ++c) {
        tie.copies[c].remove_hook(tie.hooks[c]);
      }
    }
  }

  bool empty() const {
    return !state_ || state_->ties.empty();
  }

  /// Fails with the tie's names where two copies differ (Note [Declared
  /// ties train as one tensor]); reads at most kWatched elements per copy
  /// after the first call.
  void check_equal() const {
    if (empty()) {
      return;
    }
    torch::NoGradGuard no_grad;
    const int64_t call = calls_++;
    for (const auto& tie : state_->ties) {
      const auto first = tie.copies[0].reshape({-1});
      const int64_t numel = first.numel();
      const int64_t count = call == 0 ? numel : std::min(numel, kWatched);
      const int64_t offset =
          numel <= count ? 0 : (call * kWatched) % (numel - count + 1);
      const auto expected = first.narrow(0, offset, count);
      for (size_t c = 1; c < tie.copies.size(); ++c) {
        const auto seen = tie.copies[c].reshape({-1}).narrow(0, offset, count);
        TORCH_CHECK(
            torch::equal(expected, seen.to(expected.device())),
            "gpipe: the copies of a declared tie differ: \"",
            tie.names[0],
            "\" (",
            tie.copies[0].device(),
            ") and \"",
            tie.names[c],
            "\" (",
            tie.copies[c].device(),
            "); every copy must take the same optimizer step (give the "
            "optimizer every parameter of the pipe) and nothing may change "
            "one copy alone");
      }
    }
  }

  /// `parameters` without the second and later copies of each tie: what a
  /// gradient norm counts.
  std::vector<torch::Tensor> counted(
      const std::vector<torch::Tensor>& parameters) const {
    if (empty()) {
      return parameters;
    }
    std::unordered_set<const c10::TensorImpl*> later;
    for (const auto& tie : state_->ties) {
      for (size_t c = 1; c < tie.copies.size(); ++c) {
        later.insert(tie.copies[c].unsafeGetTensorImpl());
      }
    }
    std::vector<torch::Tensor> counted;
    for (const auto& parameter : parameters) {
      if (later.count(parameter.unsafeGetTensorImpl()) == 0) {
        counted.push_back(parameter);
      }
    }
    return counted;
  }

 private:
  static constexpr int64_t kWatched = 65536;

  struct Tie {
    std::vector<std::string> names;
    std::vector<torch::Tensor> copies;
    std::vector<unsigned> hooks;
  };

  struct State : std::enable_shared_from_this<State> {
    std::vector<Tie> ties;
    std::mutex mutex;
    /// Per tie, per copy: its gradient in this backward, not yet summed.
    std::vector<std::vector<torch::Tensor>> taken;
    bool settle_queued = false;

    /// Keeps copy c's gradient for the sum and returns what its `.grad`
    /// accumulates now: zeros.
    torch::Tensor take(size_t t, size_t c, const torch::Tensor& grad) {
      // A graph task that asks for particular tensors (autograd::grad,
      // backward(inputs=...)) leaves the ties alone, as the pipe leaves
      // `.grad` alone there (Note [Where parameter gradients go]).
      const auto* exec_info =
          torch::autograd::get_current_graph_task_exec_info();
      if (exec_info != nullptr && !exec_info->empty()) {
        return grad;
      }
      torch::NoGradGuard no_grad;
      std::lock_guard<std::mutex> lock(mutex);
      auto& kept = taken[t][c];
      kept = kept.defined() ? kept + grad : grad;
      if (!settle_queued) {
        settle_queued = true;
        // The final callbacks of the backward that runs this hook: they run
        // once it has accumulated every leaf.
        torch::autograd::Engine::get_default_engine().queue_callback(
            [self = shared_from_this()] { self->settle(); });
      }
      return torch::zeros_like(grad);
    }

    void settle() {
      torch::NoGradGuard no_grad;
      std::lock_guard<std::mutex> lock(mutex);
      settle_queued = false;
      for (size_t t = 0; t < ties.size(); ++t) {
        const auto& copies = ties[t].copies;
        torch::Tensor sum; // in copy order, on the first copy's device
        for (auto& kept : taken[t]) {
          if (kept.defined()) {
            auto here = kept.to(copies[0].device());
            sum = sum.defined() ? sum + here : here;
            kept = torch::Tensor();
          }
        }
        if (!sum.defined()) {
          continue;
        }
        for (const auto& copy : copies) {
          auto& grad = copy.mutable_grad();
          if (grad.defined()) {
            grad.add_(sum.to(grad.device()));
          } else {
            grad = sum.to(
                copy.device(),
                sum.scalar_type(),
                /*non_blocking=*/false,
                /*copy=*/true);
          }
        }
      }
    }
  };

  static void check_like(
      const Tie& tie,
      const torch::Tensor& copy,
      const std::string& name) {
    if (tie.copies.empty()) {
      return;
    }
    const auto& first = tie.copies[0];
    TORCH_CHECK(
        first.sizes() == copy.sizes() &&
            first.scalar_type() == copy.scalar_type(),
        "gpipe: tie(): \"",
        tie.names[0],
        "\" is ",
        first.scalar_type(),
        first.sizes(),
        " but \"",
        name,
        "\" is ",
        copy.scalar_type(),
        copy.sizes(),
        "; tied copies have one shape and dtype");
    TORCH_CHECK(
        first.device().type() == copy.device().type(),
        "gpipe: tie(): \"",
        tie.names[0],
        "\" is on ",
        first.device(),
        " but \"",
        name,
        "\" on ",
        copy.device(),
        "; tied copies live on devices of one type (an optimizer's "
        "arithmetic may differ in the last bit between them)");
    TORCH_CHECK(
        first.requires_grad() == copy.requires_grad(),
        "gpipe: tie(): \"",
        tie.names[0],
        "\" ",
        first.requires_grad() ? "requires" : "does not require",
        " grad but \"",
        name,
        "\" ",
        copy.requires_grad() ? "does" : "does not",
        "; freeze or train tied copies together");
  }

  std::shared_ptr<State> state_;
  mutable int64_t calls_ = 0; // check_equal's, for its offset
};

} // namespace gpipe::detail
