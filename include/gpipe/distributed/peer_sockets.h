// A pipeline's point-to-point messages over TCP connections of the pipe's
// own (Backend::Sockets): one write per message where Gloo makes three.
//
// Note [Messages over the pipe's own sockets]
// Gloo sends a tensor by rendezvous (Note [Receives are posted ahead]):
// the receive writes a "ready to receive" notice, the send a "ready to
// send" notice and then the data, and each lands on the peer's loop thread,
// which hands it on to the waiting thread. On 2 cores with 4 ranks that was
// 60% of a zero-cost step's CPU (issue 25's breakdown). Backend::Sockets
// connects every pair of a pipeline's ranks once, when the pipe is built,
// and sends each message as one writev of a 16-byte header (tag, bytes)
// and the tensor's bytes, from the sending thread. A reader thread per
// connection reads every message as it arrives, into the receive posted for
// its tag (FIFO per tag, as Gloo matches) or, when none is posted yet, into
// a buffer the receive later copies from. Because the reader always reads,
// a send never waits for the peer's receive, so two ranks that send to each
// other before receiving cannot block (Note [Sends complete when received]
// holds trivially). Failures keep their shape: a closed connection (a rank
// that exited) fails the receives from it, a receive waits at most the
// World's timeout ("timed out"), a send to a stuck rank whose buffers are
// full times out likewise, and aborting shuts every connection so a blocked
// read or write returns at once. Replica and tie sums stay on Gloo.
#pragma once

#include <gpipe/distributed/world.h>

#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>
#include <torch/types.h>

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace gpipe::distributed::detail {

/// One message over a PeerSockets connection, as a c10d::Work so that
/// PeerMessages waits for and aborts it as it does Gloo's. A wait without
/// a timeout waits the World's; it finishes once, with the tensor filled
/// (a receive), written (a send) or an error.
class SocketMessage final : public c10d::Work {
 public:
  SocketMessage(torch::Tensor tensor, std::chrono::milliseconds timeout)
      : tensor_(std::move(tensor)), timeout_(timeout) {}

  bool wait(std::chrono::milliseconds timeout = kNoTimeout) override {
    const auto limit = timeout == kNoTimeout ? timeout_ : timeout;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      if (!cv_.wait_for(lock, limit, [&] { return completed_; })) {
        throw std::runtime_error(
            "timed out after " + std::to_string(limit.count()) + " ms");
      }
    }
    return c10d::Work::wait(kNoTimeout); // finished: throws its error
  }

  void abort() override {
    fail("aborted: another rank failed");
  }

  /// Finishes the message, unless it finished already.
  void complete() {
    if (!finished_.exchange(true)) {
      finish();
    }
  }

  /// Fails the message with `why`, unless it finished already.
  void fail(const std::string& why) {
    if (!finished_.exchange(true)) {
      finish(std::make_exception_ptr(std::runtime_error(why)));
    }
  }

  torch::Tensor& tensor() {
    return tensor_;
  }

  size_t bytes() const {
    return tensor_.nbytes();
  }

 private:
  torch::Tensor tensor_; // kept until the message finishes
  std::chrono::milliseconds timeout_;
  std::atomic<bool> finished_{false};
};

namespace sockets {

/// The errno text of the last failed call.
inline std::string last_error() {
  return std::strerror(errno);
}

/// Reads exactly `bytes` into `into`; false once the connection closed or
/// failed (`error` says which).
inline bool read_all(int fd, void* into, size_t bytes, std::string& error) {
  auto* at = static_cast<char*>(into);
  while (bytes > 0) {
    const ssize_t got = ::recv(fd, at, bytes, 0);
    if (got > 0) {
      at += got;
      bytes -= static_cast<size_t>(got);
    } else if (got == 0) {
      error = "connection closed";
      return false;
    } else if (errno != EINTR) {
      error = last_error();
      return false;
    }
  }
  return true;
}

/// Writes every byte of `parts`; false on a failure or after the socket's
/// send timeout (`error` says which).
inline bool write_all(int fd, std::vector<iovec> parts, std::string& error) {
  size_t first = 0;
  while (first < parts.size()) {
    msghdr message{};
    message.msg_iov = parts.data() + first;
    message.msg_iovlen = parts.size() - first;
    const ssize_t sent = ::sendmsg(fd, &message, MSG_NOSIGNAL);
    if (sent < 0) {
      if (errno == EINTR) {
        continue;
      }
      error = errno == EAGAIN || errno == EWOULDBLOCK
          ? "timed out (the peer reads nothing)"
          : last_error();
      return false;
    }
    auto left = static_cast<size_t>(sent);
    while (first < parts.size() && left >= parts[first].iov_len) {
      left -= parts[first].iov_len;
      ++first;
    }
    if (first < parts.size()) {
      parts[first].iov_base = static_cast<char*>(parts[first].iov_base) + left;
      parts[first].iov_len -= left;
    }
  }
  return true;
}

/// The address this host's peers reach it at: 127.0.0.1 under a loopback
/// master, else the local address of the route to the master (a UDP
/// "connect" sends nothing).
inline std::string local_address(const std::string& master) {
  if (is_loopback(master) || master.empty()) {
    return "127.0.0.1";
  }
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_DGRAM;
  addrinfo* found = nullptr;
  TORCH_CHECK(
      ::getaddrinfo(master.c_str(), "9", &hints, &found) == 0 &&
          found != nullptr,
      "gpipe: Backend::Sockets could not resolve the master address '",
      master,
      "'");
  const int probe = ::socket(AF_INET, SOCK_DGRAM, 0);
  sockaddr_in mine{};
  socklen_t length = sizeof(mine);
  const bool ok = probe >= 0 &&
      ::connect(probe, found->ai_addr, found->ai_addrlen) == 0 &&
      ::getsockname(probe, reinterpret_cast<sockaddr*>(&mine), &length) == 0;
  ::freeaddrinfo(found);
  if (probe >= 0) {
    ::close(probe);
  }
  TORCH_CHECK(
      ok,
      "gpipe: Backend::Sockets found no route to the master '",
      master,
      "': ",
      last_error());
  char text[INET_ADDRSTRLEN] = {};
  ::inet_ntop(AF_INET, &mine.sin_addr, text, sizeof(text));
  return text;
}

} // namespace sockets

/// One rank's TCP connections to the other ranks of its pipeline (Note
/// [Messages over the pipe's own sockets]). Sends come from one thread at a
/// time per peer; receives may be posted from any thread.
class PeerSockets {
 public:
  /// Connects this rank to every rank in `peers` (the others of its
  /// pipeline, in the same order on every rank is not needed), meeting
  /// through `world`'s store under `prefix`.
  PeerSockets(
      World& world,
      const std::string& prefix,
      const std::vector<int64_t>& peers)
      : rank_(world.rank()), timeout_(world.timeout()) {
    const int listener = listen_socket(world);
    try {
      world.store()->set(
          key(prefix, rank_),
          std::vector<uint8_t>(listening_at_.begin(), listening_at_.end()));
      for (const int64_t peer : peers) {
        if (peer > rank_) {
          connect_to(world, prefix, peer);
        }
      }
      for (const int64_t peer : peers) {
        if (peer < rank_) {
          accept_one(listener, peers);
        }
      }
    } catch (...) {
      ::close(listener);
      close_all();
      throw;
    }
    ::close(listener);
    for (auto& entry : connections_) {
      Connection* connection = entry.second.get();
      connection->reader =
          std::thread([this, connection] { read(*connection); });
    }
  }

  ~PeerSockets() {
    close_all();
  }

  PeerSockets(const PeerSockets&) = delete;
  PeerSockets& operator=(const PeerSockets&) = delete;

  /// Sends `tensor` (on the CPU) to `peer` under `tag`: done once written.
  c10::intrusive_ptr<c10d::Work> send(
      const torch::Tensor& tensor,
      int64_t peer,
      int64_t tag) {
    auto bytes = tensor.contiguous();
    TORCH_INTERNAL_ASSERT(
        bytes.device().is_cpu(), "gpipe: a socket sends CPU tensors");
    auto message = c10::make_intrusive<SocketMessage>(bytes, timeout_);
    Connection& to = connection(peer);
    const int64_t header[2] = {tag, static_cast<int64_t>(bytes.nbytes())};
    std::vector<iovec> parts{{const_cast<int64_t*>(header), sizeof(header)}};
    if (bytes.nbytes() > 0) {
      parts.push_back({bytes.data_ptr(), bytes.nbytes()});
    }
    std::string error;
    bool written = false;
    {
      std::lock_guard<std::mutex> lock(to.write_mutex);
      written = sockets::write_all(to.fd, std::move(parts), error);
    }
    if (written) {
      message->complete();
    } else {
      message->fail("send to rank " + std::to_string(peer) + ": " + error);
    }
    return message;
  }

  /// Posts the receive of `tensor` (contiguous, on the CPU) from `peer`
  /// under `tag`: done once filled.
  c10::intrusive_ptr<c10d::Work> recv(
      const torch::Tensor& tensor,
      int64_t peer,
      int64_t tag) {
    TORCH_INTERNAL_ASSERT(
        tensor.device().is_cpu() && tensor.is_contiguous(),
        "gpipe: a socket receives into contiguous CPU tensors");
    auto message = c10::make_intrusive<SocketMessage>(tensor, timeout_);
    Connection& from = connection(peer);
    std::vector<uint8_t> arrived;
    {
      std::lock_guard<std::mutex> lock(from.mutex);
      auto found = from.arrived.find(tag);
      if (found == from.arrived.end()) {
        if (!from.error.empty()) {
          message->fail(from.error);
        } else {
          from.posted[tag].push_back(message);
        }
        return message;
      }
      arrived = std::move(found->second.front());
      found->second.pop_front();
      if (found->second.empty()) {
        from.arrived.erase(found);
      }
    }
    fill(*message, arrived.data(), arrived.size(), peer, tag);
    return message;
  }

  /// Shuts every connection: blocked reads and writes return, pending and
  /// later messages fail. For a failed step; the pipe is done with.
  void abort() {
    for (auto& entry : connections_) {
      ::shutdown(entry.second->fd, SHUT_RDWR);
    }
  }

 private:
  struct Connection {
    int64_t peer = -1;
    int fd = -1;
    std::mutex write_mutex;
    std::mutex mutex; // guards the three below
    std::map<int64_t, std::deque<c10::intrusive_ptr<SocketMessage>>> posted;
    std::map<int64_t, std::deque<std::vector<uint8_t>>> arrived;
    std::string error; // once the connection failed
    std::thread reader;
  };

  Connection& connection(int64_t peer) {
    const auto found = connections_.find(peer);
    TORCH_INTERNAL_ASSERT(
        found != connections_.end(),
        "gpipe: rank ",
        rank_,
        " has no socket to rank ",
        peer);
    return *found->second;
  }

  void fill(
      SocketMessage& message,
      const uint8_t* data,
      size_t bytes,
      int64_t peer,
      int64_t tag) {
    if (bytes != message.bytes()) {
      message.fail(wrong_size(peer, tag, bytes, message.bytes()));
      return;
    }
    if (bytes > 0) {
      std::memcpy(message.tensor().data_ptr(), data, bytes);
    }
    message.complete();
  }

  static std::string wrong_size(
      int64_t peer,
      int64_t tag,
      size_t sent,
      size_t expected) {
    return "rank " + std::to_string(peer) + " sent " + std::to_string(sent) +
        " bytes under tag " + std::to_string(tag) +
        " where the receive holds " + std::to_string(expected);
  }

  /// The oldest receive posted under `tag`, taken; null if none. Under
  /// the connection's mutex.
  static c10::intrusive_ptr<SocketMessage> take_posted(
      Connection& connection,
      int64_t tag) {
    auto found = connection.posted.find(tag);
    if (found == connection.posted.end()) {
      return nullptr;
    }
    auto posted = std::move(found->second.front());
    found->second.pop_front();
    if (found->second.empty()) {
      connection.posted.erase(found);
    }
    return posted;
  }

  /// The reader of one connection: every message as it arrives.
  void read(Connection& connection) {
    std::string error;
    try {
      read_messages(connection, error);
    } catch (const std::exception& e) { // a header no peer sent: bad_alloc
      error = e.what();
    }
    std::map<int64_t, std::deque<c10::intrusive_ptr<SocketMessage>>> posted;
    {
      std::lock_guard<std::mutex> lock(connection.mutex);
      connection.error = "the connection to rank " +
          std::to_string(connection.peer) + " failed: " + error;
      posted.swap(connection.posted);
    }
    for (auto& entry : posted) {
      for (auto& message : entry.second) {
        message->fail(connection.error);
      }
    }
  }

  /// Reads messages until the connection fails (`error` says how).
  void read_messages(Connection& connection, std::string& error) {
    while (true) {
      int64_t header[2] = {0, 0};
      if (!sockets::read_all(connection.fd, header, sizeof(header), error)) {
        break;
      }
      const int64_t tag = header[0];
      const auto bytes = static_cast<size_t>(header[1]);
      c10::intrusive_ptr<SocketMessage> posted;
      {
        std::lock_guard<std::mutex> lock(connection.mutex);
        posted = take_posted(connection, tag);
      }
      if (posted && posted->bytes() == bytes) {
        if (!sockets::read_all(
                connection.fd, posted->tensor().data_ptr(), bytes, error)) {
          posted->fail(error);
          break;
        }
        posted->complete();
        continue;
      }
      std::vector<uint8_t> data(bytes);
      if (!sockets::read_all(connection.fd, data.data(), bytes, error)) {
        break;
      }
      if (posted) {
        posted->fail(wrong_size(connection.peer, tag, bytes, posted->bytes()));
        continue;
      }
      // The receive may have been posted while the bytes were read.
      {
        std::lock_guard<std::mutex> lock(connection.mutex);
        posted = take_posted(connection, tag);
        if (!posted) {
          connection.arrived[tag].push_back(std::move(data));
          continue;
        }
      }
      fill(*posted, data.data(), data.size(), connection.peer, tag);
    }
  }

  int listen_socket(World& world) {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    TORCH_CHECK(
        fd >= 0, "gpipe: Backend::Sockets: socket(): ", sockets::last_error());
    const std::string address = sockets::local_address(world.master_addr());
    sockaddr_in bound{};
    bound.sin_family = AF_INET;
    bound.sin_port = 0;
    bound.sin_addr.s_addr =
        address == "127.0.0.1" ? htonl(INADDR_LOOPBACK) : htonl(INADDR_ANY);
    socklen_t length = sizeof(bound);
    if (::bind(fd, reinterpret_cast<sockaddr*>(&bound), sizeof(bound)) != 0 ||
        ::listen(fd, 64) != 0 ||
        ::getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &length) != 0) {
      const std::string error = sockets::last_error();
      ::close(fd);
      TORCH_CHECK(false, "gpipe: Backend::Sockets could not listen: ", error);
    }
    listening_at_ = address + ":" + std::to_string(ntohs(bound.sin_port));
    return fd;
  }

  std::string key(const std::string& prefix, int64_t rank) const {
    return prefix + "sockets/" + std::to_string(rank);
  }

  void connect_to(World& world, const std::string& prefix, int64_t peer) {
    const auto value = world.store()->get(key(prefix, peer));
    const std::string where(value.begin(), value.end());
    const auto colon = where.rfind(':');
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_port =
        htons(static_cast<uint16_t>(std::stoi(where.substr(colon + 1))));
    ::inet_pton(AF_INET, where.substr(0, colon).c_str(), &address.sin_addr);
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    TORCH_CHECK(
        fd >= 0, "gpipe: Backend::Sockets: socket(): ", sockets::last_error());
    if (::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) !=
        0) {
      const std::string error = sockets::last_error();
      ::close(fd);
      TORCH_CHECK(
          false,
          "gpipe: rank ",
          rank_,
          " could not connect to rank ",
          peer,
          " at ",
          where,
          " (Backend::Sockets): ",
          error);
    }
    std::string error;
    const int64_t me = rank_;
    if (!sockets::write_all(
            fd, {{const_cast<int64_t*>(&me), sizeof(me)}}, error)) {
      ::close(fd);
      TORCH_CHECK(
          false,
          "gpipe: rank ",
          rank_,
          " could not greet rank ",
          peer,
          ": ",
          error);
    }
    adopt(fd, peer);
  }

  void accept_one(int listener, const std::vector<int64_t>& peers) {
    pollfd waiting{listener, POLLIN, 0};
    const int ready = ::poll(&waiting, 1, static_cast<int>(timeout_.count()));
    TORCH_CHECK(
        ready > 0,
        "gpipe: rank ",
        rank_,
        " waited ",
        timeout_.count(),
        " ms for its pipeline's ranks to connect (Backend::Sockets); did ",
        "every rank build the pipe?");
    const int fd = ::accept(listener, nullptr, nullptr);
    TORCH_CHECK(
        fd >= 0, "gpipe: Backend::Sockets: accept(): ", sockets::last_error());
    int64_t peer = -1;
    std::string error = "it sent no rank";
    pollfd greeting{fd, POLLIN, 0};
    const bool greeted =
        ::poll(&greeting, 1, static_cast<int>(timeout_.count())) > 0 &&
        sockets::read_all(fd, &peer, sizeof(peer), error);
    if (!greeted || connections_.count(peer) > 0 ||
        std::find(peers.begin(), peers.end(), peer) == peers.end()) {
      ::close(fd);
      TORCH_CHECK(
          false,
          "gpipe: rank ",
          rank_,
          " got a connection that is not from its pipeline (rank ",
          peer,
          ") ",
          error);
    }
    adopt(fd, peer);
  }

  void adopt(int fd, int64_t peer) {
    const int on = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof(on));
    timeval limit{};
    limit.tv_sec = static_cast<time_t>(timeout_.count() / 1000);
    limit.tv_usec = static_cast<suseconds_t>((timeout_.count() % 1000) * 1000);
    ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &limit, sizeof(limit));
    auto connection = std::make_unique<Connection>();
    connection->peer = peer;
    connection->fd = fd;
    connections_.emplace(peer, std::move(connection));
  }

  void close_all() {
    abort();
    for (auto& entry : connections_) {
      if (entry.second->reader.joinable()) {
        entry.second->reader.join();
      }
      ::close(entry.second->fd);
    }
    connections_.clear();
  }

  int64_t rank_;
  std::chrono::milliseconds timeout_;
  std::string listening_at_;
  std::map<int64_t, std::unique_ptr<Connection>> connections_;
};

} // namespace gpipe::distributed::detail
