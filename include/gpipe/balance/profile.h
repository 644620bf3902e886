// Measuring each layer of a Sequential: its time, and the memory it holds.
//
// Why per layer: a balance is chosen among thousands of splits, and only
// per-layer costs let the solver price every one of them without running
// it. Each layer runs as a partition would run it (Note [Profiling runs a
// layer as a partition does]), on one micro-batch of the user's data, so a
// model of several tensors or skips is profiled like a plain one, and the
// model is left as profiling found it (Note [Profiling leaves the model as
// it found it]).
#pragma once

#include <gpipe/balance/layer_run.h>
#include <gpipe/balance/memory_model.h>
#include <gpipe/balance/model_state.h>
#include <gpipe/detail/bundle.h>
#include <gpipe/detail/skip_layout.h>
#include <gpipe/memory.h>

#include <c10/util/Exception.h>
#include <torch/arg.h>
#include <torch/cuda.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/types.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <initializer_list>
#include <unordered_set>
#include <utility>
#include <vector>

namespace gpipe {

/// How `profile_times` and `balance_by_time` measure.
struct TimeOptions {
  /// Passes over all layers before measuring (allocator, kernels, caches).
  TORCH_ARG(int64_t, warmup) = 2;
  /// Measured passes; each layer's time is the median over them.
  TORCH_ARG(int64_t, repeats) = 5;
};

/// One micro-batch to profile on, spelled as a pipe's input: a tensor, or a
/// `std::vector<torch::Tensor>` (a braced list is a list, even of one
/// tensor), every tensor with the same batch size.
class Sample {
 public:
  /// One tensor, as a pipe's input tensor.
  /* implicit */ Sample(const torch::Tensor& tensor)
      : value_(detail::value_of(tensor)) {}
  /// Several tensors, as a pipe's list input.
  /* implicit */ Sample(const std::vector<torch::Tensor>& tensors)
      : value_(detail::value_of(tensors)) {}
  /// A braced list: a list, even of one tensor.
  /* implicit */ Sample(std::initializer_list<torch::Tensor> tensors)
      : value_{detail::Bundle(tensors), true} {}

  /// The tensors, and whether they form a list.
  const detail::Value& value() const {
    return value_;
  }

  /// Where the sample lives (its first tensor's device).
  torch::Device device() const {
    return value_.tensors.front().device();
  }

 private:
  detail::Value value_;
};

namespace detail {

/// Checks the Sequential and the sample, and that every sample tensor and
/// every layer's parameters and buffers are on the sample's device
/// (profiling runs there).
inline void check_profile_arguments(
    const torch::nn::Sequential& seq,
    const Sample& sample) {
  TORCH_CHECK(
      !seq.is_empty(),
      "gpipe: balancing needs a Sequential, got an empty holder");
  TORCH_CHECK(
      seq->size() >= 1,
      "gpipe: cannot balance an empty Sequential (layers: 0)");
  const Bundle& tensors = sample.value().tensors;
  check_bundle(tensors, "sample");
  TORCH_CHECK(
      tensors.front().numel() >= 1,
      "gpipe: sample is empty (sample shape: ",
      tensors.front().sizes(),
      ")");
  const auto device = sample.device();
  for (size_t k = 1; k < tensors.size(); ++k) {
    TORCH_CHECK(
        tensors[k].device() == device,
        "gpipe: sample tensor ",
        k,
        " is on ",
        tensors[k].device(),
        " but sample tensor 0 is on ",
        device,
        " (profiling runs on one device)");
  }
  size_t l = 0;
  for (const auto& layer : *seq) {
    const auto where = [&](const torch::Tensor& tensor, const char* what) {
      TORCH_CHECK(
          tensor.device() == device,
          "gpipe: layer ",
          l,
          " has a ",
          what,
          " on ",
          tensor.device(),
          " but the sample is on ",
          device,
          " (profiling runs on the sample's device: move the Sequential there first)");
    };
    for (const auto& tensor : layer.ptr()->parameters()) {
      where(tensor, "parameter");
    }
    for (const auto& tensor : layer.ptr()->buffers()) {
      where(tensor, "buffer");
    }
    ++l;
  }
}

/// The layers of `seq`, sharing its modules, and their skip layout with one
/// layer a partition: a bad layout fails here as it fails a pipe.
inline std::vector<torch::nn::AnyModule> layers_of(
    const torch::nn::Sequential& seq,
    SkipLayout& layout) {
  layout = skip_layout(seq, std::vector<int64_t>(seq->size(), 1));
  return {seq->begin(), seq->end()};
}

/// Waits for the device's queued work (CUDA); a no-op on the CPU.
inline void synchronize(const torch::Device& device) {
  if (device.is_cuda()) {
    torch::cuda::synchronize(device.has_index() ? device.index() : -1);
  }
}

inline double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  return n % 2 == 1 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

/// Seconds since `start`, after the device's queued work is done.
inline double seconds_since(
    std::chrono::steady_clock::time_point start,
    const torch::Device& device) {
  synchronize(device);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
      .count();
}

/// Parameter, gradient and buffer bytes per layer; a tensor shared with an
/// earlier layer counts there only.
inline void count_state(
    const std::vector<torch::nn::AnyModule>& layers,
    std::vector<LayerMemory>& memory) {
  std::unordered_set<const void*> seen;
  for (size_t l = 0; l < layers.size(); ++l) {
    for (const auto& parameter : layers[l].ptr()->parameters()) {
      if (seen.insert(parameter.unsafeGetTensorImpl()).second) {
        memory[l].parameter_bytes += static_cast<int64_t>(parameter.nbytes());
        if (parameter.requires_grad()) {
          memory[l].gradient_bytes += static_cast<int64_t>(parameter.nbytes());
        }
      }
    }
    for (const auto& buffer : layers[l].ptr()->buffers()) {
      if (seen.insert(buffer.unsafeGetTensorImpl()).second) {
        memory[l].buffer_bytes += static_cast<int64_t>(buffer.nbytes());
      }
    }
  }
}

/// Note [What a layer keeps]
/// A graph keeps what its nodes save, not every output: Linear saves its
/// input, Tanh its output, so of Linear -> Tanh only the Tanh's output
/// stays (and the Linear's input). Measuring each layer alone, holding its
/// output, would count the Linear's output too (the first version did, and
/// predicted 1.7x what a step kept without checkpointing). So the whole
/// Sequential runs forward once on the sample with autograd, keeping only
/// the latest outputs, the skips not yet popped and the graph, and a layer's
/// activation bytes are the rise of the device's allocated bytes over its
/// forward: its outputs, its stashed skips and what it saves, less its
/// inputs where nothing keeps them. Summed over a partition [b, e) this is
/// the partition's graph and outputs less its inputs, which Note [What a
/// partition keeps] counts apart; a skip counts at the layer that stashes
/// it. The whole graph of one micro-batch must fit on the device.
inline void measure_graph(
    std::vector<torch::nn::AnyModule>& layers,
    const SkipLayout& layout,
    const Sample& sample,
    std::vector<LayerMemory>& memory) {
  const auto device = sample.device();
  Value x = leaves_of(sample.value());
  SkipFrame frame;
  synchronize(device);
  int64_t held = memory_stats(device).current_bytes;
  for (size_t l = 0; l < layers.size(); ++l) {
    memory[l].input_bytes = bytes_of(x.tensors);
    {
      LayerRun run = run_layer(layers[l], l, std::move(x), frame);
      check_layer_skips(layout, l, run, frame);
      x = std::move(run.output);
    } // the inputs and popped skips go, unless the graph keeps them
    synchronize(device);
    const int64_t now = memory_stats(device).current_bytes;
    memory[l].output_bytes = bytes_of(x.tensors);
    memory[l].activation_bytes = now - held;
    held = now;
  }
}

/// Each layer's backward on its own: the peak rise over it.
inline void measure_backwards(
    std::vector<torch::nn::AnyModule>& layers,
    const SkipLayout& layout,
    const Sample& sample,
    std::vector<LayerMemory>& memory) {
  const auto device = sample.device();
  LayersAlone walk(layers, layout, sample.value());
  for (size_t l = 0; l < layers.size(); ++l) {
    const LayerRun run = walk.run(l);
    const LayerBackward backward(run, layers[l]);
    if (!backward.empty()) {
      synchronize(device);
      const int64_t before = memory_stats(device).current_bytes;
      reset_peak_memory(device);
      backward.run();
      synchronize(device);
      memory[l].backward_bytes = memory_stats(device).peak_bytes - before;
    }
    walk.advance(run);
  }
}

} // namespace detail

/// Each layer's forward + backward time in seconds on `sample` (one
/// micro-batch, on the device where the Sequential is): every layer runs on
/// the previous layer's outputs and the skips it pops, detached, so its time
/// is its own; backward differentiates its inputs, popped skips and
/// parameters with `torch::autograd::grad`, so `.grad` is never written.
/// After `warmup` passes, the median of `repeats` passes; on CUDA the device
/// is synchronized around every measured region. Runs in the layers' current
/// mode (call `train()` first to profile training). Leaves parameters,
/// gradients, buffers and the generators as it found them (Note [Profiling
/// leaves the model as it found it]).
inline std::vector<double> profile_times(
    const torch::nn::Sequential& seq,
    const Sample& sample,
    const TimeOptions& options = {}) {
  detail::check_profile_arguments(seq, sample);
  TORCH_CHECK(
      options.warmup() >= 0,
      "gpipe: warmup must be at least 0 (warmup: ",
      options.warmup(),
      ")");
  TORCH_CHECK(
      options.repeats() >= 1,
      "gpipe: repeats must be at least 1 (repeats: ",
      options.repeats(),
      ")");
  using Clock = std::chrono::steady_clock;
  const auto device = sample.device();
  detail::SkipLayout layout;
  auto layers = detail::layers_of(seq, layout);
  detail::ModelStateGuard guard(seq, device);
  torch::AutoGradMode enable_grad(true);
  std::vector<std::vector<double>> times(layers.size());
  for (int64_t pass = 0; pass < options.warmup() + options.repeats(); ++pass) {
    detail::LayersAlone walk(layers, layout, sample.value());
    for (size_t l = 0; l < layers.size(); ++l) {
      detail::synchronize(device);
      auto start = Clock::now();
      const detail::LayerRun run = walk.run(l);
      double seconds = detail::seconds_since(start, device);
      const detail::LayerBackward backward(run, layers[l]);
      if (!backward.empty()) {
        start = Clock::now();
        backward.run();
        seconds += detail::seconds_since(start, device);
      }
      if (pass >= options.warmup()) {
        times[l].push_back(seconds);
      }
      walk.advance(run);
    }
  }
  std::vector<double> medians;
  medians.reserve(times.size());
  for (auto& runs : times) {
    medians.push_back(detail::median(std::move(runs)));
  }
  return medians;
}

/// Each layer's memory on `sample` (one micro-batch, on the device where the
/// Sequential is): parameter, gradient and buffer bytes by counting, input
/// and output bytes by size, activation bytes with the memory meter (the
/// counting CPU allocator, installed on first use, see <gpipe/memory.h>, or
/// the caching allocator's statistics on CUDA; Note [What a layer keeps]).
/// Runs in the layers' current mode. Then each layer's backward on its own,
/// for its peak. Leaves the model as it found it (Note [Profiling leaves the
/// model as it found it]). Resets the device's peak statistics (as a
/// MemoryMeter does); other threads allocating on the device meanwhile
/// distort the measurement.
inline std::vector<LayerMemory> profile_memory(
    const torch::nn::Sequential& seq,
    const Sample& sample) {
  detail::check_profile_arguments(seq, sample);
  if (sample.device().is_cpu()) {
    track_cpu_memory();
  }
  detail::SkipLayout layout;
  auto layers = detail::layers_of(seq, layout);
  detail::ModelStateGuard guard(seq, sample.device());
  std::vector<LayerMemory> memory(layers.size());
  detail::count_state(layers, memory);
  torch::AutoGradMode enable_grad(true);
  detail::measure_graph(layers, layout, sample, memory);
  detail::measure_backwards(layers, layout, sample, memory);
  return memory;
}

} // namespace gpipe
