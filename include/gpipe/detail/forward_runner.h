// `forward()`'s stages: each cell one autograd node of the caller's graph
// (Note [A cell is one autograd node]); activations cross lanes with their
// history, so the user's backward reaches every cell. It runs forward-only
// programs; `step()` runs the others (step_runner.h).
#pragma once

#include <gpipe/detail/bundle.h>
#include <gpipe/detail/executor.h>
#include <gpipe/detail/local_stages.h>
#include <gpipe/detail/pipe_call.h>
#include <gpipe/detail/stage_host.h>
#include <gpipe/options.h>

#include <c10/util/Exception.h>

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

namespace gpipe::detail {

class ForwardRunner final : public StageRunner {
 public:
  /// `checkpoint` is Checkpoint::Never outside training.
  ForwardRunner(
      LocalStages& stages,
      Checkpoint checkpoint,
      const std::vector<Bundle>& inputs,
      std::shared_ptr<PipeCall> call,
      bool needs_graph)
      : stages_(stages),
        checkpoint_(checkpoint),
        inputs_(inputs),
        call_(std::move(call)),
        needs_graph_(needs_graph),
        m_(static_cast<int64_t>(inputs.size())) {}

  Bundle input(int64_t i) override {
    return stages_.receive_all(inputs_[static_cast<size_t>(i)], i, 0);
  }
  Bundle move(
      Bundle x,
      int64_t s,
      int64_t i,
      Direction /*direction: forward only*/) override {
    return stages_.receive_all(x, i, s);
  }
  Bundle forward(int64_t s, int64_t i, Bundle x) override {
    return stages_.run_cell(
        i, s, checkpointed(checkpoint_, i, m_), x, call_, needs_graph_);
  }
  Bundle backward(
      int64_t s,
      int64_t i,
      Bundle /*grad_outputs*/,
      bool /*input_only*/) override {
    TORCH_CHECK(
        false,
        "gpipe: forward() runs forward-only programs (stage ",
        s,
        ", micro-batch ",
        i,
        ")");
    return {};
  }
  void backward_weight(int64_t s, int64_t i) override {
    backward(s, i, {}, false);
  }

 private:
  LocalStages& stages_;
  Checkpoint checkpoint_;
  const std::vector<Bundle>& inputs_;
  std::shared_ptr<PipeCall> call_;
  bool needs_graph_;
  int64_t m_;
};

} // namespace gpipe::detail
