// Running one layer of a Sequential on its own, the way a partition runs it.
//
// Why: profiling measures each layer alone, and a layer alone must be fed
// the way the pipe feeds it, or a model the pipe trains could not be
// balanced. Between layers travels a tensor or a list of tensors
// (detail/bundle.h), and a skippable layer stashes into and pops from the
// running cell's frame (gpipe/skip.h). This header runs a layer through that
// same path (any_value_of in, any_forward, value_of out, under a SkipFrame)
// and records what the layer took (its inputs, the skips it popped) and what
// it gave (its outputs, the skips it stashed), so that a backward of that
// layer alone can differentiate all of it.
#pragma once

#include <gpipe/detail/bundle.h>
#include <gpipe/detail/skip_frame.h>
#include <gpipe/detail/skip_layout.h>

#include <c10/util/Exception.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/nn/modules/container/any.h>
#include <torch/types.h>

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace gpipe::detail {

/// A fresh leaf for a layer's input: requires grad when it can, as a
/// partition's input does (a mask or position ids cannot).
inline torch::Tensor profile_input(const torch::Tensor& x) {
  auto leaf = x.detach();
  if (leaf.is_floating_point() || leaf.is_complex()) {
    leaf.requires_grad_(true);
  }
  return leaf;
}

/// Fresh leaves of every tensor of `value`, in its spelling.
inline Value leaves_of(const Value& value) {
  Value leaves{{}, value.is_list};
  for (const auto& tensor : value.tensors) {
    leaves.tensors.push_back(profile_input(tensor));
  }
  return leaves;
}

inline int64_t bytes_of(const Bundle& tensors) {
  int64_t bytes = 0;
  for (const auto& tensor : tensors) {
    bytes += static_cast<int64_t>(tensor.nbytes());
  }
  return bytes;
}

/// What one layer took and gave.
struct LayerRun {
  Value input;
  Bundle popped; // the skips it popped
  Value output;
  std::map<std::string, torch::Tensor> stashed; // the skips it stashed
};

/// Note [Profiling runs a layer as a partition does]
/// Layer l runs as the only layer of a partition would: its input bundle
/// back in the spelling the layer takes, `any_forward`, its output read as
/// a bundle, and the skips it may pop waiting in a SkipFrame that is the
/// thread's current one while it runs. The skips it popped are inputs and
/// the skips it stashed are outputs, as they are of a partition they cross
/// into or out of. The pipe checks each partition's declared stashes and
/// pops after it runs; profiling checks each layer's with the same layout
/// (one layer a partition), so a model fails profiling as it would fail a
/// pipe, and its layout errors are the pipe's (detail/skip_layout.h).
inline LayerRun run_layer(
    torch::nn::AnyModule& layer,
    size_t l,
    Value input,
    SkipFrame& frame) {
  const std::string where = "layer " + std::to_string(l);
  frame.label = where + " while profiling";
  LayerRun run;
  const auto before = frame.available;
  {
    SkipFrameGuard current(&frame);
    run.output = value_of(
        layer.any_forward(any_value_of(input.tensors, input.is_list)), where);
  }
  for (const auto& entry : before) {
    if (frame.available.count(entry.first) == 0) {
      run.popped.push_back(entry.second);
    }
  }
  for (const auto& entry : frame.available) {
    if (before.count(entry.first) == 0) {
      run.stashed.insert(entry);
    }
  }
  run.input = std::move(input);
  return run;
}

/// After layer l ran: it stashed every skip it declares for a later layer,
/// popped every skip it declares from an earlier one, and left in `frame`
/// only skips that a later layer pops (`layout` cuts one layer a partition).
inline void check_layer_skips(
    const SkipLayout& layout,
    size_t l,
    const LayerRun& run,
    const SkipFrame& frame) {
  const auto j = static_cast<int64_t>(l);
  std::set<std::string> pending; // stashed by layer l or before, popped later
  for (const auto& route : layout.routes) {
    TORCH_CHECK(
        route.from != j || run.stashed.count(route.name) == 1,
        "gpipe: skip '",
        route.name,
        "' was not stashed by layer ",
        l,
        " while profiling, although the layer declares it (a declared stash ",
        "must happen on every forward)");
    if (route.from <= j && j < route.to) {
      pending.insert(route.name);
    }
  }
  for (const auto& entry : frame.available) {
    TORCH_CHECK(
        pending.count(entry.first) == 1,
        "gpipe: skip '",
        entry.first,
        "' was not popped by layer ",
        l,
        " while profiling, although the layer declares it (a declared pop ",
        "must happen on every forward)");
  }
}

/// A layer's backward on its own: from its outputs and stashed skips that
/// require grad to its inputs, popped skips and parameters that do.
struct LayerBackward {
  std::vector<torch::Tensor> outputs;
  std::vector<torch::Tensor> targets;

  LayerBackward(const LayerRun& run, const torch::nn::AnyModule& layer) {
    const auto add = [](std::vector<torch::Tensor>& to, const Bundle& from) {
      for (const auto& tensor : from) {
        if (tensor.requires_grad()) {
          to.push_back(tensor);
        }
      }
    };
    add(outputs, run.output.tensors);
    for (const auto& entry : run.stashed) {
      add(outputs, {entry.second});
    }
    add(targets, run.input.tensors);
    add(targets, run.popped);
    add(targets, layer.ptr()->parameters());
  }

  bool empty() const {
    return outputs.empty() || targets.empty();
  }

  /// Differentiates with `torch::autograd::grad`, so `.grad` is never
  /// written; the gradient that arrives is ones.
  void run() const {
    std::vector<torch::Tensor> arriving;
    for (const auto& output : outputs) {
      arriving.push_back(torch::ones_like(output));
    }
    (void)torch::autograd::grad(
        outputs,
        targets,
        arriving,
        /*retain_graph=*/false,
        /*create_graph=*/false,
        /*allow_unused=*/true);
  }
};

/// Each layer of a Sequential on its own, in order: layer l runs on fresh
/// leaves of layer l - 1's outputs and of the skips stashed before it, so
/// its backward reaches no earlier layer and its time and memory are its own.
class LayersAlone {
 public:
  LayersAlone(
      std::vector<torch::nn::AnyModule>& layers,
      const SkipLayout& layout,
      const Value& sample)
      : layers_(layers), layout_(layout), x_(leaves_of(sample)) {}

  /// Runs layer l (the next one) on its leaves.
  LayerRun run(size_t l) {
    LayerRun run = run_layer(layers_[l], l, std::move(x_), frame_);
    check_layer_skips(layout_, l, run, frame_);
    return run;
  }

  /// Feeds the next layer from `run`, the last layer's.
  void advance(const LayerRun& run) {
    x_ = leaves_of(run.output);
    for (const auto& entry : run.stashed) {
      frame_.available[entry.first] = profile_input(entry.second);
    }
  }

 private:
  std::vector<torch::nn::AnyModule>& layers_;
  const SkipLayout& layout_;
  Value x_;
  SkipFrame frame_;
};

} // namespace gpipe::detail
