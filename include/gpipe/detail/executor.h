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

#include <gpipe/detail/bundle.h>
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

/// The address of one bundle in flight: the stage that receives it, its
/// micro-batch, whether it is an activation (forward) or the gradient of one
/// (backward), and its channel: 0 for what neighbouring stages hand each
/// other, 1 + r for skip route r (skip_layout.h).
struct Tag {
  int64_t stage = 0;
  int64_t microbatch = 0;
  Direction direction = Direction::Forward;
  int64_t channel = 0;

  bool operator<(const Tag& other) const {
    return std::tie(stage, microbatch, direction, channel) <
        std::tie(other.stage, other.microbatch, other.direction, other.channel);
  }
};

inline std::string to_string(const Tag& tag) {
  return std::string(
             tag.direction == Direction::Forward ? "activation" : "gradient") +
      (tag.channel == 0 ? std::string()
                        : " of skip route " + std::to_string(tag.channel - 1)) +
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

/// What lanes exchange bundles through. `recv` blocks until the bundle with
/// that tag was sent, or throws LaneAborted once `abort` was called. An
/// undefined tensor in a bundle is a valid message (a gradient that does not
/// exist).
class Transport {
 public:
  virtual ~Transport() = default;
  virtual void send(const Tag& tag, Bundle tensors) = 0;
  virtual Bundle recv(
      const Tag& tag,
      const std::optional<std::vector<TensorMeta>>& expected =
          std::nullopt) = 0;
  virtual void abort() = 0;
  /// Issues what `send` and `recv` queued since the last computation (a
  /// transport that matches messages by order issues them as one group:
  /// ordered_messages.h); called before each computation and at a lane's
  /// end. A received tensor may be read only after it.
  virtual void flush() {}
};

/// Throws unless `tensors` are what `expected` says (undefined ones pass).
inline void check_received(
    const Tag& tag,
    const Bundle& tensors,
    const std::optional<std::vector<TensorMeta>>& expected) {
  if (!expected) {
    return;
  }
  TORCH_CHECK(
      tensors.size() == expected->size(),
      "gpipe: received the ",
      to_string(tag),
      " with ",
      tensors.size(),
      " tensors, expected ",
      expected->size());
  for (size_t k = 0; k < tensors.size(); ++k) {
    const auto& tensor = tensors[k];
    const auto& meta = (*expected)[k];
    TORCH_CHECK(
        !tensor.defined() ||
            (tensor.sizes() == c10::IntArrayRef(meta.sizes) &&
             tensor.scalar_type() == meta.dtype),
        "gpipe: received the ",
        to_string(tag),
        " with tensor ",
        k,
        " of shape ",
        tensor.sizes(),
        " and dtype ",
        tensor.scalar_type(),
        ", expected shape ",
        c10::IntArrayRef(meta.sizes),
        " and dtype ",
        meta.dtype);
  }
}

/// Lanes of one process: a mailbox per tag. Tensors keep their autograd
/// history, so `forward()` followed by the user's `backward()` crosses lanes
/// (the copy to the receiving stage's device is the runner's, on the
/// receiving lane).
class MailboxTransport final : public Transport {
 public:
  void send(const Tag& tag, Bundle tensors) override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const bool fresh = boxes_.emplace(tag, std::move(tensors)).second;
      TORCH_INTERNAL_ASSERT(fresh, "gpipe: sent twice: ", to_string(tag));
    }
    arrived_.notify_all();
  }

  Bundle recv(
      const Tag& tag,
      const std::optional<std::vector<TensorMeta>>& expected =
          std::nullopt) override {
    std::unique_lock<std::mutex> lock(mutex_);
    auto found = boxes_.end();
    arrived_.wait(lock, [&] {
      found = boxes_.find(tag);
      return aborted_ || found != boxes_.end();
    });
    if (found == boxes_.end()) {
      throw LaneAborted();
    }
    Bundle tensors = std::move(found->second);
    boxes_.erase(found);
    lock.unlock();
    check_received(tag, tensors, expected);
    return tensors;
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
  std::map<Tag, Bundle> boxes_;
  bool aborted_ = false;
};

/// The skip routes as the executor sees them (skip_layout.h): per stage, the
/// channels it receives from an earlier stage and sends to a later one.
/// Note [Skips ride on F and B]
/// A skip needs no action of its own: F(p, i) sends the stashed tensor
/// before it returns, and F(q, i) of the popping stage q > p runs after
/// F(q - 1, i), which runs after F(p, i); backwards, B(q, i) sends the
/// skip's gradient and runs before B(q - 1, i), ..., B(p, i), which receives
/// it. So every program that is valid without skips stays valid with them
/// and the receives never wait on something not yet scheduled.
///
/// Note [A skip is not written between its stash and its pop]
/// In plain training a pop returns the stashed tensor itself: had a layer
/// in between written into it in place (a stashed activation also handed
/// on, then an in-place ReLU), the pop would see the new values and their
/// gradient path. A pipe sends the tensor as its stash left it, with the
/// stash's gradient path, so such a write would silently change the
/// gradients. The version counter tells: the executor records a skip's
/// version when it is sent and checks it when it arrives, and the popping
/// cell checks it again at the pop (skip.h).
struct SkipChannels {
  struct End {
    int64_t channel = 0;
    int64_t peer = 0; // the stage at the other end
    std::string name; // the skip's qualified name, for messages
  };
  std::vector<std::vector<End>> incoming; // per stage
  std::vector<std::vector<End>> outgoing; // per stage
};

/// What a stage does to a micro-batch; the executor calls these in program
/// order, each stage from its own lane's thread only. A stage's inputs are
/// the bundle its predecessor sent, then its incoming skips in channel
/// order; its outputs are the bundle for its successor, then its outgoing
/// skips. Gradients mirror them.
class StageRunner {
 public:
  virtual ~StageRunner() = default;
  /// The first stage's input of micro-batch i.
  virtual Bundle input(int64_t i) = 0;
  /// `x` (received from another lane, or handed over on this one) moved to
  /// stage s's device; `direction` tells which way it travels.
  virtual Bundle move(Bundle x, int64_t s, int64_t i, Direction direction) = 0;
  /// F: stage s on micro-batch i; returns its outputs.
  virtual Bundle forward(int64_t s, int64_t i, Bundle x) = 0;
  /// B (or I when `input_only`): from the gradients of stage s's outputs
  /// (empty for the last stage, whose root is its loss) to the gradients
  /// of its inputs (undefined where there is none).
  virtual Bundle backward(
      int64_t s,
      int64_t i,
      Bundle grad_outputs,
      bool input_only) = 0;
  /// W: the parameter gradients that I(s, i) left.
  virtual void backward_weight(int64_t s, int64_t i) = 0;
};

/// Runs a validated, lowered program: lane l's actions on `lanes[l]` (null:
/// the caller's thread). Activations and gradients that neighbouring stages
/// on one lane hand each other never touch the transport; skips always do.
/// Returns the last stage's outputs per micro-batch (what its F returned).
class Executor {
 public:
  Executor(
      const Program& program,
      StageRunner& runner,
      Transport& transport,
      const SkipChannels* skips = nullptr)
      : program_(program),
        runner_(runner),
        transport_(transport),
        skips_(skips),
        inputs_(grid()),
        outputs_(grid()),
        grad_inputs_(grid()),
        grad_outputs_(grid()) {}

  std::vector<Bundle> run(
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
    std::vector<Bundle> last;
    const auto s = static_cast<size_t>(program_.stages - 1);
    for (auto& output : outputs_[s]) {
      last.push_back(std::move(output));
    }
    return last;
  }

  /// Runs lane `lane` alone, on this thread: a rank of a pipe across
  /// processes runs its own lane while its neighbours' lanes run in other
  /// processes, reached through the transport. Rethrows the lane's failure.
  void run_one_lane(size_t lane) {
    TORCH_INTERNAL_ASSERT(
        lane < program_.lanes.size(),
        "gpipe: lane ",
        lane,
        " of a program with ",
        program_.lanes.size(),
        " lanes");
    run_lane(lane);
    if (failure_) {
      std::rethrow_exception(failure_);
    }
  }

 private:
  using Slots = std::vector<std::vector<Bundle>>;
  using End = SkipChannels::End;

  Slots grid() const {
    return Slots(
        static_cast<size_t>(program_.stages),
        std::vector<Bundle>(static_cast<size_t>(program_.microbatches)));
  }

  static Bundle take(Bundle& slot) {
    return std::exchange(slot, Bundle());
  }

  bool same_lane(int64_t s, int64_t other) const {
    return program_.lane_of_stage[static_cast<size_t>(s)] ==
        program_.lane_of_stage[static_cast<size_t>(other)];
  }

  const std::vector<End>& incoming(int64_t s) const {
    static const std::vector<End> none;
    return skips_ == nullptr ? none : skips_->incoming[static_cast<size_t>(s)];
  }

  const std::vector<End>& outgoing(int64_t s) const {
    static const std::vector<End> none;
    return skips_ == nullptr ? none : skips_->outgoing[static_cast<size_t>(s)];
  }

  /// Receives one skip bundle per channel in `ends` onto stage s, appended
  /// to `into`.
  void receive_skips(
      const std::vector<End>& ends,
      int64_t s,
      int64_t i,
      Direction direction,
      Bundle& into) {
    for (const End& end : ends) {
      const Tag tag{s, i, direction, end.channel};
      Bundle received = transport_.recv(tag);
      if (direction == Direction::Forward) {
        check_skip_unwritten(tag, end.name, received.front());
      }
      Bundle moved = runner_.move(std::move(received), s, i, direction);
      TORCH_INTERNAL_ASSERT(
          moved.size() == 1, "gpipe: a skip is one tensor: ", to_string(tag));
      into.push_back(std::move(moved.front()));
    }
  }

  /// Sends the last `ends.size()` tensors of `from` down their channels.
  void send_skips(
      const std::vector<End>& ends,
      int64_t i,
      Direction direction,
      Bundle& from) {
    TORCH_INTERNAL_ASSERT(
        from.size() >= ends.size(),
        "gpipe: fewer outputs than skips (outputs: ",
        from.size(),
        ", skips: ",
        ends.size(),
        ")");
    const size_t first = from.size() - ends.size();
    for (size_t k = 0; k < ends.size(); ++k) {
      const Tag tag{ends[k].peer, i, direction, ends[k].channel};
      if (direction == Direction::Forward) {
        std::lock_guard<std::mutex> lock(mutex_);
        skip_versions_[tag] = from[first + k]._version();
      }
      transport_.send(tag, Bundle{std::move(from[first + k])});
    }
    from.resize(first);
  }

  /// Note [A skip is not written between its stash and its pop].
  void check_skip_unwritten(
      const Tag& tag,
      const std::string& name,
      const torch::Tensor& skip) {
    uint32_t sent = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const auto found = skip_versions_.find(tag);
      TORCH_INTERNAL_ASSERT(
          found != skip_versions_.end(),
          "gpipe: received a skip never sent: ",
          to_string(tag));
      sent = found->second;
      skip_versions_.erase(found);
    }
    TORCH_CHECK(
        skip._version() == sent,
        "gpipe: skip '",
        name,
        "' was written in place between its stash and its pop (popped by ",
        "partition ",
        tag.stage,
        " on micro-batch ",
        tag.microbatch,
        "); the pipe ",
        "hands the pop the tensor as stashed, with the stash's gradient ",
        "path, so the write would be lost: write into a copy, or stash a ",
        "clone");
  }

  void run_lane(size_t lane) {
    try {
      for (const Action& action : program_.lanes[lane]) {
        if (stopped_.load()) {
          return;
        }
        if (is_compute(action.op)) {
          transport_.flush();
        }
        run_action(action);
      }
      transport_.flush();
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
        Bundle x = s == 0 ? runner_.input(i) : take(inputs_[ss][ii]);
        receive_skips(incoming(s), s, i, Direction::Forward, x);
        Bundle out = runner_.forward(s, i, std::move(x));
        send_skips(outgoing(s), i, Direction::Forward, out);
        if (s < last && same_lane(s, s + 1)) {
          inputs_[ss + 1][ii] =
              runner_.move(std::move(out), s + 1, i, Direction::Forward);
        } else {
          outputs_[ss][ii] = std::move(out);
        }
        break;
      }
      case Op::B:
      case Op::I: {
        Bundle grad_output = s == last ? Bundle() : take(grad_outputs_[ss][ii]);
        receive_skips(outgoing(s), s, i, Direction::Backward, grad_output);
        Bundle grad_input =
            runner_.backward(s, i, std::move(grad_output), action.op == Op::I);
        send_skips(incoming(s), i, Direction::Backward, grad_input);
        if (s > 0 && same_lane(s, s - 1)) {
          grad_outputs_[ss - 1][ii] = runner_.move(
              std::move(grad_input), s - 1, i, Direction::Backward);
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
      case Op::RECV_B:
        grad_outputs_[ss][ii] = runner_.move(
            transport_.recv({s, i, Direction::Backward}),
            s,
            i,
            Direction::Backward);
        break;
    }
  }

  const Program& program_;
  StageRunner& runner_;
  Transport& transport_;
  const SkipChannels* skips_; // null: no skips
  // Per [stage][micro-batch], each touched by the lanes of that stage and its
  // neighbour on the same lane only.
  Slots inputs_; // received or handed over, not yet consumed by F
  Slots outputs_; // produced by F, not yet sent (the last stage's: results)
  Slots grad_inputs_; // produced by B/I, not yet sent
  Slots grad_outputs_; // received or handed over, not yet consumed by B/I
  std::mutex mutex_;
  std::map<Tag, uint32_t> skip_versions_; // sent, not yet received
  std::exception_ptr failure_;
  std::atomic<bool> stopped_{false};
};

} // namespace gpipe::detail
