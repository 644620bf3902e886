// What a cell may overwrite: plain training lets a layer write into the
// activation it receives (ReLU(inplace=true) first in a partition), so a
// cell's input is an alias the partition may write through, with the
// version counter plain training would give it, and a checkpointed cell
// whose partition writes into its input keeps a copy for its recompute.
#pragma once

#include <gpipe/detail/bundle.h>
#include <gpipe/detail/cell_context.h>
#include <gpipe/detail/pipe_call.h>

#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/types.h>

#include <cstdint>
#include <vector>

namespace gpipe::detail {

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

/// The tensor partition j runs on: an alias of `x`, so that an in-place
/// first layer writes where plain training would. Partition 0's inputs are
/// slices of one batch and share its version counter; each gets its own, so
/// that writing into one micro-batch does not invalidate what another saved
/// (plain training writes the batch once). Later partitions share the
/// counter of the output they receive, so that overwriting an output its
/// producer saved fails as it does in plain training.
inline torch::Tensor alias_of_input(const torch::Tensor& x, int64_t j) {
  return j == 0 ? x.variable_data() : x.detach();
}

/// The versions of the tensors a partition is fed, to tell afterwards
/// whether it wrote into one.
class InputVersions {
 public:
  explicit InputVersions(const Bundle& fed) {
    for (const auto& t : fed) {
      versions_.push_back(t._version());
    }
  }

  bool changed(const Bundle& fed) const {
    for (size_t k = 0; k < fed.size(); ++k) {
      if (fed[k]._version() != versions_[k]) {
        return true;
      }
    }
    return false;
  }

 private:
  std::vector<int64_t> versions_;
};

/// What a checkpointed cell keeps of its inputs for the recompute: the
/// inputs as forward saw them, copied when the partition writes into them
/// (or might: `mutates` is -1 until the pipe knows).
inline Bundle inputs_kept_for_recompute(const Bundle& x, int mutates) {
  Bundle kept;
  for (const auto& t : x) {
    kept.push_back(mutates != 0 ? t.detach().clone() : t.detach());
  }
  return kept;
}

/// Learns from a checkpointed cell whether its partition writes into its
/// input (`known`: what the pipe knew before it ran). A partition that
/// starts writing after earlier micro-batches did not has lost the input
/// its recompute needs: an error, and from now on the pipe keeps a copy.
inline void learn_input_writes(
    PartitionTraits& traits,
    int known,
    bool wrote,
    const CellIndex& cell) {
  if (known < 0) {
    traits.mutates_input.store(wrote ? 1 : 0);
  } else if (known == 0 && wrote) {
    traits.mutates_input.store(1);
    TORCH_CHECK(
        false,
        "gpipe: partition ",
        cell.partition,
        " wrote into its input in place on micro-batch ",
        cell.microbatch,
        " although it did not on earlier micro-batches, so the input kept ",
        "for its recompute is lost; the pipe now keeps a copy: call again");
  }
}

} // namespace gpipe::detail
