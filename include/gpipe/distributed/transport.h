// The executor's Transport between processes: bundles as tagged Gloo
// messages, or by order in coalesced groups (NCCL, or Gloo following NCCL's
// rules) once their shapes are agreed.
//
// Note [Shapes are agreed once per batch shape]
// A receiver must allocate exactly what arrives, and a pipe learns its
// activations' shapes only by running (a batch of another size, a last
// micro-batch smaller than the others, a layer that returns a list). So the
// first time a bundle travels for a given step signature (the batch's
// shapes and dtypes, which the first stage tells every rank at the start of
// a step) it is preceded by a small fixed-size header: how many tensors,
// whether they form a list, and each tensor's dtype, shape and
// requires_grad. Both ends keep that header; in later steps of the same
// signature the bundle travels without one (on Gloo every message costs a
// round trip), and the sender checks that what it sends is what was agreed:
// a model whose shapes change under the same input shapes gets a `gpipe:`
// error naming DistributedOptions::agree_shapes_every_step, which sends the
// header every time. Nothing is ever reinterpreted.
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
//
// Note [A failed rank stops every rank]
// A rank that fails writes its error to the store (the first one wins) and
// aborts its pending messages. While a step runs, a watchdog on every rank
// polls the store and, once an error is there, aborts the receive the rank
// is blocked in, which then throws that error naming the failed rank. A
// rank that died without reporting (exit, SIGKILL) closes its connections,
// so its peers' receives fail within the second; a rank stuck forever lets
// its peers time out after WorldOptions::timeout. Ranks further away fail
// the same way once their neighbour stops.
#pragma once

#include <gpipe/detail/executor.h>
#include <gpipe/detail/stage.h>

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
#include <functional>
#include <iterator>
#include <map>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace gpipe::distributed::detail {

using gpipe::detail::Bundle;
using gpipe::detail::Direction;
using gpipe::detail::Tag;

/// Where ranks post the first failure of a pipe (Note [A failed rank stops
/// every rank]).
class FailureBoard {
 public:
  FailureBoard(c10::intrusive_ptr<c10d::Store> store, std::string prefix)
      : store_(std::move(store)), prefix_(std::move(prefix)) {}

  /// Posts `message` unless another rank posted first. Never throws: the
  /// store may be gone with the rank that hosted it.
  void post(const std::string& message) noexcept {
    try {
      if (store_->add(prefix_ + "failures", 1) == 1) {
        store_->set(prefix_ + "error", bytes(message));
      }
    } catch (...) {
    }
  }

  /// The posted failure, if any (and the store still answers).
  std::optional<std::string> find() noexcept {
    try {
      if (store_->check({prefix_ + "error"})) {
        const auto value = store_->get(prefix_ + "error");
        return std::string(value.begin(), value.end());
      }
    } catch (...) {
    }
    return std::nullopt;
  }

  /// `find()`, retried for up to `wait`: a failed rank posts its error
  /// just before it exits, so a peer that sees the connection close may
  /// look a moment early.
  std::optional<std::string> find_within(std::chrono::milliseconds wait) {
    const auto until = std::chrono::steady_clock::now() + wait;
    while (true) {
      if (auto found = find()) {
        return found;
      }
      if (std::chrono::steady_clock::now() >= until) {
        return std::nullopt;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }

 private:
  static std::vector<uint8_t> bytes(const std::string& text) {
    return {text.begin(), text.end()};
  }

  c10::intrusive_ptr<c10d::Store> store_;
  std::string prefix_;
};

/// Gloo tags: (channel, direction) in bits 24-30, stage in 17-23, micro-batch
/// in 5-16, the message's index within its bundle in 0-4 (0: the header).
/// Code 127 is the pipe's own control messages.
constexpr int64_t kMaxStages = 128;
constexpr int64_t kMaxMicrobatches = 4096;
constexpr int64_t kMaxBundle = 31;
constexpr int64_t kControlCode = 127;
constexpr int64_t kOrderedCode = 126; // Gloo's one tag when by order
constexpr int64_t kHeaderSize = 160;

inline int wire_tag(const Tag& tag, int64_t k) {
  const int64_t code =
      tag.channel * 2 + (tag.direction == Direction::Backward ? 1 : 0);
  return static_cast<int>(
      (code << 24) | (tag.stage << 17) | (tag.microbatch << 5) | k);
}

inline int control_tag(int64_t kind) {
  return static_cast<int>((kControlCode << 24) | kind);
}

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
      OrderedPath ordered_path = {})
      : group_(std::move(group)),
        rank_of_stage_(std::move(rank_of_stage)),
        board_(board),
        describe_(std::move(describe)),
        timeout_(timeout),
        path_(std::move(ordered_path)) {}

  /// Whether a step under `signature` may go by order: an earlier step of
  /// that signature completed, so both ends of every message hold its
  /// header (Note [Ordered steps]).
  bool can_order(int64_t signature) const {
    return path_.group &&
        std::find(completed_.begin(), completed_.end(), signature) !=
        completed_.end();
  }

  /// A step starts (Note [Shapes are agreed once per batch shape]):
  /// `call`'s `output_is_list` flags are what headers carry and set;
  /// headers agreed under `signature` are reused unless `agree_every_time`.
  void begin(
      gpipe::detail::PipeCall* call,
      int64_t signature,
      bool agree_every_time,
      bool ordered = false) {
    TORCH_INTERNAL_ASSERT(
        !ordered || (can_order(signature) && !agree_every_time),
        "gpipe: a step by order before its shapes were agreed");
    call_ = call;
    signature_ = signature;
    agree_every_time_ = agree_every_time;
    ordered_ = ordered;
    if (std::find(signatures_.begin(), signatures_.end(), signature) ==
        signatures_.end()) {
      signatures_.push_back(signature);
      if (signatures_.size() > kSignaturesKept) {
        // Every rank of the pipeline sees the same signatures in the same
        // order, so both ends of each link forget the same ones.
        const int64_t oldest = signatures_.front();
        signatures_.erase(signatures_.begin());
        for (auto it = agreed_.begin(); it != agreed_.end();) {
          it = it->first.front() == oldest ? agreed_.erase(it) : std::next(it);
        }
        completed_.erase(
            std::remove(completed_.begin(), completed_.end(), oldest),
            completed_.end());
      }
    }
  }

  /// The step's lane ended without an error on this rank.
  void end() {
    call_ = nullptr;
    if (!agree_every_time_ &&
        std::find(completed_.begin(), completed_.end(), signature_) ==
            completed_.end()) {
      completed_.push_back(signature_);
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
    std::vector<int64_t> header{static_cast<int64_t>(tensors.size()), is_list};
    for (const auto& tensor : tensors) {
      header.push_back(tensor.defined());
      if (!tensor.defined()) {
        continue;
      }
      header.push_back(static_cast<int64_t>(tensor.scalar_type()));
      header.push_back(tensor.requires_grad());
      header.push_back(tensor.dim());
      for (const int64_t size : tensor.sizes()) {
        header.push_back(size);
      }
    }
    TORCH_CHECK(
        static_cast<int64_t>(header.size()) <= kHeaderSize,
        "gpipe: the ",
        to_string(tag),
        " has too many tensors or dimensions to describe in one header (",
        header.size(),
        " numbers, at most ",
        kHeaderSize,
        ")");
    header.resize(kHeaderSize, 0);
    const auto key = key_of(tag);
    const auto agreed = agreed_.find(key);
    TORCH_INTERNAL_ASSERT(
        !ordered_ || agreed != agreed_.end(),
        "gpipe: no agreed header for the ",
        to_string(tag));
    if (agree_every_time_ || agreed == agreed_.end()) {
      post_send(torch::tensor(header, torch::kInt64), peer, wire_tag(tag, 0));
      if (!agree_every_time_) {
        agreed_.emplace(key, header);
      }
    } else {
      TORCH_CHECK(
          agreed->second == header,
          "gpipe: the ",
          to_string(tag),
          " has shapes ",
          describe_header(header),
          " but an earlier step with the same input shapes sent ",
          describe_header(agreed->second),
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
        post_send(
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
    const int64_t from =
        tag.direction == Direction::Forward ? tag.stage - 1 : tag.stage + 1;
    const int64_t peer = rank_of_stage_[static_cast<size_t>(from)];
    const std::string what = to_string(tag);
    const auto key = key_of(tag);
    auto agreed = agreed_.find(key);
    TORCH_INTERNAL_ASSERT(
        !ordered_ || agreed != agreed_.end(),
        "gpipe: no agreed header for the ",
        what);
    if (agree_every_time_ || agreed == agreed_.end()) {
      auto received = torch::empty({kHeaderSize}, torch::kInt64);
      receive_into(received, peer, wire_tag(tag, 0), what);
      const int64_t* data = received.data_ptr<int64_t>();
      std::vector<int64_t> header(data, data + kHeaderSize);
      if (agree_every_time_) {
        last_header_ = std::move(header);
      } else {
        agreed = agreed_.emplace(key, std::move(header)).first;
      }
    }
    const int64_t* h =
        agree_every_time_ ? last_header_.data() : agreed->second.data();
    const int64_t count = h[0];
    TORCH_CHECK(
        count >= 0 && count <= kMaxBundle,
        "gpipe: a corrupt header for the ",
        what,
        " from ",
        describe_(peer),
        " (",
        count,
        " tensors)");
    if (tag.direction == Direction::Forward && call_ != nullptr) {
      call_->output_is_list[static_cast<size_t>(from)].store(h[1] ? 1 : 0);
    }
    Bundle tensors(static_cast<size_t>(count));
    size_t at = 2;
    for (int64_t k = 0; k < count; ++k) {
      if (h[at++] == 0) {
        continue;
      }
      const auto dtype = static_cast<c10::ScalarType>(h[at++]);
      const bool requires_grad = h[at++] != 0;
      const int64_t dim = h[at++];
      TORCH_CHECK(
          dim >= 0 && at + static_cast<size_t>(dim) <= kHeaderSize,
          "gpipe: a corrupt header for the ",
          what,
          " from ",
          describe_(peer));
      std::vector<int64_t> sizes(h + at, h + at + dim);
      at += static_cast<size_t>(dim);
      auto tensor = torch::empty(
          sizes,
          torch::TensorOptions().dtype(dtype).device(
              ordered_ ? path_.device : torch::Device(torch::kCPU)));
      if (ordered_) {
        queue_.push_back(
            {tensor,
             peer,
             path_.rank_of_stage[static_cast<size_t>(from)],
             false,
             what});
      } else {
        receive_into(tensor, peer, wire_tag(tag, k + 1), what);
      }
      if (requires_grad) {
        tensor.requires_grad_(true);
      }
      tensors[static_cast<size_t>(k)] = std::move(tensor);
    }
    gpipe::detail::check_received(tag, tensors, expected);
    return tensors;
  }

  /// Posts a control message (a step's batch, its loss) to `peer`.
  void send_control(torch::Tensor message, int64_t peer, int64_t kind) {
    post_send(std::move(message), peer, control_tag(kind));
  }

  /// Receives a control message of known size into `into`.
  void recv_control(
      torch::Tensor& into,
      int64_t peer,
      int64_t kind,
      const std::string& what) {
    receive_into(into, peer, control_tag(kind), what);
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

  /// Aborts every pending message; the blocked receive throws the posted
  /// failure (Note [A failed rank stops every rank]).
  void abort() override {
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
    if (path_.coalesce) {
      // NCCL's kernels wait on the GPU, where aborting a Work cannot reach
      // them: aborting the communicator ends them.
      try {
        path_.group->abort();
      } catch (...) {
      }
    }
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
        throw_posted_failure(batch.front().peer, what, e.what());
      }
      // NCCL's wait makes the current stream wait: the lane's next
      // computation reads what arrived only after it has.
      wait(work, batch.front().peer, what);
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto& message : batch) {
        if (message.is_send) {
          sends_.push_back({work, message.peer, std::move(message.tensor)});
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
      wait(
          works[k],
          batch[k].peer,
          batch[k].is_send ? "the receive of the " + batch[k].what
                           : batch[k].what);
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

 private:
  static constexpr size_t kSignaturesKept = 16;
  using Key = std::array<int64_t, 5>; // signature, then the tag

  Key key_of(const Tag& tag) const {
    return {
        signature_,
        tag.stage,
        tag.microbatch,
        tag.direction == Direction::Forward ? 0 : 1,
        tag.channel};
  }

  /// "[2, 5] Double, undefined" for a message.
  static std::string describe_header(const std::vector<int64_t>& h) {
    std::ostringstream text;
    size_t at = 2;
    for (int64_t k = 0; k < h[0]; ++k) {
      text << (k == 0 ? "" : ", ");
      if (h[at++] == 0) {
        text << "undefined";
        continue;
      }
      const auto dtype = static_cast<c10::ScalarType>(h[at++]);
      ++at; // requires_grad
      const auto dim = static_cast<size_t>(h[at++]);
      text << c10::IntArrayRef(h.data() + at, dim) << " " << dtype;
      at += dim;
    }
    return text.str();
  }

  struct Queued {
    torch::Tensor tensor;
    int64_t peer; // the World's rank, for messages
    int64_t group_peer; // the ordered path's rank
    bool is_send;
    std::string what;
  };

  struct Pending {
    c10::intrusive_ptr<c10d::Work> work;
    int64_t peer;
    torch::Tensor keep; // read by Gloo until the send completes
  };

  void post_send(torch::Tensor tensor, int64_t peer, int tag) {
    std::vector<torch::Tensor> tensors{tensor};
    auto work = group_->send(tensors, static_cast<int>(peer), tag);
    std::lock_guard<std::mutex> lock(mutex_);
    sends_.push_back({std::move(work), peer, std::move(tensor)});
  }

  void receive_into(
      torch::Tensor& tensor,
      int64_t peer,
      int tag,
      const std::string& what) {
    std::vector<torch::Tensor> tensors{tensor};
    auto work = group_->recv(tensors, static_cast<int>(peer), tag);
    wait(work, peer, what);
  }

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

  c10::intrusive_ptr<c10d::Backend> group_;
  std::vector<int64_t> rank_of_stage_;
  FailureBoard& board_;
  std::function<std::string(int64_t)> describe_;
  std::chrono::milliseconds timeout_;
  OrderedPath path_;
  bool ordered_ = false; // this step
  std::vector<Queued> queue_; // by order, not yet issued
  std::vector<int64_t> completed_; // signatures whose shapes are agreed
  gpipe::detail::PipeCall* call_ = nullptr;
  int64_t signature_ = 0;
  bool agree_every_time_ = false;
  std::vector<int64_t> signatures_; // oldest first
  std::map<Key, std::vector<int64_t>> agreed_; // headers, per link and step
  std::vector<int64_t> last_header_; // when agreeing every time
  std::mutex mutex_;
  std::vector<Pending> sends_;
  c10::intrusive_ptr<c10d::Work> waiting_;
  bool aborted_ = false;
};

/// Polls the FailureBoard while a step runs and aborts the transport once
/// another rank posted a failure (Note [A failed rank stops every rank]).
class Watchdog {
 public:
  Watchdog(FailureBoard& board, ProcessGroupTransport& transport)
      : thread_([this, &board, &transport] {
          std::unique_lock<std::mutex> lock(mutex_);
          while (!stop_) {
            if (stopped_.wait_for(lock, std::chrono::milliseconds(50), [&] {
                  return stop_;
                })) {
              break;
            }
            lock.unlock();
            const bool failed = board.find().has_value();
            if (failed) {
              transport.abort();
            }
            lock.lock();
            if (failed) {
              break;
            }
          }
        }) {}

  ~Watchdog() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    stopped_.notify_all();
    thread_.join();
  }

  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

 private:
  std::mutex mutex_;
  std::condition_variable stopped_;
  bool stop_ = false;
  std::thread thread_; // last: starts once the members above exist
};

} // namespace gpipe::distributed::detail
