// Receives posted before the lane needs them, so that a message whose
// receive is posted goes out the moment its sender sends it.
//
// Note [Receives are posted ahead]
// Gloo sends a tensor to an unbound buffer by rendezvous: the sender
// announces it, the receiver answers once it has posted the receive, and
// only then does the data go, each leg a wake-up of the peer's loop thread.
// A receive posted only when the lane reaches it puts all three legs on the
// critical path; one posted earlier has answered before the send, so the
// sender's own thread writes the data at once and it is read in the
// background while the lane still computes. So, once a step's shapes are
// agreed (Note [Shapes are agreed once per batch shape]), a rank keeps the
// receives of the next `depth` messages of its lane posted, in program
// order. `depth` is the most micro-batches the lane's schedule holds at
// once (at least 2): fill-drain posts every forward receive at the start,
// 1F1B on stage j about K - j, so the buffers posted early are at most as
// many as the inputs the schedule keeps anyway. A step that agrees shapes
// posts nothing ahead: its receives wait for headers.
#pragma once

#include <gpipe/detail/bundle.h>
#include <gpipe/detail/executor.h>
#include <gpipe/program.h>

#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include <algorithm>
#include <cstdint>
#include <deque>
#include <functional>
#include <optional>
#include <utility>
#include <vector>

namespace gpipe::distributed::detail {

inline bool same_tag(const gpipe::detail::Tag& a, const gpipe::detail::Tag& b) {
  return !(a < b) && !(b < a);
}

/// A lane's receives in program order, and how many to keep posted ahead
/// (Note [Receives are posted ahead]).
struct LaneReceives {
  std::vector<gpipe::detail::Tag> tags;
  size_t depth = 2;
};

/// The receives of `lane` (one lane of a program) and its depth: the most
/// micro-batches it holds at once, from a forward to the end of its
/// backward (its W when the backward is split).
inline LaneReceives receives_of(const std::vector<Action>& lane) {
  LaneReceives receives;
  int64_t held = 0;
  int64_t most = 0;
  for (const Action& action : lane) {
    switch (action.op) {
      case Op::RECV_F:
      case Op::RECV_B:
        receives.tags.push_back(
            {action.stage,
             action.microbatch,
             action.op == Op::RECV_F ? gpipe::detail::Direction::Forward
                                     : gpipe::detail::Direction::Backward});
        break;
      case Op::F:
        most = std::max(most, ++held);
        break;
      case Op::B:
      case Op::W:
        --held;
        break;
      default:
        break;
    }
  }
  receives.depth = static_cast<size_t>(std::max<int64_t>(2, most));
  return receives;
}

/// A bundle's receives, posted; the tensors fill once the works complete.
struct PostedReceive {
  gpipe::detail::Tag tag;
  int64_t peer = 0;
  gpipe::detail::Bundle tensors;
  std::vector<c10::intrusive_ptr<c10d::Work>> works; // per defined tensor
};

/// The lane's receives in program order, the next `depth` of them posted
/// (Note [Receives are posted ahead]). Used by the lane's thread only.
class ReceivesAhead {
 public:
  /// Posts the receive of a tag, or answers nothing when it cannot be
  /// posted ahead (its shapes are not agreed).
  using Post =
      std::function<std::optional<PostedReceive>(const gpipe::detail::Tag&)>;

  /// A step starts: the lane will receive `receives.tags`, in this order.
  void begin(LaneReceives receives) {
    TORCH_INTERNAL_ASSERT(
        posted_.empty(), "gpipe: receives of an earlier step still posted");
    tags_ = std::move(receives.tags);
    depth_ = receives.depth;
    next_ = 0;
    next_to_post_ = 0;
  }

  /// The receive of `tag`, the lane's next, posted now if it was not yet;
  /// nothing when it cannot be posted (the caller receives it itself).
  /// Posts the following ones up to `depth` ahead first.
  std::optional<PostedReceive> take(
      const gpipe::detail::Tag& tag,
      const Post& post) {
    if (next_ >= tags_.size()) {
      return std::nullopt; // a step that listed no receives
    }
    TORCH_INTERNAL_ASSERT(
        same_tag(tags_[next_], tag),
        "gpipe: the lane receives the ",
        to_string(tag),
        " where its program has the ",
        to_string(tags_[next_]));
    while (next_to_post_ < tags_.size() && next_to_post_ <= next_ + depth_) {
      auto posted = post(tags_[next_to_post_]);
      if (!posted) {
        break;
      }
      posted_.push_back(std::move(*posted));
      ++next_to_post_;
    }
    ++next_;
    if (!posted_.empty() && same_tag(posted_.front().tag, tag)) {
      auto front = std::move(posted_.front());
      posted_.pop_front();
      return front;
    }
    next_to_post_ = std::max(next_to_post_, next_);
    return std::nullopt;
  }

  /// Receives posted and not taken: only after a failure, when the lane
  /// stopped early. Gloo may still write into their buffers.
  std::deque<PostedReceive> release() {
    tags_.clear();
    next_ = next_to_post_ = 0;
    return std::exchange(posted_, {});
  }

  /// Whether every listed receive was taken.
  bool drained() const {
    return posted_.empty() && next_ == tags_.size();
  }

 private:
  std::vector<gpipe::detail::Tag> tags_;
  size_t depth_ = 0;
  size_t next_ = 0; // index in tags_ of the lane's next receive
  size_t next_to_post_ = 0; // index in tags_ of the next receive to post
  std::deque<PostedReceive> posted_; // tags_[next_ ..] in order
};

} // namespace gpipe::distributed::detail
