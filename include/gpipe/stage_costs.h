// What each stage's actions cost, read from a timeline: the costs that
// simulate and search_schedule take, measured rather than guessed.
//
// Why from a timeline: a pipe that records its own step has timed every
// forward, input gradient, weight gradient, recompute and copy on the
// devices and threads that will run the next steps, with everything a
// profile of layers alone leaves out (the cell's bookkeeping, the copy
// streams, contention between lanes). Schedule::Auto measures this way.
#pragma once

#include <gpipe/simulation.h>
#include <gpipe/timeline.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace gpipe {

namespace detail {

inline double median_of(std::vector<double> values) {
  if (values.empty()) {
    return 0.0;
  }
  std::sort(values.begin(), values.end());
  const size_t half = values.size() / 2;
  return values.size() % 2 == 1 ? values[half]
                                : (values[half - 1] + values[half]) / 2;
}

/// Stage s's costs from `events` (stage_costs), with `stages` for the
/// message.
inline Costs stage_cost(
    const std::vector<TimelineEvent>& events,
    int64_t s,
    int64_t stages) {
  const auto phases = static_cast<size_t>(Phase::BackwardWeight) + 1;
  std::vector<std::vector<double>> seconds(phases);
  for (const auto& event : events) {
    if (event.partition == s) {
      seconds[static_cast<size_t>(event.phase)].push_back(
          (event.end_us - event.start_us) / 1e6);
    }
  }
  auto has = [&](Phase phase) {
    return !seconds[static_cast<size_t>(phase)].empty();
  };
  auto median = [&](Phase phase) {
    return median_of(seconds[static_cast<size_t>(phase)]);
  };
  TORCH_CHECK(
      has(Phase::Forward),
      "gpipe: stage_costs: stage ",
      s,
      " has no forward among the ",
      events.size(),
      " events (stages: ",
      stages,
      "); record a training step first");
  const double recompute = median(Phase::Recompute);
  Costs c;
  c.F = median(Phase::Forward);
  c.comm = median(Phase::Copy);
  if (has(Phase::BackwardInput)) {
    c.I = median(Phase::BackwardInput) + recompute;
    c.W = median(Phase::BackwardWeight);
    c.B = c.I + c.W;
  } else {
    c.B = median(Phase::Backward) + recompute;
    c.I = c.B;
    c.W = 0.0;
  }
  return c;
}

} // namespace detail

/// Per stage of `stages`, in seconds, the median over `events` (a
/// Timeline's, of one or more steps) of: F its forwards; I its input
/// gradients, W its weight gradients and B its whole backwards, each with
/// the stage's median recompute added where it re-materializes (a recompute
/// runs right before the backward it serves); comm the copies into the
/// stage (0 where none: lanes of one device). A stage whose backward ran
/// whole has I = B and W = 0; one split has B = I + W. Throws a `gpipe:`
/// error naming the stage when a stage has no forward among the events.
inline std::vector<Costs> stage_costs(
    const std::vector<TimelineEvent>& events,
    int64_t stages) {
  TORCH_CHECK(stages >= 1, "gpipe: stage_costs needs a stage, got ", stages);
  std::vector<Costs> costs;
  for (int64_t s = 0; s < stages; ++s) {
    costs.push_back(detail::stage_cost(events, s, stages));
  }
  return costs;
}

} // namespace gpipe
