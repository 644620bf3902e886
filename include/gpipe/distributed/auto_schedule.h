// Schedule::Auto across processes (Note [Schedule::Auto measures its first
// step]): the stage costs every rank agrees on, so that each searches with
// the same numbers and finds the same program.
#pragma once

#include <gpipe/distributed/placement.h>
#include <gpipe/distributed/world.h>
#include <gpipe/simulation.h>
#include <gpipe/stage_costs.h>
#include <gpipe/timeline.h>

#include <torch/types.h>

#include <cstdint>
#include <vector>

namespace gpipe::distributed::detail {

/// Every stage's costs: this rank's stages' from `events`, summed with the
/// other ranks' over the World (a stage's row comes from one rank per
/// replica) and averaged over the replicas.
inline std::vector<Costs> agreed_stage_costs(
    World& world,
    const RankPlacement& placement,
    const std::vector<TimelineEvent>& events) {
  const int64_t n = placement.stages_total;
  auto rows = torch::zeros({n, 5}, torch::kFloat64);
  for (const int64_t s : placement.my_stages) {
    const Costs c = gpipe::detail::stage_cost(events, s, n);
    rows[s] = torch::tensor({c.F, c.B, c.I, c.W, c.comm}, torch::kFloat64);
  }
  std::vector<torch::Tensor> tensors{rows};
  c10d::AllreduceOptions sum;
  sum.reduceOp = c10d::ReduceOp::SUM;
  sum.timeout = world.timeout();
  world.group()->allreduce(tensors, sum)->wait();
  rows /= static_cast<double>(placement.replicas);
  std::vector<Costs> costs;
  for (int64_t s = 0; s < n; ++s) {
    const auto r = rows[s];
    costs.push_back(
        {r[0].item<double>(),
         r[1].item<double>(),
         r[2].item<double>(),
         r[3].item<double>(),
         r[4].item<double>()});
  }
  return costs;
}

} // namespace gpipe::distributed::detail
