// The ranks of a job and how they reach each other.
//
// Why a World: every rank must agree on who it is, where the store is, and
// which process group carries its tensors, before any pipe is built. torchrun
// puts that in each rank's environment (RANK, WORLD_SIZE, MASTER_ADDR,
// MASTER_PORT, and under its agent TORCHELASTIC_USE_AGENT_STORE and
// TORCHELASTIC_RESTART_COUNT); a program that starts its own processes gives
// the same values explicitly. A World is that agreement made once, with c10d,
// PyTorch's own distributed engine: a TCPStore, every key under the restart
// attempt's prefix (a restarted job never reads a dead attempt's keys), and
// one Gloo process group over every rank, shared by the pipes built on it.
//
// Note [Gloo on loopback and across hosts]
// Gloo needs a network device to listen on. When the store is on this host
// (127.0.0.1, localhost) ranks talk over loopback; otherwise GLOO_SOCKET_IFNAME
// names the interface, as in PyTorch, else Gloo picks the interface of the
// host's name.
#pragma once

#include <c10/util/Exception.h>
#include <torch/arg.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/types.h>

// NCCL where LibTorch was built with it and nccl.h is on the include path
// (gpipe::distributed adds the torch wheel's nvidia/nccl/include).
#if defined(USE_C10D_NCCL) && __has_include(<nccl.h>)
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#define GPIPE_HAS_NCCL 1
#else
#define GPIPE_HAS_NCCL 0
#endif

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace gpipe::distributed {

/// Who this rank is and where the store is. A value left unset is read
/// from the environment torchrun gives every rank.
struct WorldOptions {
  /// This process's rank, in [0, world_size). -1: from RANK.
  TORCH_ARG(int64_t, rank) = -1;
  /// The number of ranks. -1: from WORLD_SIZE.
  TORCH_ARG(int64_t, world_size) = -1;
  /// The rank on this host (picks its GPU). -1: from LOCAL_RANK, else 0.
  TORCH_ARG(int64_t, local_rank) = -1;
  /// The store's host. Empty: from MASTER_ADDR.
  TORCH_ARG(std::string, master_addr) = "";
  /// The store's port. -1: from MASTER_PORT.
  TORCH_ARG(int64_t, master_port) = -1;
  /// How long any rank waits for another (store, connection, a tensor)
  /// before it gives up with an error naming what it waited for.
  TORCH_ARG(std::chrono::milliseconds, timeout) = std::chrono::seconds(60);
};

namespace detail {

inline const char* env(const char* name) {
  const char* value = std::getenv(name);
  return value == nullptr || *value == '\0' ? nullptr : value;
}

inline int64_t env_int(const char* name, const char* value) {
  try {
    size_t used = 0;
    const long long parsed = std::stoll(value, &used);
    TORCH_CHECK(used == std::string(value).size(), "trailing characters");
    return parsed;
  } catch (const std::exception&) {
    TORCH_CHECK(
        false,
        "gpipe: the environment variable ",
        name,
        "='",
        value,
        "' is not an integer");
  }
  return 0;
}

inline bool is_loopback(const std::string& host) {
  return host == "localhost" || host.rfind("127.", 0) == 0 || host == "::1";
}

} // namespace detail

/// The ranks of one job: the store and the Gloo group over every rank.
/// Built once per process, shared by every pipe of the job.
class World {
 public:
  /// Connects this rank: what `options` leave unset comes from the
  /// environment. Under torchrun's agent (TORCHELASTIC_USE_AGENT_STORE=True)
  /// the agent hosts the store; otherwise rank 0 hosts it. Returns once
  /// every rank has joined, or throws a `gpipe:` error naming what is
  /// missing or unreachable.
  static std::shared_ptr<World> connect(WorldOptions options = {}) {
    std::vector<std::string> missing;
    const auto fill = [&](int64_t& value, const char* name) {
      if (value >= 0) {
        return;
      }
      if (const char* text = detail::env(name)) {
        value = detail::env_int(name, text);
      } else {
        missing.emplace_back(name);
      }
    };
    fill(options.rank(), "RANK");
    fill(options.world_size(), "WORLD_SIZE");
    if (options.master_addr().empty()) {
      if (const char* addr = detail::env("MASTER_ADDR")) {
        options.master_addr(addr);
      } else {
        missing.emplace_back("MASTER_ADDR");
      }
    }
    fill(options.master_port(), "MASTER_PORT");
    if (!missing.empty()) {
      std::string names;
      for (const auto& name : missing) {
        names += (names.empty() ? "" : ", ") + name;
      }
      TORCH_CHECK(
          false,
          "gpipe: a distributed pipe needs this rank's RANK, WORLD_SIZE, ",
          "MASTER_ADDR and MASTER_PORT (torchrun sets them) or the same ",
          "values in WorldOptions; missing: ",
          names);
    }
    if (options.local_rank() < 0) {
      const char* local = detail::env("LOCAL_RANK");
      options.local_rank(local ? detail::env_int("LOCAL_RANK", local) : 0);
    }
    TORCH_CHECK(
        options.world_size() >= 1,
        "gpipe: the world size must be at least 1, got ",
        options.world_size());
    TORCH_CHECK(
        options.rank() >= 0 && options.rank() < options.world_size(),
        "gpipe: rank ",
        options.rank(),
        " is outside the world of ",
        options.world_size(),
        " ranks");
    TORCH_CHECK(
        options.master_port() > 0 && options.master_port() < 65536,
        "gpipe: the store's port must be in [1, 65535], got ",
        options.master_port());
    TORCH_CHECK(
        options.timeout().count() > 0,
        "gpipe: the timeout must be positive, got ",
        options.timeout().count(),
        " ms");
    return std::shared_ptr<World>(new World(std::move(options)));
  }

  /// The rank that hosts the store keeps it up until every rank's World
  /// has ended, for at most kStoreLinger: a failure posted to the store
  /// must stay readable while the other ranks fail (Note [A failed rank
  /// stops every rank] in transport.h). Under torchrun's agent, which
  /// hosts the store, nothing waits.
  ~World() {
    try {
      store_->add("gpipe/worlds_ended", 1);
      const auto until = std::chrono::steady_clock::now() + kStoreLinger;
      while (hosts_store_ && store_->add("gpipe/worlds_ended", 0) < size() &&
             std::chrono::steady_clock::now() < until) {
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
    } catch (...) {
    }
  }

  World(const World&) = delete;
  World& operator=(const World&) = delete;

  /// This process's rank, 0..size()-1.
  int64_t rank() const {
    return options_.rank();
  }
  /// The number of ranks in the job.
  int64_t size() const {
    return options_.world_size();
  }
  /// This rank's index on its host (torchrun's LOCAL_RANK): `cuda:LOCAL_RANK`
  /// is its GPU.
  int64_t local_rank() const {
    return options_.local_rank();
  }
  /// How long any rank waits for another before it reports it as stuck.
  std::chrono::milliseconds timeout() const {
    return options_.timeout();
  }
  /// Where the store is hosted (MASTER_ADDR).
  const std::string& master_addr() const {
    return options_.master_addr();
  }
  /// torchrun's restart attempt (TORCHELASTIC_RESTART_COUNT), else 0.
  int64_t attempt() const {
    return attempt_;
  }

  /// The store, under this attempt's prefix.
  const c10::intrusive_ptr<c10d::Store>& store() const {
    return store_;
  }

  /// The Gloo group over every rank.
  const c10::intrusive_ptr<c10d::Backend>& group() const {
    return group_;
  }

  /// A Gloo group over `ranks` (sorted, this rank among them), its keys
  /// under `name`. Every member calls it with the same arguments.
  c10::intrusive_ptr<c10d::Backend> new_group(
      const std::string& name,
      const std::vector<int64_t>& ranks) const {
    return make_gloo(
        name, index_in(name, ranks), static_cast<int64_t>(ranks.size()));
  }

  /// A NCCL group over `ranks` (this rank among them) on `device`, its
  /// communicator connected now, on every member at once, so that no
  /// message later waits for a peer still connecting.
  c10::intrusive_ptr<c10d::Backend> new_nccl_group(
      const std::string& name,
      const std::vector<int64_t>& ranks,
      const torch::Device& device) const {
    // Checks this rank is among `ranks` with or without NCCL.
    [[maybe_unused]] const int64_t index = index_in(name, ranks);
#if GPIPE_HAS_NCCL
    auto nccl_options = c10d::ProcessGroupNCCL::Options::create();
    nccl_options->timeout = timeout();
    try {
      auto group = c10::make_intrusive<c10d::ProcessGroupNCCL>(
          c10::make_intrusive<c10d::PrefixStore>(name + "/", store_),
          static_cast<int>(index),
          static_cast<int>(ranks.size()),
          nccl_options);
      group->eagerConnectSingleDevice(device);
      return group;
    } catch (const std::exception& e) {
      TORCH_CHECK(
          false,
          "gpipe: rank ",
          rank(),
          " could not connect NCCL group '",
          name,
          "' of ",
          ranks.size(),
          " ranks on ",
          device,
          " (NCCL needs a GPU per rank: ranks that share a GPU need ",
          "Backend::Gloo): ",
          e.what());
    }
#else
    TORCH_CHECK(
        false,
        "gpipe: rank ",
        rank(),
        " needs NCCL for group '",
        name,
        "' on ",
        device,
        ", but this build has none (LibTorch built without USE_C10D_NCCL, ",
        "or nccl.h not on the include path: gpipe::distributed adds the ",
        "torch wheel's nvidia/nccl/include); use Backend::Gloo");
#endif
    return {};
  }

  /// A fresh key prefix for the next pipe built on this World: every rank
  /// builds its pipes in the same order, so the n-th pipe of each rank
  /// shares one prefix.
  std::string next_pipe_prefix() {
    return "gpipe/pipe_" + std::to_string(pipes_++) + "/";
  }

 private:
  int64_t index_in(const std::string& name, const std::vector<int64_t>& ranks)
      const {
    const auto found = std::find(ranks.begin(), ranks.end(), rank());
    TORCH_CHECK(
        found != ranks.end(),
        "gpipe: rank ",
        rank(),
        " builds group '",
        name,
        "' without being a member");
    return static_cast<int64_t>(found - ranks.begin());
  }

  explicit World(WorldOptions options) : options_(std::move(options)) {
    if (const char* count = detail::env("TORCHELASTIC_RESTART_COUNT")) {
      attempt_ = detail::env_int("TORCHELASTIC_RESTART_COUNT", count);
    }
    const char* agent = detail::env("TORCHELASTIC_USE_AGENT_STORE");
    const bool agent_hosts = agent != nullptr &&
        (std::string(agent) == "True" || std::string(agent) == "1" ||
         std::string(agent) == "true");
    c10d::TCPStoreOptions store_options;
    store_options.port = static_cast<std::uint16_t>(options_.master_port());
    store_options.isServer = !agent_hosts && rank() == 0;
    store_options.numWorkers = static_cast<size_t>(size());
    store_options.waitWorkers = false;
    store_options.timeout = timeout();
    const std::string where =
        options_.master_addr() + ":" + std::to_string(options_.master_port());
    c10::intrusive_ptr<c10d::Store> tcp;
    try {
      tcp = c10::make_intrusive<c10d::TCPStore>(
          options_.master_addr(), store_options);
    } catch (const std::exception& e) {
      TORCH_CHECK(
          false,
          "gpipe: rank ",
          rank(),
          store_options.isServer ? " could not host the store on "
                                 : " could not reach the store at ",
          where,
          store_options.isServer
              ? " (is the port already in use by another job?)"
              : " within " + std::to_string(timeout().count()) +
                  " ms (is rank 0 or torchrun's agent up, and the port right?)",
          ": ",
          e.what());
    }
    hosts_store_ = store_options.isServer;
    store_ = c10::make_intrusive<c10d::PrefixStore>(
        "/worker/attempt_" + std::to_string(attempt_), tcp);
    group_ = make_gloo("gpipe/world", rank(), size());
  }

  c10::intrusive_ptr<c10d::Backend> make_gloo(
      const std::string& name,
      int64_t index,
      int64_t members) const {
    auto gloo_options = c10d::ProcessGroupGloo::Options::create(timeout());
    const char* interface = detail::env("GLOO_SOCKET_IFNAME");
    // Note [Gloo on loopback and across hosts]
    if (detail::is_loopback(options_.master_addr())) {
      gloo_options->devices.push_back(
          c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
    } else if (interface != nullptr) {
      gloo_options->devices.push_back(
          c10d::ProcessGroupGloo::createDeviceForInterface(interface));
    } else {
      gloo_options->devices.push_back(
          c10d::ProcessGroupGloo::createDefaultDevice());
    }
    try {
      return c10::make_intrusive<c10d::ProcessGroupGloo>(
          c10::make_intrusive<c10d::PrefixStore>(name + "/", store_),
          static_cast<int>(index),
          static_cast<int>(members),
          gloo_options);
    } catch (const std::exception& e) {
      TORCH_CHECK(
          false,
          "gpipe: rank ",
          rank(),
          " could not connect group '",
          name,
          "' of ",
          members,
          " ranks within ",
          timeout().count(),
          " ms (did every rank start, with the same world size?): ",
          e.what());
    }
    return {};
  }

  static constexpr std::chrono::seconds kStoreLinger{5};

  WorldOptions options_;
  bool hosts_store_ = false;
  int64_t attempt_ = 0;
  int64_t pipes_ = 0;
  c10::intrusive_ptr<c10d::Store> store_;
  c10::intrusive_ptr<c10d::Backend> group_;
};

} // namespace gpipe::distributed
