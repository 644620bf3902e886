// Where each stage of a pipe across processes runs: the World's ranks form
// `replicas` pipelines of `stages` ranks (rank = replica * stages +
// position), rank position p runs stages p, p + stages, ..., or p and
// 2 stages - 1 - p for the V schedules (Note [Interleaved stages across
// ranks]), on the device and over the backend
// its options name. Checked and fixed when the pipe is built.
#pragma once

#include <gpipe/detail/microbatch.h>
#include <gpipe/detail/skip_layout.h>
#include <gpipe/distributed/bundle_header.h>
#include <gpipe/distributed/options.h>
#include <gpipe/distributed/world.h>
#include <gpipe/schedule.h>

#include <c10/util/Exception.h>
#include <torch/cuda.h>
#include <torch/types.h>

#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

namespace gpipe::distributed::detail {

/// This rank's place in the pipe.
struct RankPlacement {
  int64_t stages = 1; // ranks per pipeline
  int64_t stages_per_rank = 1;
  int64_t stages_total = 0; // stages * stages_per_rank
  int64_t replicas = 1;
  int64_t replica = 0;
  int64_t position = 0;
  std::vector<int64_t> my_stages; // ascending
  std::vector<int64_t> rank_of_stage; // in this rank's pipeline
  std::vector<int64_t> position_of_stage; // the program's lanes
  bool nccl = false;
  bool sockets = false; // Note [Messages over the pipe's own sockets]

  /// The position in the pipeline that runs each stage: the program's
  /// lanes.
  const std::vector<int64_t>& lane_of_stage() const {
    return position_of_stage;
  }

  /// The rank at `position` of this rank's pipeline.
  int64_t rank_at(int64_t position) const {
    return replica * stages + position;
  }

  /// The other ranks of this rank's pipeline, by position.
  std::vector<int64_t> pipeline_peers() const {
    std::vector<int64_t> peers;
    for (int64_t p = 0; p < stages; ++p) {
      if (p != position) {
        peers.push_back(rank_at(p));
      }
    }
    return peers;
  }

  /// "rank 3 (stage 1)", "rank 1 (stages 1 3)".
  std::string describe(int64_t rank) const {
    const int64_t position = rank % stages;
    std::ostringstream text;
    text << "rank " << rank << " (stage" << (stages_per_rank > 1 ? "s" : "");
    for (int64_t s = 0; s < stages_total; ++s) {
      if (position_of_stage[static_cast<size_t>(s)] == position) {
        text << " " << s;
      }
    }
    text << ")";
    return text.str();
  }
};

/// The position of each of `stages_total` stages in a pipeline of `stages`
/// ranks (Note [Interleaved stages across ranks]): the V schedules fold the
/// stages, stage s and 2 stages - 1 - s on position s; a program of the
/// user's places them as its lanes say; the others interleave them.
inline std::vector<int64_t> positions_of_stages(
    const DistributedOptions& options,
    int64_t stages,
    int64_t stages_total) {
  const Schedule schedule = options.schedule();
  if (options.program()) {
    const Program& program = *options.program();
    TORCH_CHECK(
        program.stages == stages_total &&
            static_cast<int64_t>(program.lane_of_stage.size()) ==
                program.stages &&
            static_cast<int64_t>(program.lanes.size()) == stages,
        "gpipe: the program has ",
        program.stages,
        " stages on ",
        program.lanes.size(),
        " lanes, but the pipe has ",
        stages_total,
        " stages (stages * stages_per_rank) on ",
        stages,
        " ranks per pipeline");
    std::vector<bool> used(static_cast<size_t>(stages), false);
    for (int64_t s = 0; s < stages_total; ++s) {
      const int64_t lane = program.lane_of_stage[static_cast<size_t>(s)];
      TORCH_CHECK(
          lane >= 0 && lane < stages,
          "gpipe: the program puts stage ",
          s,
          " on lane ",
          lane,
          "; its lanes are the ",
          stages,
          " ranks of a pipeline, 0..",
          stages - 1);
      used[static_cast<size_t>(lane)] = true;
    }
    for (int64_t l = 0; l < stages; ++l) {
      TORCH_CHECK(
          used[static_cast<size_t>(l)],
          "gpipe: the program puts no stage on lane ",
          l,
          "; every rank of a pipeline runs a stage");
    }
    return program.lane_of_stage;
  }
  TORCH_CHECK(
      !places_stages_in_a_v(schedule) || options.stages_per_rank() == 2,
      "gpipe: ",
      to_string(schedule),
      " runs exactly two stages per rank, in a V; set stages_per_rank(2) (got ",
      options.stages_per_rank(),
      ")");
  return schedule_placement(
      places_stages_in_a_v(schedule) ? schedule : Schedule::LoopedBFS,
      stages_total,
      stages);
}

/// Places this rank of `world` as `options` say; resolves a CUDA device
/// without an index to cuda:LOCAL_RANK.
inline RankPlacement place_on_ranks(
    const World& world,
    DistributedOptions& options) {
  RankPlacement placement;
  const int64_t stages = options.stages();
  TORCH_CHECK(stages >= 1, "gpipe: stages must be at least 1, got ", stages);
  TORCH_CHECK(
      world.size() % stages == 0,
      "gpipe: the world size ",
      world.size(),
      " is not replicas x stages: ",
      stages,
      " stages do not divide ",
      world.size(),
      " ranks");
  TORCH_CHECK(
      options.stages_per_rank() >= 1,
      "gpipe: stages_per_rank must be at least 1, got ",
      options.stages_per_rank());
  gpipe::detail::check_microbatches(options.microbatches());
  placement.stages_total = stages * options.stages_per_rank();
  TORCH_CHECK(
      placement.stages_total <= detail::kMaxStages,
      "gpipe: at most ",
      detail::kMaxStages,
      " stages across processes, got ",
      placement.stages_total);
  TORCH_CHECK(
      options.microbatches() <= detail::kMaxMicrobatches,
      "gpipe: at most ",
      detail::kMaxMicrobatches,
      " micro-batches across processes, got ",
      options.microbatches());
  if (options.device().is_cuda() && !options.device().has_index()) {
    options.device(torch::Device(
        torch::kCUDA, static_cast<c10::DeviceIndex>(world.local_rank())));
  }
  if (options.device().is_cuda()) {
    const int64_t visible = static_cast<int64_t>(torch::cuda::device_count());
    TORCH_CHECK(
        options.device().index() < visible,
        "gpipe: rank ",
        world.rank(),
        " is to run on ",
        options.device(),
        " but sees ",
        visible,
        " CUDA devices (a CUDA device without an index is ",
        "cuda:LOCAL_RANK, here ",
        world.local_rank(),
        ")");
  }
  const auto backend = options.backend();
  TORCH_CHECK(
      backend == Backend::Auto || backend == Backend::Gloo ||
          backend == Backend::Nccl || backend == Backend::Sockets,
      "gpipe: backend is not a Backend (value: ",
      static_cast<int>(backend),
      "); use Backend::Auto, Backend::Gloo, Backend::Nccl or ",
      "Backend::Sockets");
  TORCH_CHECK(
      backend != Backend::Nccl || options.device().is_cuda(),
      "gpipe: Backend::Nccl needs a CUDA device, got ",
      options.device());
  placement.nccl = backend == Backend::Nccl ||
      (backend == Backend::Auto && options.device().is_cuda() &&
       GPIPE_HAS_NCCL);
  TORCH_CHECK(
      !options.match_by_order() ||
          (!placement.nccl && backend != Backend::Sockets &&
           options.device().type() == torch::kCPU),
      "gpipe: match_by_order is for Gloo on CPUs (NCCL always matches by ",
      "order); got backend ",
      backend,
      " on ",
      options.device());
  // Auto picks the pipe's own sockets on CPUs, unless the user chose Gloo's
  // network interface or NCCL's rules (match_by_order).
  placement.sockets = backend == Backend::Sockets ||
      (backend == Backend::Auto && !options.device().is_cuda() &&
       !options.match_by_order() && env("GLOO_SOCKET_IFNAME") == nullptr);
  placement.stages = stages;
  placement.stages_per_rank = options.stages_per_rank();
  placement.replicas = world.size() / stages;
  placement.replica = world.rank() / stages;
  placement.position = world.rank() % stages;
  placement.position_of_stage =
      positions_of_stages(options, stages, placement.stages_total);
  for (int64_t s = 0; s < placement.stages_total; ++s) {
    const int64_t position =
        placement.position_of_stage[static_cast<size_t>(s)];
    if (position == placement.position) {
      placement.my_stages.push_back(s);
    }
    placement.rank_of_stage.push_back(placement.rank_at(position));
  }
  return placement;
}

/// Across processes a skip stays within one stage.
inline void reject_skips_across_stages(const gpipe::detail::SkipLayout& skips) {
  if (skips.empty()) {
    return;
  }
  const auto& route = skips.routes.front();
  TORCH_CHECK(
      false,
      "gpipe: skip '",
      route.name,
      "' crosses from stage ",
      route.from,
      " to stage ",
      route.to,
      "; across processes a skip must stay within one stage (choose the ",
      "balance so that its stash and pop share a stage)");
}

} // namespace gpipe::distributed::detail
