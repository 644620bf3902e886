// One executor for every program: each lane runs its own list of actions in
// order, on its own thread, and blocks only on a receive from a neighbour.
//
// Why one interpreter: `forward()` (the forward-only program) and `step()`
// (any schedule, or a user's program) used to be two loops with a barrier
// after every round. A program is data, validated before it runs
// (simulate.h); the executor only carries tensors between actions: what a
// stage does to a micro-batch is the `StageRunner`'s business, how a tensor
// reaches another lane is the `Transport`'s. A lane in this process today is
// a rank tomorrow: the same loop, a process-group transport.
//
// Note [A failed lane stops every lane]
// A lane that fails records its error and aborts the transport: every lane
// blocked in a receive wakes with `LaneAborted`, and lanes check the abort
// before each action, so no lane hangs and no work outlives the call. The
// caller gets the first failure (in time), with its stage, micro-batch and
// phase, as the exception type it was raised with.
#pragma once

#include <gpipe/detail/worker.h>
#include <gpipe/program.h>

#include <c10/util/Exception.h>
#include <torch/types.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace gpipe::detail {

/// Which way a tensor travels between neighbouring stages.
enum class Direction { Forward, Backward };

/// The address of one tensor in flight: the stage that receives it, its
/// micro-batch, and whether it is an activation (forward) or the gradient
/// of one (backward).
struct Tag {
  int64_t stage = 0;
  int64_t microbatch = 0;
  Direction direction = Direction::Forward;

  bool operator<(const Tag& other) const {
    return std::tie(stage, microbatch, direction) <
        std::tie(other.stage, other.microbatch, other.direction);
  }
};

inline std::string to_string(const Tag& tag) {
  return std::string(
             tag.direction == Direction::Forward ? "activation" : "gradient") +
      " for stage " + std::to_string(tag.stage) + ", micro-batch " +
      std::to_string(tag.microbatch);
}

/// Thrown in a lane that was waiting when another lane failed.
struct LaneAborted : std::exception {
  const char* what() const noexcept override {
    return "gpipe: lane stopped because another lane failed";
  }
};

/// The shape and dtype a receiver expects. A transport between processes
/// needs them before the bytes arrive; every transport checks them, so a
/// mismatch is an error, never a silent reinterpretation.
struct TensorMeta {
  std::vector<int64_t> sizes;
  c10::ScalarType dtype = c10::ScalarType::Float;
};

/// What lanes exchange tensors through. `recv` blocks until the tensor with
/// that tag was sent, or throws LaneAborted once `abort` was called. An
/// undefined tensor is a valid message (a gradient that does not exist).
class Transport {
 public:
  virtual ~Transport() = default;
  virtual void send(const Tag& tag, torch::Tensor tensor) = 0;
  virtual torch::Tensor recv(
      const Tag& tag,
      const std::optional<TensorMeta>& expected = std::nullopt) = 0;
  virtual void abort() = 0;
};

/// Throws unless `tensor` (when defined) is what `expected` says.
inline void check_received(
    const Tag& tag,
    const torch::Tensor& tensor,
    const std::optional<TensorMeta>& expected) {
  if (!expected || !tensor.defined()) {
    return;
  }
  TORCH_CHECK(
      tensor.sizes() == c10::IntArrayRef(expected->sizes) &&
          tensor.scalar_type() == expected->dtype,
      "gpipe: received the ",
      to_string(tag),
      " with shape ",
      tensor.sizes(),
      " and dtype ",
      tensor.scalar_type(),
      ", expected shape ",
      c10::IntArrayRef(expected->sizes),
      " and dtype ",
      expected->dtype);
}

/// Lanes of one process: a mailbox per tag. Tensors keep their autograd
/// history, so `forward()` followed by the user's `backward()` crosses lanes
/// (the copy to the receiving stage's device is the runner's, on the
/// receiving lane).
class MailboxTransport final : public Transport {
 public:
  void send(const Tag& tag, torch::Tensor tensor) override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const bool fresh = boxes_.emplace(tag, std::move(tensor)).second;
      TORCH_INTERNAL_ASSERT(fresh, "gpipe: sent twice: ", to_string(tag));
    }
    arrived_.notify_all();
  }

  torch::Tensor recv(
      const Tag& tag,
      const std::optional<TensorMeta>& expected = std::nullopt) override {
    std::unique_lock<std::mutex> lock(mutex_);
    auto found = boxes_.end();
    arrived_.wait(lock, [&] {
      found = boxes_.find(tag);
      return aborted_ || found != boxes_.end();
    });
    if (found == boxes_.end()) {
      throw LaneAborted();
    }
    torch::Tensor tensor = std::move(found->second);
    boxes_.erase(found);
    lock.unlock();
    check_received(tag, tensor, expected);
    return tensor;
  }

  void abort() override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      aborted_ = true;
    }
    arrived_.notify_all();
  }

 private:
  std::mutex mutex_;
  std::condition_variable arrived_;
  std::map<Tag, torch::Tensor> boxes_;
  bool aborted_ = false;
};

/// What a stage does to a micro-batch; the executor calls these in program
/// order, each stage from its own lane's thread only.
class StageRunner {
 public:
  virtual ~StageRunner() = default;
  /// The first stage's input of micro-batch i.
  virtual torch::Tensor input(int64_t i) = 0;
  /// `x` (received from another lane, or handed over on this one) moved to
  /// stage s's device; `gradient` tells which way it travels.
  virtual torch::Tensor move(
      const torch::Tensor& x,
      int64_t s,
      int64_t i,
      Direction direction) = 0;
  /// F: stage s on micro-batch i; returns what stage s + 1 receives.
  virtual torch::Tensor forward(
      int64_t s,
      int64_t i,
      const torch::Tensor& x) = 0;
  /// B (or I when `input_only`): from the gradient of stage s's output
  /// (undefined for the last stage, whose root is its loss) to the gradient
  /// of its input (undefined when there is none).
  virtual torch::Tensor backward(
      int64_t s,
      int64_t i,
      const torch::Tensor& grad_output,
      bool input_only) = 0;
  /// W: the parameter gradients that I(s, i) left.
  virtual void backward_weight(int64_t s, int64_t i) = 0;
};

/// Runs a validated, lowered program: lane l's actions on `lanes[l]` (null:
/// the caller's thread). Activations and gradients that neighbouring stages
/// on one lane hand each other never touch the transport. Returns the last
/// stage's outputs per micro-batch (what its F returned).
class Executor {
 public:
  Executor(const Program& program, StageRunner& runner, Transport& transport)
      : program_(program),
        runner_(runner),
        transport_(transport),
        inputs_(grid()),
        outputs_(grid()),
        grad_inputs_(grid()),
        grad_outputs_(grid()) {}

  std::vector<torch::Tensor> run(
      std::vector<DeviceTask> lanes,
      const CallerContext& caller) {
    TORCH_INTERNAL_ASSERT(
        lanes.size() == program_.lanes.size(),
        "gpipe: a task per lane: ",
        lanes.size(),
        " tasks, ",
        program_.lanes.size(),
        " lanes");
    for (size_t l = 0; l < lanes.size(); ++l) {
      lanes[l].run = [this, l] { run_lane(l); };
    }
    run_on_workers(lanes, caller); // lanes catch their own failures
    if (failure_) {
      std::rethrow_exception(failure_);
    }
    std::vector<torch::Tensor> last;
    const auto s = static_cast<size_t>(program_.stages - 1);
    for (auto& output : outputs_[s]) {
      last.push_back(std::move(output));
    }
    return last;
  }

 private:
  using Slots = std::vector<std::vector<torch::Tensor>>;

  Slots grid() const {
    return Slots(
        static_cast<size_t>(program_.stages),
        std::vector<torch::Tensor>(static_cast<size_t>(program_.microbatches)));
  }

  static torch::Tensor take(torch::Tensor& slot) {
    return std::exchange(slot, torch::Tensor());
  }

  bool same_lane(int64_t s, int64_t other) const {
    return program_.lane_of_stage[static_cast<size_t>(s)] ==
        program_.lane_of_stage[static_cast<size_t>(other)];
  }

  void run_lane(size_t lane) {
    try {
      for (const Action& action : program_.lanes[lane]) {
        if (stopped_.load()) {
          return;
        }
        run_action(action);
      }
    } catch (const LaneAborted&) {
      // Another lane failed first (Note [A failed lane stops every lane]).
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!failure_) {
        failure_ = std::current_exception();
      }
      stopped_.store(true);
      transport_.abort();
    }
  }

  void run_action(const Action& action) {
    const int64_t s = action.stage;
    const int64_t i = action.microbatch;
    const auto ss = static_cast<size_t>(s);
    const auto ii = static_cast<size_t>(i);
    const int64_t last = program_.stages - 1;
    switch (action.op) {
      case Op::F: {
        torch::Tensor x = s == 0 ? runner_.input(i) : take(inputs_[ss][ii]);
        torch::Tensor out = runner_.forward(s, i, x);
        if (s < last && same_lane(s, s + 1)) {
          inputs_[ss + 1][ii] = runner_.move(out, s + 1, i, Direction::Forward);
        } else {
          outputs_[ss][ii] = std::move(out);
        }
        break;
      }
      case Op::B:
      case Op::I: {
        torch::Tensor grad_output =
            s == last ? torch::Tensor() : take(grad_outputs_[ss][ii]);
        torch::Tensor grad_input =
            runner_.backward(s, i, grad_output, action.op == Op::I);
        if (s > 0 && same_lane(s, s - 1)) {
          grad_outputs_[ss - 1][ii] = grad_input.defined()
              ? runner_.move(grad_input, s - 1, i, Direction::Backward)
              : grad_input;
        } else if (s > 0) {
          grad_inputs_[ss][ii] = std::move(grad_input);
        }
        break;
      }
      case Op::W:
        runner_.backward_weight(s, i);
        break;
      case Op::SEND_F:
        transport_.send({s + 1, i, Direction::Forward}, take(outputs_[ss][ii]));
        break;
      case Op::RECV_F:
        inputs_[ss][ii] = runner_.move(
            transport_.recv({s, i, Direction::Forward}),
            s,
            i,
            Direction::Forward);
        break;
      case Op::SEND_B:
        transport_.send(
            {s - 1, i, Direction::Backward}, take(grad_inputs_[ss][ii]));
        break;
      case Op::RECV_B: {
        torch::Tensor grad = transport_.recv({s, i, Direction::Backward});
        grad_outputs_[ss][ii] = grad.defined()
            ? runner_.move(grad, s, i, Direction::Backward)
            : grad;
        break;
      }
    }
  }

  const Program& program_;
  StageRunner& runner_;
  Transport& transport_;
  // Per [stage][micro-batch], each touched by the lanes of that stage and its
  // neighbour on the same lane only.
  Slots inputs_; // received or handed over, not yet consumed by F
  Slots outputs_; // produced by F, not yet sent (the last stage's: results)
  Slots grad_inputs_; // produced by B/I, not yet sent
  Slots grad_outputs_; // received or handed over, not yet consumed by B/I
  std::mutex mutex_;
  std::exception_ptr failure_;
  std::atomic<bool> stopped_{false};
};

} // namespace gpipe::detail
