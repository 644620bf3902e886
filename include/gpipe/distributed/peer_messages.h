// One rank's point-to-point messages over a process group: posted, waited
// for, aborted when another rank fails, and turned into errors that name
// the rank at fault. The transport (transport.h) says what goes in them.
#pragma once

#include <gpipe/distributed/bundle_header.h>
#include <gpipe/distributed/failure.h>
#include <gpipe/distributed/peer_sockets.h>
#include <gpipe/distributed/receives_ahead.h>

#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>
#include <torch/types.h>

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace gpipe::distributed::detail {

/// Point-to-point messages of one rank over `group` (peers are the group's
/// ranks), or over `sockets` where the pipe has its own (Note [Messages
/// over the pipe's own sockets]). Used by the rank's lane, except `abort`,
/// which the watchdog may call.
class PeerMessages {
 public:
  /// `describe(r)` names rank r in errors; `timeout` is the group's.
  PeerMessages(
      c10::intrusive_ptr<c10d::Backend> group,
      FailureBoard& board,
      std::function<std::string(int64_t rank)> describe,
      std::chrono::milliseconds timeout,
      std::shared_ptr<PeerSockets> sockets = nullptr)
      : group_(std::move(group)),
        sockets_(std::move(sockets)),
        board_(board),
        describe_(std::move(describe)),
        timeout_(timeout) {}

  /// Only a failed step leaves messages pending: Gloo may still read from
  /// their buffers (sends) or write into them (receives), so those buffers
  /// outlive this object.
  ~PeerMessages() {
    std::deque<PostedReceive> left = std::move(abandoned_);
    for (auto& control : controls_) {
      left.push_back(std::move(control.second));
    }
    std::vector<Pending> sends;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      sends.swap(sends_);
    }
    if (!left.empty() || !sends.empty()) {
      static std::mutex kept_mutex;
      static std::vector<std::shared_ptr<void>> kept;
      std::lock_guard<std::mutex> lock(kept_mutex);
      kept.push_back(
          std::make_shared<
              std::pair<std::deque<PostedReceive>, std::vector<Pending>>>(
              std::move(left), std::move(sends)));
    }
  }

  PeerMessages(const PeerMessages&) = delete;
  PeerMessages& operator=(const PeerMessages&) = delete;

  /// The group messages go over.
  c10d::Backend& group() {
    return *group_;
  }

  /// How errors name `rank`.
  std::string describe(int64_t rank) const {
    return describe_(rank);
  }

  /// Posts `tensor` to `peer`; it is kept until `finish_sends`.
  void post_send(torch::Tensor tensor, int64_t peer, int tag) {
    std::vector<torch::Tensor> tensors{tensor};
    auto work = sockets_ ? sockets_->send(tensor, peer, tag)
                         : group_->send(tensors, static_cast<int>(peer), tag);
    keep_send(std::move(work), peer, std::move(tensor));
  }

  /// Keeps a send posted elsewhere (a coalesced group) until `finish_sends`.
  void keep_send(
      c10::intrusive_ptr<c10d::Work> work,
      int64_t peer,
      torch::Tensor tensor) {
    std::lock_guard<std::mutex> lock(mutex_);
    sends_.push_back({std::move(work), peer, std::move(tensor)});
  }

  /// Posts the receive of `tensor` from `peer`, to be waited for.
  c10::intrusive_ptr<c10d::Work> post_receive(
      torch::Tensor& tensor,
      int64_t peer,
      int tag) {
    if (sockets_) {
      return sockets_->recv(tensor, peer, tag);
    }
    std::vector<torch::Tensor> tensors{tensor};
    return group_->recv(tensors, static_cast<int>(peer), tag);
  }

  /// Receives into `tensor` from `peer`; `what` names it in errors.
  void receive_into(
      torch::Tensor& tensor,
      int64_t peer,
      int tag,
      const std::string& what) {
    wait(post_receive(tensor, peer, tag), peer, what);
  }

  /// Posts a control message (a step's batch, its loss) to `peer`.
  void send_control(torch::Tensor message, int64_t peer, int64_t kind) {
    post_send(std::move(message), peer, control_tag(kind));
  }

  /// Posts the receive of a control message of known size into `into`, to
  /// be waited for with `wait_control(kind)`.
  void post_control(torch::Tensor into, int64_t peer, int64_t kind) {
    PostedReceive posted;
    posted.peer = peer;
    posted.works.push_back(post_receive(into, peer, control_tag(kind)));
    posted.tensors.push_back(std::move(into));
    TORCH_INTERNAL_ASSERT(
        controls_.emplace(kind, std::move(posted)).second,
        "gpipe: a control message of kind ",
        kind,
        " posted twice");
  }

  /// Waits for the control message of `kind` posted with `post_control`.
  void wait_control(int64_t kind, const std::string& what) {
    const auto found = controls_.find(kind);
    TORCH_INTERNAL_ASSERT(
        found != controls_.end(), "gpipe: ", what, " never posted");
    const auto posted = found->second;
    controls_.erase(found);
    wait(posted.works.front(), posted.peer, what);
  }

  /// Receives a control message of known size into `into`.
  void recv_control(
      torch::Tensor& into,
      int64_t peer,
      int64_t kind,
      const std::string& what) {
    receive_into(into, peer, control_tag(kind), what);
  }

  /// Receives a failed step left posted: kept until this object ends.
  void abandon(std::deque<PostedReceive> receives) {
    for (auto& receive : receives) {
      abandoned_.push_back(std::move(receive));
    }
  }

  /// Waits for every send posted (Note [Sends complete when received]).
  void finish_sends() {
    std::vector<Pending> sends;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      sends.swap(sends_);
    }
    for (auto& send : sends) {
      wait(send.work, send.peer, "a message it was sent");
    }
  }

  /// Aborts the sends pending and the receive waited for; that receive
  /// throws the posted failure (Note [A failed rank stops every rank]).
  void abort() {
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      aborted_ = true;
      for (auto& send : sends_) {
        works.push_back(send.work);
      }
      if (waiting_) {
        works.push_back(waiting_);
      }
    }
    for (auto& work : works) {
      try {
        work->abort();
      } catch (...) {
      }
    }
    if (sockets_) {
      sockets_->abort();
    }
  }

  /// Throws the posted failure if the watchdog aborted this rank's messages
  /// (over NCCL, a lane may run to its end on aborted messages).
  void rethrow_if_aborted() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!aborted_) {
        return;
      }
    }
    const auto posted = board_.find_within(std::chrono::milliseconds(1000));
    TORCH_CHECK(
        false,
        "gpipe: ",
        posted ? *posted : std::string("another rank failed"),
        " (seen at the end of this rank's lane)");
  }

  /// Waits for `work`, a message from or to `peer` (`what` names it); a
  /// failure throws the posted error, or one naming `peer`.
  void wait(
      const c10::intrusive_ptr<c10d::Work>& work,
      int64_t peer,
      const std::string& what) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (aborted_) {
        throw_posted_failure(peer, what, "");
      }
      waiting_ = work;
    }
    bool completed = false;
    std::string error;
    try {
      completed = work->wait();
    } catch (const std::exception& e) {
      error = e.what();
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      waiting_.reset();
    }
    if (completed && error.empty()) {
      return;
    }
    throw_posted_failure(peer, what, error);
  }

  /// Throws the failure another rank posted, or else one naming `peer`,
  /// which failed (or timed out) while this rank waited for `what`.
  [[noreturn]] void throw_posted_failure(
      int64_t peer,
      const std::string& what,
      const std::string& error) {
    const auto posted =
        board_.find_within(std::chrono::milliseconds(error.empty() ? 0 : 1000));
    if (posted) {
      TORCH_CHECK(false, "gpipe: ", *posted);
    }
    const bool timed_out = error.find("imed out") != std::string::npos;
    TORCH_CHECK(
        false,
        "gpipe: ",
        describe_(peer),
        timed_out ? " sent nothing for " + std::to_string(timeout_.count()) +
                " ms (stuck, or slower than WorldOptions::timeout)"
                  : " failed or exited without reporting an error",
        " while this rank waited for ",
        what,
        error.empty() ? "" : " (" + error + ")");
    throw; // unreachable: TORCH_CHECK(false) throws
  }

 private:
  struct Pending {
    c10::intrusive_ptr<c10d::Work> work;
    int64_t peer;
    torch::Tensor keep; // read by Gloo until the send completes
  };

  c10::intrusive_ptr<c10d::Backend> group_;
  std::shared_ptr<PeerSockets> sockets_; // null: messages go over group_
  FailureBoard& board_;
  std::function<std::string(int64_t)> describe_;
  std::chrono::milliseconds timeout_;
  std::map<int64_t, PostedReceive> controls_; // posted, by kind
  std::deque<PostedReceive> abandoned_; // left posted by a failed step
  std::mutex mutex_;
  std::vector<Pending> sends_;
  c10::intrusive_ptr<c10d::Work> waiting_;
  bool aborted_ = false;
};

} // namespace gpipe::distributed::detail
