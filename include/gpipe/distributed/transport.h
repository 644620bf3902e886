// The executor's Transport between processes: bundles as tagged Gloo
// messages, or by order in coalesced groups (NCCL, or Gloo following NCCL's
// rules) once their shapes are agreed (bundle_header.h).
//
// Note [Sends complete when received]
// A Gloo send completes only once the peer has posted the matching receive,
// so two ranks that each send to the other before receiving would wait
// forever if sends were waited at once. Sends are posted and kept (with the
// tensors they read) until the end of the step; only receives block, as
// with the in-process mailboxes, so every program valid in one process is
// valid across processes.
//
// Note [Ordered steps]
// A transport built with an OrderedPath sends the data of a step whose
// shapes were agreed by an earlier step (and not agree_every_time) by
// order (ordered_messages.h): `send` and `recv` queue the tensors, the
// receiver allocating them from the agreed header, and `flush` issues the
// queue as one coalesced group (NCCL) or posts it and waits for all of it
// (Gloo following NCCL's rules, one tag for all). A step that agrees shapes
// goes with tags over the World's Gloo group, staged through the CPU.
#pragma once

#include <gpipe/detail/executor.h>
#include <gpipe/detail/pipe_call.h>
#include <gpipe/distributed/bundle_header.h>
#include <gpipe/distributed/failure.h>
#include <gpipe/distributed/options.h>
#include <gpipe/distributed/peer_messages.h>
#include <gpipe/distributed/placement.h>
#include <gpipe/distributed/receives_ahead.h>
#include <gpipe/distributed/world.h>

#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/types.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace gpipe::distributed::detail {

/// Where a step's data goes when it goes by order (Note [Ordered steps]).
struct OrderedPath {
  c10::intrusive_ptr<c10d::Backend> group;
  /// This pipeline's stage s runs on rank_of_stage[s] of `group`.
  std::vector<int64_t> rank_of_stage;
  /// Where received tensors are allocated.
  torch::Device device = torch::kCPU;
  /// One coalesced group per batch (NCCL); otherwise each message is posted
  /// and the batch waited for (Gloo).
  bool coalesce = false;
};

/// Where this rank's steps go by order, if they do (Note [Ordered steps]):
/// NCCL carries the data of steps whose shapes are agreed, over a group of
/// this pipeline's ranks in position order (stage s is its rank at the
/// stage's position);
/// Gloo does with match_by_order, over the World's group.
inline OrderedPath ordered_path(
    World& world,
    const RankPlacement& placement,
    const DistributedOptions& options,
    const std::string& prefix) {
  OrderedPath path;
  if (placement.nccl) {
    const auto first = placement.rank_of_stage.begin();
    path.group = world.new_nccl_group(
        prefix + "nccl_pipeline_" + std::to_string(placement.replica),
        std::vector<int64_t>(first, first + placement.stages),
        options.device());
    path.rank_of_stage = placement.lane_of_stage();
    path.device = options.device();
    path.coalesce = true;
  } else if (options.match_by_order()) {
    path.group = world.group();
    path.rank_of_stage = placement.rank_of_stage;
  }
  return path;
}

/// This rank's connections to the rest of its pipeline where its messages
/// go over the pipe's own sockets (Note [Messages over the pipe's own
/// sockets]), else none.
inline std::shared_ptr<PeerSockets> pipeline_sockets(
    World& world,
    const RankPlacement& placement,
    const std::string& prefix) {
  if (!placement.sockets) {
    return nullptr;
  }
  return std::make_shared<PeerSockets>(
      world, prefix, placement.pipeline_peers());
}

/// Sends and receives bundles of one pipe between its ranks over `group`
/// (the World's group: peers are global ranks). Used by one thread, the
/// rank's lane, except `abort`, which the watchdog may call.
class ProcessGroupTransport final : public gpipe::detail::Transport {
 public:
  /// `rank_of_stage[s]` is the global rank that runs stage s of this rank's
  /// pipeline; `describe(s)` names a rank for messages.
  ProcessGroupTransport(
      c10::intrusive_ptr<c10d::Backend> group,
      std::vector<int64_t> rank_of_stage,
      FailureBoard& board,
      std::function<std::string(int64_t rank)> describe,
      std::chrono::milliseconds timeout,
      OrderedPath ordered_path = {},
      std::shared_ptr<PeerSockets> sockets = nullptr)
      : messages_(
            std::move(group),
            board,
            std::move(describe),
            timeout,
            std::move(sockets)),
        rank_of_stage_(std::move(rank_of_stage)),
        path_(std::move(ordered_path)) {}

  ~ProcessGroupTransport() override {
    // Only a failed step leaves receives posted (peer_messages.h).
    messages_.abandon(ahead_.release());
  }

  ProcessGroupTransport(const ProcessGroupTransport&) = delete;
  ProcessGroupTransport& operator=(const ProcessGroupTransport&) = delete;

  /// The rank's messages: control messages, sends to finish, failures.
  PeerMessages& messages() {
    return messages_;
  }

  /// Aborts every pending message; the blocked receive throws the posted
  /// failure (Note [A failed rank stops every rank]).
  void abort() override {
    messages_.abort();
    if (path_.coalesce) {
      // NCCL's kernels wait on the GPU, where aborting a Work cannot reach
      // them: aborting the communicator ends them.
      try {
        path_.group->abort();
      } catch (...) {
      }
    }
  }

  /// Whether a step under `signature` may go by order: an earlier step of
  /// that signature completed, so both ends of every message hold its
  /// header (Note [Ordered steps]).
  bool can_order(int64_t signature) const {
    return path_.group && headers_.completed(signature);
  }

  /// A step starts (Note [Shapes are agreed once per batch shape]):
  /// `call`'s `output_is_list` flags are what headers carry and set;
  /// headers agreed under `signature` are reused unless `agree_every_time`.
  /// `receives` lists the lane's receives in program order, to post ahead
  /// (Note [Receives are posted ahead]).
  void begin(
      gpipe::detail::PipeCall* call,
      int64_t signature,
      bool agree_every_time,
      bool ordered = false,
      LaneReceives receives = {}) {
    TORCH_INTERNAL_ASSERT(
        !ordered || (can_order(signature) && !agree_every_time),
        "gpipe: a step by order before its shapes were agreed");
    call_ = call;
    agree_every_time_ = agree_every_time;
    ordered_ = ordered;
    headers_.begin(signature);
    ahead_.begin(std::move(receives));
  }

  /// The step's lane ended without an error on this rank.
  void end() {
    TORCH_INTERNAL_ASSERT(
        ahead_.drained(), "gpipe: a lane ended with receives still posted");
    call_ = nullptr;
    if (!agree_every_time_) {
      headers_.complete();
    }
  }

  void send(const Tag& tag, Bundle tensors) override {
    TORCH_CHECK(
        static_cast<int64_t>(tensors.size()) <= kMaxBundle,
        "gpipe: stage ",
        tag.stage - 1,
        " hands on ",
        tensors.size(),
        " tensors; across processes a bundle holds at most ",
        kMaxBundle);
    const int64_t peer = rank_of_stage_[static_cast<size_t>(tag.stage)];
    const bool is_list = tag.direction == Direction::Forward &&
        call_ != nullptr &&
        call_->output_is_list[static_cast<size_t>(tag.stage - 1)].load() == 1;
    auto header = encode_header(tensors, is_list, to_string(tag));
    const auto* agreed = headers_.find(tag);
    TORCH_INTERNAL_ASSERT(
        !ordered_ || agreed != nullptr,
        "gpipe: no agreed header for the ",
        to_string(tag));
    if (agree_every_time_ || agreed == nullptr) {
      messages_.post_send(
          torch::tensor(header, torch::kInt64), peer, wire_tag(tag, 0));
      if (!agree_every_time_) {
        headers_.agree(tag, std::move(header));
      }
    } else {
      TORCH_CHECK(
          *agreed == header,
          "gpipe: the ",
          to_string(tag),
          " has shapes ",
          describe_header(header),
          " but an earlier step with the same input shapes sent ",
          describe_header(*agreed),
          "; for a model whose shapes depend on more than the input's, set ",
          "DistributedOptions::agree_shapes_every_step(true)");
    }
    for (size_t k = 0; k < tensors.size(); ++k) {
      if (!tensors[k].defined()) {
        continue;
      }
      torch::NoGradGuard no_grad;
      if (ordered_) {
        queue_.push_back(
            {tensors[k].detach().to(path_.device).contiguous(),
             peer,
             path_.rank_of_stage[static_cast<size_t>(tag.stage)],
             true,
             to_string(tag)});
      } else {
        messages_.post_send(
            tensors[k].detach().to(torch::kCPU).contiguous(),
            peer,
            wire_tag(tag, static_cast<int64_t>(k + 1)));
      }
    }
  }

  Bundle recv(
      const Tag& tag,
      const std::optional<std::vector<gpipe::detail::TensorMeta>>& expected)
      override {
    if (auto posted = ahead_.take(
            tag, [this](const Tag& t) { return post_receive(t); })) {
      const std::string what = to_string(tag);
      for (const auto& work : posted->works) {
        messages_.wait(work, posted->peer, what);
      }
      gpipe::detail::check_received(tag, posted->tensors, expected);
      return std::move(posted->tensors);
    }
    const int64_t from = sender_of(tag);
    const int64_t peer = rank_of_stage_[static_cast<size_t>(from)];
    const std::string what = to_string(tag);
    const auto* agreed = headers_.find(tag);
    TORCH_INTERNAL_ASSERT(
        !ordered_ || agreed != nullptr,
        "gpipe: no agreed header for the ",
        what);
    if (agree_every_time_ || agreed == nullptr) {
      auto received = torch::empty({kHeaderSize}, torch::kInt64);
      messages_.receive_into(received, peer, wire_tag(tag, 0), what);
      const int64_t* data = received.data_ptr<int64_t>();
      std::vector<int64_t> header(data, data + kHeaderSize);
      if (agree_every_time_) {
        last_header_ = std::move(header);
      } else {
        agreed = &headers_.agree(tag, std::move(header));
      }
    }
    const int64_t* h = agree_every_time_ ? last_header_.data() : agreed->data();
    Bundle tensors = allocate_from_header(
        h,
        ordered_ ? path_.device : torch::Device(torch::kCPU),
        what,
        messages_.describe(peer));
    if (tag.direction == Direction::Forward && call_ != nullptr) {
      call_->output_is_list[static_cast<size_t>(from)].store(h[1] ? 1 : 0);
    }
    for (size_t k = 0; k < tensors.size(); ++k) {
      auto& tensor = tensors[k];
      if (!tensor.defined()) {
        continue;
      }
      if (ordered_) {
        queue_.push_back(
            {tensor,
             peer,
             path_.rank_of_stage[static_cast<size_t>(from)],
             false,
             what});
      } else {
        messages_.receive_into(
            tensor, peer, wire_tag(tag, static_cast<int64_t>(k + 1)), what);
      }
    }
    gpipe::detail::check_received(tag, tensors, expected);
    return tensors;
  }

  /// Issues the queued batch (Note [Ordered steps]).
  void flush() override {
    if (queue_.empty()) {
      return;
    }
    std::vector<Queued> batch;
    batch.swap(queue_);
    auto& group = *path_.group;
    if (path_.coalesce) {
      c10::intrusive_ptr<c10d::Work> work;
      std::string what = batch.front().what;
      try {
        group.startCoalescing();
        for (auto& message : batch) {
          std::vector<torch::Tensor> tensors{message.tensor};
          const auto peer = static_cast<int>(message.group_peer);
          if (message.is_send) {
            group.send(tensors, peer, 0);
          } else {
            group.recv(tensors, peer, 0);
          }
        }
        work = group.endCoalescing();
      } catch (const std::exception& e) {
        messages_.throw_posted_failure(batch.front().peer, what, e.what());
      }
      // NCCL's wait makes the current stream wait: the lane's next
      // computation reads what arrived only after it has.
      messages_.wait(work, batch.front().peer, what);
      for (auto& message : batch) {
        if (message.is_send) {
          messages_.keep_send(work, message.peer, std::move(message.tensor));
        }
      }
      return;
    }
    const int tag = static_cast<int>(kOrderedCode << 24);
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    for (auto& message : batch) {
      std::vector<torch::Tensor> tensors{message.tensor};
      const auto peer = static_cast<int>(message.group_peer);
      works.push_back(
          message.is_send ? group.send(tensors, peer, tag)
                          : group.recv(tensors, peer, tag));
    }
    for (size_t k = 0; k < works.size(); ++k) {
      messages_.wait(
          works[k],
          batch[k].peer,
          batch[k].is_send ? "the receive of the " + batch[k].what
                           : batch[k].what);
    }
  }

 private:
  struct Queued {
    torch::Tensor tensor;
    int64_t peer; // the World's rank, for messages
    int64_t group_peer; // the ordered path's rank
    bool is_send;
    std::string what;
  };

  static int64_t sender_of(const Tag& tag) {
    return tag.direction == Direction::Forward ? tag.stage - 1 : tag.stage + 1;
  }

  /// Posts the receive of `tag` when its header is agreed and it goes by
  /// tag (Note [Receives are posted ahead]).
  std::optional<PostedReceive> post_receive(const Tag& tag) {
    const auto* agreed = headers_.find(tag);
    if (ordered_ || agree_every_time_ || agreed == nullptr) {
      return std::nullopt;
    }
    const int64_t from = sender_of(tag);
    PostedReceive posted;
    posted.tag = tag;
    posted.peer = rank_of_stage_[static_cast<size_t>(from)];
    posted.tensors = allocate_from_header(
        agreed->data(),
        torch::kCPU,
        to_string(tag),
        messages_.describe(posted.peer));
    if (tag.direction == Direction::Forward && call_ != nullptr) {
      call_->output_is_list[static_cast<size_t>(from)].store(
          (*agreed)[1] ? 1 : 0);
    }
    for (size_t k = 0; k < posted.tensors.size(); ++k) {
      if (posted.tensors[k].defined()) {
        posted.works.push_back(messages_.post_receive(
            posted.tensors[k],
            posted.peer,
            wire_tag(tag, static_cast<int64_t>(k + 1))));
      }
    }
    return posted;
  }

  PeerMessages messages_;
  std::vector<int64_t> rank_of_stage_;
  OrderedPath path_;
  bool ordered_ = false; // this step
  std::vector<Queued> queue_; // by order, not yet issued
  ReceivesAhead ahead_; // by tag, posted before the lane needs them
  AgreedHeaders headers_;
  gpipe::detail::PipeCall* call_ = nullptr;
  bool agree_every_time_ = false;
  std::vector<int64_t> last_header_; // when agreeing every time
};

/// The transport of a pipe placed as `placement`: its messages over the
/// World's group, the ordered path and the pipe's own sockets as the
/// options and the placement say.
inline std::unique_ptr<ProcessGroupTransport> pipe_transport(
    World& world,
    const RankPlacement& placement,
    const DistributedOptions& options,
    const std::string& prefix,
    FailureBoard& board) {
  return std::make_unique<ProcessGroupTransport>(
      world.group(),
      placement.rank_of_stage,
      board,
      [placement](int64_t rank) { return placement.describe(rank); },
      world.timeout(),
      ordered_path(world, placement, options, prefix),
      pipeline_sockets(world, placement, prefix));
}

/// Sends `message` to every other rank of this rank's pipeline, tagged
/// `tag` (the batch's header, the step's loss).
inline void tell_the_pipeline(
    ProcessGroupTransport& transport,
    const RankPlacement& placement,
    const torch::Tensor& message,
    int64_t tag) {
  for (const int64_t peer : placement.pipeline_peers()) {
    transport.messages().send_control(message.clone(), peer, tag);
  }
}

} // namespace gpipe::distributed::detail
