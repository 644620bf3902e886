// Every rank of a pipe across processes must build the same pipe: the same
// options, and replica by replica the same stages. Each rank posts a
// fingerprint to the store and compares it with rank 0's and its first
// replica's, so a mismatch is an error at construction, naming both texts,
// rather than a hang or wrong numbers at the first step.
#pragma once

#include <gpipe/distributed/options.h>
#include <gpipe/distributed/placement.h>
#include <gpipe/distributed/world.h>

#include <c10/util/Exception.h>
#include <torch/nn/modules/container/sequential.h>

#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

namespace gpipe::distributed::detail {

/// A stage's fingerprint: its layer count, parameter and buffer shapes.
inline std::string shapes_of(const torch::nn::Sequential& part) {
  std::ostringstream text;
  text << part->size() << " layers";
  for (const auto& p : part->named_parameters()) {
    text << "; " << p.key() << " " << p.value().sizes() << " "
         << p.value().scalar_type();
  }
  for (const auto& b : part->named_buffers()) {
    text << "; " << b.key() << " " << b.value().sizes();
  }
  return text.str();
}

/// "stage s: <fingerprint>" per stage given (null stages skipped).
inline std::string stages_fingerprint(
    const std::vector<torch::nn::Sequential>& stages) {
  std::ostringstream text;
  for (size_t s = 0; s < stages.size(); ++s) {
    if (!stages[s].is_empty()) {
      text << "stage " << s << ": " << shapes_of(stages[s]) << "\n";
    }
  }
  return text.str();
}

/// Every rank must run the same options and, replica by replica, the same
/// stages: each posts a fingerprint and compares it with rank 0's (the
/// options, and the whole model when built from one) and with its first
/// replica's (its own stages).
/// `whole_model` is the fingerprint of the whole model when built from
/// one; `stages` holds this rank's stages (null elsewhere).
inline void check_same_everywhere(
    const World& world,
    const std::string& prefix,
    const DistributedOptions& options,
    const std::string& whole_model,
    const std::vector<torch::nn::Sequential>& stages,
    const RankPlacement& placement) {
  std::ostringstream common;
  // Where messages go depends on the environment too (GLOO_SOCKET_IFNAME).
  common << "world=" << world.size() << "; " << options
         << "; device type=" << options.device().type() << "; messages over "
         << (placement.nccl          ? "NCCL"
                 : placement.sockets ? "the pipe's own sockets"
                                     : "Gloo")
         << "\n"
         << whole_model;
  const std::string common_text = common.str();
  const std::string mine_text = stages_fingerprint(stages);
  auto& store = *world.store();
  const std::string rank = std::to_string(world.rank());
  store.set(
      prefix + "common/" + rank,
      std::vector<uint8_t>(common_text.begin(), common_text.end()));
  store.set(
      prefix + "stages/" + rank,
      std::vector<uint8_t>(mine_text.begin(), mine_text.end()));
  const auto text = [&](const std::string& key) {
    try {
      const auto value = store.get(key);
      return std::string(value.begin(), value.end());
    } catch (const std::exception& e) {
      TORCH_CHECK(
          false,
          "gpipe: rank ",
          world.rank(),
          " waited ",
          world.timeout().count(),
          " ms for ",
          key,
          " from another rank building the same pipe: ",
          e.what());
    }
    return std::string();
  };
  for (int64_t other = 0; other < world.size(); ++other) {
    const std::string theirs = text(prefix + "common/" + std::to_string(other));
    TORCH_CHECK(
        theirs == common_text,
        "gpipe: rank ",
        world.rank(),
        " and rank ",
        other,
        " built different pipes: every rank must pass the same options ",
        "and model.\nrank ",
        other,
        ":\n",
        theirs,
        "\nrank ",
        world.rank(),
        ":\n",
        common_text);
  }
  const std::string twin =
      text(prefix + "stages/" + std::to_string(placement.position));
  TORCH_CHECK(
      twin == mine_text,
      "gpipe: rank ",
      world.rank(),
      " (replica ",
      placement.replica,
      ") built stages that differ from rank ",
      placement.position,
      "'s (replica 0): replicas must hold the same stages.\nrank ",
      placement.position,
      ":\n",
      twin,
      "\nrank ",
      world.rank(),
      ":\n",
      mine_text);
}

} // namespace gpipe::distributed::detail
