// Leaving a model as profiling found it.
//
// Why: profiling runs a user's layers forward and backward in the mode they
// are in, so BatchNorm moves its running statistics, dropout draws from the
// generators and a layer may write into its parameters; a balance helper
// must not change what the user trains afterwards. The guard saves what a
// run can touch and puts it back, bit for bit, without disturbing graphs
// that saved the untouched tensors (Note [Profiling leaves the model as it
// found it]).
#pragma once

#include <gpipe/detail/observer.h>

#include <torch/nn/modules/container/sequential.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <cstdint>
#include <vector>

namespace gpipe::detail {

/// Note [Profiling leaves the model as it found it]
/// Saves, on construction, a copy of every parameter, buffer and `.grad` of
/// the Sequential (on the CPU, so a device's memory is not doubled) and the
/// CPU generator's and the sample device's generator's states; restores them
/// on destruction. Buffers are always written back: BatchNorm's kernel
/// updates its running statistics without moving their version counter. A
/// parameter or `.grad` is written back only if its version counter moved
/// (every in-place write through the dispatcher moves it), so untouched
/// parameters keep their version and any graph that saved them stays valid.
/// A `.grad` that was replaced or dropped is put back as the very tensor it
/// was. Costs one host copy of the model while profiling.
class ModelStateGuard {
 public:
  ModelStateGuard(const torch::nn::Sequential& seq, const torch::Device& device)
      : rng_(GeneratorStates::capture(device)), device_(device) {
    for (const auto& parameter : seq->parameters()) {
      save(parameter, /*always=*/false);
      grads_.push_back(
          {parameter,
           parameter.grad(),
           parameter.grad().defined() ? host_copy(parameter.grad())
                                      : torch::Tensor(),
           parameter.grad().defined() ? parameter.grad()._version() : 0});
    }
    for (const auto& buffer : seq->buffers()) {
      save(buffer, /*always=*/true);
    }
  }

  ~ModelStateGuard() {
    try {
      restore();
    } catch (...) {
      // A destructor must not throw; restore() only copies tensors that
      // already fit, so this is not expected.
    }
  }

  ModelStateGuard(const ModelStateGuard&) = delete;
  ModelStateGuard& operator=(const ModelStateGuard&) = delete;

 private:
  struct Saved {
    torch::Tensor tensor;
    torch::Tensor copy;
    int64_t version;
    bool always; // write back even if the version did not move
  };
  struct SavedGrad {
    torch::Tensor parameter;
    torch::Tensor grad; // the very tensor, or undefined
    torch::Tensor copy;
    int64_t version;
  };

  static torch::Tensor host_copy(const torch::Tensor& tensor) {
    return tensor.detach().to(
        torch::kCPU, /*non_blocking=*/false, /*copy=*/true);
  }

  void save(const torch::Tensor& tensor, bool always) {
    tensors_.push_back({tensor, host_copy(tensor), tensor._version(), always});
  }

  void restore() {
    torch::NoGradGuard no_grad;
    for (auto& saved : tensors_) {
      if (saved.always || saved.tensor._version() != saved.version) {
        saved.tensor.detach().copy_(saved.copy);
      }
    }
    for (auto& saved : grads_) {
      auto& grad = saved.parameter.mutable_grad();
      if (!saved.grad.defined()) {
        grad.reset();
        continue;
      }
      if (!grad.is_same(saved.grad)) {
        grad = saved.grad;
      }
      if (grad._version() != saved.version) {
        grad.detach().copy_(saved.copy);
      }
    }
    rng_.restore(device_);
  }

  GeneratorStates rng_;
  torch::Device device_;
  std::vector<Saved> tensors_;
  std::vector<SavedGrad> grads_;
};

} // namespace gpipe::detail
