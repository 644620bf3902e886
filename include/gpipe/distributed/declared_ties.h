// Ties a pipe across processes cannot find: stages built one by one (each
// rank builds only its own, so a head tied to the embedding is a separate
// tensor), or separate tensors of one model that should train as one.
// DistributedOptions::tie names them as the pipe names its parameters; each
// rank posts what it holds of them, then every rank of the pipeline checks
// the same posts and so reaches the same verdict (an error on every rank,
// never a hang), and the ties train as the pipe's own do (Note [Ties are
// found, and watched]).
#pragma once

#include <gpipe/distributed/options.h>
#include <gpipe/distributed/placement.h>
#include <gpipe/distributed/ties.h>
#include <gpipe/distributed/world.h>

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace gpipe::distributed::detail {

/// A parameter of one of this rank's stages, under the pipe's name for it.
struct StageParameter {
  std::string name;
  int64_t stage = 0;
  torch::Tensor tensor;
};

/// This rank's stages' parameters as the pipe names them: "stage<s>." and
/// the name in the stage for a pipe built stage by stage, else the
/// Sequential's.
inline std::vector<StageParameter> stage_parameters(
    const std::vector<torch::nn::Sequential>& stages,
    bool built_by_stage) {
  std::vector<StageParameter> parameters;
  for (size_t s = 0; s < stages.size(); ++s) {
    if (stages[s].is_empty()) {
      continue;
    }
    const std::string prefix =
        built_by_stage ? "stage" + std::to_string(s) + "." : "";
    for (const auto& p : stages[s]->named_parameters()) {
      parameters.push_back(
          {prefix + p.key(), static_cast<int64_t>(s), p.value()});
    }
  }
  return parameters;
}

/// What a rank posts of one declared name it holds.
struct DeclaredCopy {
  int64_t stage = 0;
  std::string sizes; // "[11, 6]"
  std::string dtype;
  bool requires_grad = false;
  std::string tensor; // "p<position>#<k>": one tensor, one token
  bool already_tied = false; // part of a tie the pipe found
};

namespace declared {

inline std::string describe(const std::string& name, const DeclaredCopy& c) {
  return "\"" + name + "\" (shape " + c.sizes + ", " + c.dtype +
      (c.requires_grad ? "" : ", frozen") + ")";
}

/// Checks the names alone, the same on every rank.
inline void check_names(const std::vector<std::vector<std::string>>& ties) {
  std::set<std::string> seen;
  for (const auto& names : ties) {
    TORCH_CHECK(
        names.size() >= 2,
        "gpipe: DistributedOptions::tie needs at least two names, got [",
        c10::Join(", ", names),
        "]");
    for (const auto& name : names) {
      TORCH_CHECK(
          seen.insert(name).second,
          "gpipe: DistributedOptions::tie names \"",
          name,
          "\" twice (in one tie or two): a tensor is in one tie");
    }
  }
}

/// The post of one rank: a line per declared name it holds.
inline std::string post_of(
    const std::vector<std::vector<std::string>>& ties,
    const std::vector<StageParameter>& mine,
    const std::vector<FoundTie>& found,
    int64_t position) {
  std::set<const c10::TensorImpl*> tied;
  for (const auto& each : found) {
    tied.insert(each.copies.front().unsafeGetTensorImpl());
  }
  std::unordered_map<const c10::TensorImpl*, size_t> token;
  std::ostringstream post;
  for (const auto& names : ties) {
    for (const auto& name : names) {
      for (const auto& p : mine) {
        if (p.name != name) {
          continue;
        }
        const auto* key = p.tensor.unsafeGetTensorImpl();
        const auto at = token.emplace(key, token.size());
        std::ostringstream sizes;
        sizes << p.tensor.sizes();
        post << name << '\t' << p.stage << '\t' << sizes.str() << '\t'
             << p.tensor.scalar_type() << '\t' << p.tensor.requires_grad()
             << "\tp" << position << '#' << at.first->second << '\t'
             << (tied.count(key) > 0) << '\n';
      }
    }
  }
  return post.str();
}

/// Reads a post back, name by name.
inline void read_post(
    const std::string& post,
    std::map<std::string, DeclaredCopy>& into) {
  std::istringstream lines(post);
  std::string line;
  while (std::getline(lines, line)) {
    std::istringstream fields(line);
    std::string name, stage, requires_grad, already;
    DeclaredCopy copy;
    std::getline(fields, name, '\t');
    std::getline(fields, stage, '\t');
    std::getline(fields, copy.sizes, '\t');
    std::getline(fields, copy.dtype, '\t');
    std::getline(fields, requires_grad, '\t');
    std::getline(fields, copy.tensor, '\t');
    std::getline(fields, already, '\t');
    copy.stage = std::stoll(stage);
    copy.requires_grad = requires_grad == "1";
    copy.already_tied = already == "1";
    into.emplace(name, std::move(copy));
  }
}

} // namespace declared

/// Adds to `found` (the ties the pipe found itself) the ties
/// `options.ties()` declares, as every rank of this rank's pipeline agrees on
/// them: each rank posts what it holds of the named parameters (on its
/// `stages`), reads every post of its pipeline and checks them, so a bad
/// declaration is the same gpipe: error on every rank. Each tie's copies take
/// the first name's value (Ties' constructor).
inline void add_declared_ties(
    std::vector<FoundTie>& found,
    const World& world,
    const std::string& prefix,
    const RankPlacement& placement,
    const DistributedOptions& options,
    const std::vector<torch::nn::Sequential>& stages,
    bool built_by_stage) {
  const auto& ties = options.ties();
  if (ties.empty()) {
    return;
  }
  declared::check_names(ties);
  const auto mine = stage_parameters(stages, built_by_stage);
  auto& store = *world.store();
  const std::string post =
      declared::post_of(ties, mine, found, placement.position);
  store.set(
      prefix + "declared_ties/" + std::to_string(world.rank()),
      std::vector<uint8_t>(post.begin(), post.end()));
  std::map<std::string, DeclaredCopy> copies;
  for (int64_t p = 0; p < placement.stages; ++p) {
    const auto rank = placement.rank_at(p);
    const auto bytes =
        store.get(prefix + "declared_ties/" + std::to_string(rank));
    declared::read_post(std::string(bytes.begin(), bytes.end()), copies);
  }
  std::vector<FoundTie> resolved;
  for (const auto& names : ties) {
    FoundTie tie;
    tie.tie.name = names.front();
    const DeclaredCopy* first = nullptr;
    std::set<std::string> tensors;
    for (const auto& name : names) {
      const auto at = copies.find(name);
      TORCH_CHECK(
          at != copies.end(),
          "gpipe: DistributedOptions::tie names \"",
          name,
          "\", which no stage of the pipe holds (",
          built_by_stage
              ? "a pipe built stage by stage names its parameters "
                "\"stage<s>.<name in the stage>\""
              : "names are the Sequential's, as named_parameters() gives them",
          ")");
      const DeclaredCopy& copy = at->second;
      TORCH_CHECK(
          !copy.already_tied,
          "gpipe: DistributedOptions::tie names \"",
          name,
          "\", which the pipe ties already: its module is shared by ",
          "stages, so ties() lists it; declare only separate tensors");
      if (first == nullptr) {
        first = &copy;
      }
      TORCH_CHECK(
          copy.sizes == first->sizes && copy.dtype == first->dtype &&
              copy.requires_grad == first->requires_grad,
          "gpipe: DistributedOptions::tie names ",
          declared::describe(names.front(), *first),
          " and ",
          declared::describe(name, copy),
          ": the copies of a tie need one shape, dtype and requires_grad");
      TORCH_CHECK(
          tensors.insert(copy.tensor).second,
          "gpipe: DistributedOptions::tie names \"",
          name,
          "\" and another name of the same tensor (already one: no tie is ",
          "needed)");
      const int64_t position =
          placement.position_of_stage[static_cast<size_t>(copy.stage)];
      tie.tie.stages.push_back(copy.stage);
      tie.tie.positions.push_back(position);
      if (position == placement.position) {
        for (const auto& p : mine) {
          if (p.name == name) {
            tie.copies.push_back(p.tensor);
          }
        }
      }
    }
    tie.source = placement.position_of_stage[static_cast<size_t>(first->stage)];
    for (auto* list : {&tie.tie.stages, &tie.tie.positions}) {
      std::sort(list->begin(), list->end());
      list->erase(std::unique(list->begin(), list->end()), list->end());
    }
    resolved.push_back(std::move(tie));
  }
  for (auto& tie : resolved) {
    found.push_back(std::move(tie));
  }
}

} // namespace gpipe::distributed::detail
