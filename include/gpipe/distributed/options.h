// Options of a pipe across processes, in LibTorch's style (a required stage
// count, the rest chainable TORCH_ARGs), and the Backend that carries its
// tensors. Every rank passes the same ones; the pipe checks that.
#pragma once

#include <gpipe/options.h>
#include <gpipe/program.h>
#include <gpipe/schedule.h>

#include <c10/util/StringUtil.h>
#include <torch/arg.h>
#include <torch/types.h>

#include <cstdint>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

namespace gpipe::distributed {

/// What carries a pipe's tensors between ranks.
enum class Backend {
  /// NCCL for a CUDA device where this build has NCCL; on CPUs the pipe's
  /// own sockets (Sockets), unless match_by_order or GLOO_SOCKET_IFNAME is
  /// set; else Gloo.
  Auto,
  /// Gloo, staging CUDA tensors through the CPU (also how ranks that
  /// share one GPU talk: NCCL refuses that).
  Gloo,
  /// NCCL, between CUDA devices: one GPU per rank (Note [Ordered steps]).
  Nccl,
  /// The pipe's own TCP connections between a pipeline's ranks, a write
  /// per message where Gloo makes three (Note [Messages over the pipe's own
  /// sockets]); CUDA tensors staged through the CPU as with Gloo. Replica
  /// and tie sums go over Gloo.
  Sockets,
};

inline const char* to_string(Backend backend) {
  switch (backend) {
    case Backend::Auto:
      return "auto";
    case Backend::Gloo:
      return "gloo";
    case Backend::Nccl:
      return "nccl";
    case Backend::Sockets:
      return "sockets";
  }
  return "unknown";
}

inline std::ostream& operator<<(std::ostream& stream, Backend backend) {
  return stream << to_string(backend);
}

/// Options of a distributed pipe; every rank passes the same ones (checked
/// at construction).
struct DistributedOptions {
  /// `stages` ranks per pipeline; the World's size must be a multiple:
  /// replicas = world size / stages.
  /* implicit */ DistributedOptions(int64_t stages) : stages_(stages) {}

  /// Ranks per pipeline: the pipe's stage count when stages_per_rank is 1.
  TORCH_ARG(int64_t, stages);
  /// Stages each rank runs (Note [Interleaved stages across ranks]).
  TORCH_ARG(int64_t, stages_per_rank) = 1;
  /// Micro-batches per step (fewer when a batch is smaller).
  TORCH_ARG(int64_t, microbatches) = 1;
  /// The order of forwards and backwards, as GPipeOptions::schedule.
  TORCH_ARG(Schedule, schedule) = Schedule::FillDrain;
  /// Which micro-batches re-materialize, as GPipeOptions::checkpoint.
  TORCH_ARG(Checkpoint, checkpoint) = Checkpoint::ExceptLast;
  /// How micro-batch losses combine, as GPipeOptions::loss_reduction.
  TORCH_ARG(Reduction, loss_reduction) = Reduction::Mean;
  /// Layers per (virtual) stage, when built from a whole Sequential; empty:
  /// as even as the layer count allows.
  TORCH_ARG(std::vector<int64_t>, balance) = {};
  /// Send every bundle's shapes with it, for a model whose activation
  /// shapes change while the input's do not (Note [Shapes are agreed once
  /// per batch shape]); costs a message per bundle.
  TORCH_ARG(bool, agree_shapes_every_step) = false;
  /// Where this rank's stages run; a CUDA device without an index is
  /// cuda:LOCAL_RANK.
  TORCH_ARG(torch::Device, device) = torch::kCPU;
  /// What carries tensors between ranks.
  TORCH_ARG(Backend, backend) = Backend::Auto;
  /// Gloo on CPUs only: once a batch shape's shapes are agreed, match
  /// messages by order in coalesced batches, with the program and the
  /// waits NCCL gets (Note [Messages matched by order]), to run on CPUs
  /// what NCCL would run. NCCL always does.
  TORCH_ARG(bool, match_by_order) = false;
  /// A program of your own for `step` (program.h; pipelining's CSV files
  /// through program_csv.h), run instead of `schedule()`: its lanes are the
  /// ranks of a pipeline, so it places the stages (stage s on position
  /// lane_of_stage[s]); it must have stages * stages_per_rank stages and the
  /// batch's micro-batch count, and is validated before it runs.
  TORCH_ARG(std::optional<Program>, program) = std::nullopt;
  /// With Schedule::Auto, as GPipeOptions::activation_limit (per rank).
  TORCH_ARG(double, activation_limit) = 0;
  /// With replicas: 0 sums their gradients after the drain; more sums them
  /// in buckets of about this size, each as soon as its gradients are
  /// final, overlapping the end of the drain (Note [Replica sums overlap the
  /// drain]). That pays only where a rank has a core to spare for the sums:
  /// with 4 ranks on 2 cores, 1 MiB buckets made a step 1-9% slower.
  TORCH_ARG(int64_t, replica_bucket_bytes) = 0;
  /// Parameters that train as one tensor though each stage holds its own
  /// copy (a head tied to the embedding in a pipe built stage by stage),
  /// named as the pipe names them (`named_parameters()`:
  /// "stage<s>.<name in the stage>" when built stage by stage, else the
  /// Sequential's). The copies take the first name's value when the pipe
  /// is built and are summed and watched like the ties the pipe finds
  /// (Note [Ties are found, and watched]); `ties()` lists them.
  TORCH_ARG(std::vector<std::vector<std::string>>, ties) = {};

 public:
  /// Declares one tie, e.g. `tie({"stage0.0.weight",
  /// "stage3.7.embedding.weight"})`.
  DistributedOptions& tie(std::vector<std::string> names) {
    ties_.push_back(std::move(names));
    return *this;
  }
};

inline std::ostream& operator<<(
    std::ostream& stream,
    const DistributedOptions& options) {
  stream << "stages=" << options.stages()
         << ", stages_per_rank=" << options.stages_per_rank()
         << ", microbatches=" << options.microbatches()
         << ", schedule=" << options.schedule()
         << ", checkpoint=" << options.checkpoint()
         << ", loss_reduction=" << to_string(options.loss_reduction())
         << ", balance=[" << c10::Join(", ", options.balance()) << "]"
         << ", agree_shapes_every_step=" << options.agree_shapes_every_step()
         << ", backend=" << options.backend()
         << ", match_by_order=" << options.match_by_order()
         << ", activation_limit=" << options.activation_limit()
         << ", replica_bucket_bytes=" << options.replica_bucket_bytes()
         << ", ties=[";
  for (const auto& names : options.ties()) {
    stream << "[" << c10::Join(", ", names) << "]";
  }
  return stream << "]"
                << ", program="
                << (options.program()
                        ? "\n" + format_program(*options.program())
                        : std::string("none"));
}

} // namespace gpipe::distributed
