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

#include <gpipe/detail/skip_frame.h>

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>
#include <torch/nn/modules/container/sequential.h>

#include <cstdint>
#include <map>
#include <string>
#include <utility>
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

/// Which layers stash and pop one skip name.
struct SkipEnds {
  std::vector<int64_t> stashed_by;
  std::vector<int64_t> popped_by;
};

/// Every rule the ends of skip `name` break, one message each (without the
/// `gpipe: ` that the error puts in front of them all).
inline std::vector<std::string> skip_errors(
    const std::string& name,
    const SkipEnds& ends) {
  std::vector<std::string> errors;
  // "skip 'a' is popped by layer 3" or "... by layers 2, 3", then `why`.
  const auto add = [&](const char* verb,
                       const std::vector<int64_t>& layers,
                       const std::string& why) {
    errors.push_back(c10::str(
        "skip '",
        name,
        "' is ",
        verb,
        layers.size() == 1 ? " by layer " : " by layers ",
        c10::Join(", ", layers),
        why));
  };
  const auto& stashes = ends.stashed_by;
  const auto& pops = ends.popped_by;
  if (stashes.empty()) {
    add("popped",
        {pops.front()},
        " but never stashed (check the names and namespaces: "
        "gpipe::skip::isolate)");
  }
  if (pops.empty()) {
    add("stashed",
        {stashes.front()},
        " but never popped; a stashed tensor nobody pops would be kept for "
        "nothing");
  }
  if (stashes.size() > 1) {
    add("stashed",
        stashes,
        "; a name is stashed by one layer (put repeated blocks in namespaces "
        "with gpipe::skip::isolate)");
  }
  if (pops.size() > 1) {
    add("popped",
        pops,
        "; a name is popped by one layer (stash under several names to hand "
        "one tensor to several layers)");
  }
  if (errors.empty() && pops.front() < stashes.front()) {
    add("popped",
        {pops.front()},
        c10::str(" before it is stashed by layer ", stashes.front()));
  }
  return errors;
}

/// Fails with every error of the layout in one message: a model with two
/// mistakes is fixed in one round, not two.
inline void check_skip_errors(const std::vector<std::string>& errors) {
  if (errors.size() == 1) {
    TORCH_CHECK(false, "gpipe: ", errors.front());
  }
  if (errors.size() > 1) {
    std::string all;
    for (size_t k = 0; k < errors.size(); ++k) {
      all += c10::str("\n  (", k + 1, ") ", errors[k]);
    }
    TORCH_CHECK(
        false, "gpipe: the skip layout has ", errors.size(), " errors:", all);
  }
}

/// The layout of `sequential` cut by `balance`; every bad layout is a
/// `gpipe:` error naming the skips and the layers, all of them at once.
inline SkipLayout skip_layout(
    const torch::nn::Sequential& sequential,
    const std::vector<int64_t>& balance) {
  std::map<std::string, SkipEnds> skips;
  std::vector<std::string> order; // by first stash (then first pop)
  const auto note = [&](const std::string& name, int64_t layer, bool stash) {
    auto& ends = skips[name];
    if (ends.stashed_by.empty() && ends.popped_by.empty()) {
      order.push_back(name);
    }
    (stash ? ends.stashed_by : ends.popped_by).push_back(layer);
  };
  for (size_t layer = 0; layer < sequential->size(); ++layer) {
    for (const auto& module :
         sequential->ptr(layer)->modules(/*include_self=*/true)) {
      const auto* skippable =
          dynamic_cast<const SkipDeclarations*>(module.get());
      if (skippable == nullptr) {
        continue;
      }
      for (const auto& name : skippable->stashes()) {
        note(skippable->qualified(name), static_cast<int64_t>(layer), true);
      }
      for (const auto& name : skippable->pops()) {
        note(skippable->qualified(name), static_cast<int64_t>(layer), false);
      }
    }
  }
  std::vector<std::string> errors;
  for (const auto& name : order) {
    for (auto& error : skip_errors(name, skips.at(name))) {
      errors.push_back(std::move(error));
    }
  }
  check_skip_errors(errors);
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
    const SkipEnds& ends = skips.at(name);
    const int64_t from = partition_of[static_cast<size_t>(ends.stashed_by[0])];
    const int64_t to = partition_of[static_cast<size_t>(ends.popped_by[0])];
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
