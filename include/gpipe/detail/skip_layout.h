// Where each skip of a Sequential goes: which layer stashes it, which pops
// it, and so which partition sends it to which (gpipe/skip.h).
//
// The layout is read from the layers' declarations when the pipe is built,
// so a bad one fails there, before any data flows. A skip whose stash and
// pop fall in one partition never leaves it; every other skip is a route
// from the stashing partition straight to the popping one. Routes are
// numbered in the order of their stashing layers: a route's number is its
// channel on the transport (channel 0 is the main activation).
#pragma once

#include <gpipe/skip.h>

#include <c10/util/Exception.h>
#include <torch/nn/modules/container/sequential.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace gpipe::detail {

/// One skip that crosses partitions.
struct SkipRoute {
  std::string name; // qualified
  int64_t from = 0; // stashing partition
  int64_t to = 0; // popping partition
};

/// The skips of one partition that cross its boundary, in route order.
struct PartitionSkips {
  std::vector<std::string> incoming; // popped here, stashed earlier
  std::vector<std::string> outgoing; // stashed here, popped later
};

struct SkipLayout {
  std::vector<SkipRoute> routes;
  std::vector<PartitionSkips> partitions;
  /// Per partition: route indices popped there / stashed there.
  std::vector<std::vector<size_t>> incoming_routes;
  std::vector<std::vector<size_t>> outgoing_routes;

  bool empty() const {
    return routes.empty();
  }
};

/// The layout of `sequential` cut by `balance`; every bad layout is a
/// `gpipe:` error naming the skip and the layers.
inline SkipLayout skip_layout(
    const torch::nn::Sequential& sequential,
    const std::vector<int64_t>& balance) {
  struct Ends {
    std::vector<int64_t> stashed_by;
    std::vector<int64_t> popped_by;
  };
  std::map<std::string, Ends> skips;
  std::vector<std::string> order; // by first stash (then first pop)
  for (size_t layer = 0; layer < sequential->size(); ++layer) {
    for (const auto& module :
         sequential->ptr(layer)->modules(/*include_self=*/true)) {
      const auto* skippable =
          dynamic_cast<const skip::Skippable*>(module.get());
      if (skippable == nullptr) {
        continue;
      }
      for (const auto& name : skippable->stashes()) {
        auto& ends = skips[skippable->qualified(name)];
        if (ends.stashed_by.empty() && ends.popped_by.empty()) {
          order.push_back(skippable->qualified(name));
        }
        ends.stashed_by.push_back(static_cast<int64_t>(layer));
      }
      for (const auto& name : skippable->pops()) {
        auto& ends = skips[skippable->qualified(name)];
        if (ends.stashed_by.empty() && ends.popped_by.empty()) {
          order.push_back(skippable->qualified(name));
        }
        ends.popped_by.push_back(static_cast<int64_t>(layer));
      }
    }
  }
  std::vector<int64_t> partition_of;
  for (size_t j = 0; j < balance.size(); ++j) {
    partition_of.insert(
        partition_of.end(),
        static_cast<size_t>(balance[j]),
        static_cast<int64_t>(j));
  }
  SkipLayout layout;
  layout.partitions.resize(balance.size());
  layout.incoming_routes.resize(balance.size());
  layout.outgoing_routes.resize(balance.size());
  for (const auto& name : order) {
    const Ends& ends = skips.at(name);
    TORCH_CHECK(
        !ends.stashed_by.empty(),
        "gpipe: skip '",
        name,
        "' is popped by layer ",
        ends.popped_by.front(),
        " but never stashed (check the names and namespaces: ",
        "gpipe::skip::isolate)");
    TORCH_CHECK(
        !ends.popped_by.empty(),
        "gpipe: skip '",
        name,
        "' is stashed by layer ",
        ends.stashed_by.front(),
        " but never popped; a stashed tensor nobody pops would be kept ",
        "for nothing");
    TORCH_CHECK(
        ends.stashed_by.size() == 1,
        "gpipe: skip '",
        name,
        "' is stashed by layers ",
        c10::Join(", ", ends.stashed_by),
        "; a name is stashed by one layer (put repeated blocks in ",
        "namespaces with gpipe::skip::isolate)");
    TORCH_CHECK(
        ends.popped_by.size() == 1,
        "gpipe: skip '",
        name,
        "' is popped by layers ",
        c10::Join(", ", ends.popped_by),
        "; a name is popped by one layer (stash under several names to ",
        "hand one tensor to several layers)");
    const int64_t stash = ends.stashed_by.front();
    const int64_t pop = ends.popped_by.front();
    TORCH_CHECK(
        pop >= stash,
        "gpipe: skip '",
        name,
        "' is popped by layer ",
        pop,
        " before it is stashed by layer ",
        stash);
    const int64_t from = partition_of[static_cast<size_t>(stash)];
    const int64_t to = partition_of[static_cast<size_t>(pop)];
    if (from == to) {
      continue; // stays inside its partition
    }
    const size_t route = layout.routes.size();
    layout.routes.push_back({name, from, to});
    layout.partitions[static_cast<size_t>(from)].outgoing.push_back(name);
    layout.partitions[static_cast<size_t>(to)].incoming.push_back(name);
    layout.outgoing_routes[static_cast<size_t>(from)].push_back(route);
    layout.incoming_routes[static_cast<size_t>(to)].push_back(route);
  }
  return layout;
}

} // namespace gpipe::detail
