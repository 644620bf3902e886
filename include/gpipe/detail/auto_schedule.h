// Schedule::Auto inside a pipe: the first step of each micro-batch count
// runs ZeroBubbleH1 with a timeline of the pipe's own, and its measured
// stage costs choose the program of later steps (search.h). Both pipes use
// these pieces; across processes the costs are summed over the ranks first,
// so that every rank searches with the same numbers and finds the same
// program.
#pragma once

#include <gpipe/detail/program_cache.h>
#include <gpipe/schedule.h>
#include <gpipe/search.h>
#include <gpipe/stage_costs.h>
#include <gpipe/timeline.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

namespace gpipe::detail {

// Note [Schedule::Auto measures its first step]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// The costs that choose a program are the pipe's own: the first step with
// Schedule::Auto for a micro-batch count (and activation limit) is a real
// training step on ZeroBubbleH1, whose gradients count like any other's,
// recorded into a timeline that keeps every slice (the user's timeline, if
// any, misses that one step). Its medians per stage (stage_costs) go to
// search_schedule, and the program found runs every later step of that
// count. A step that fails measures nothing; the next one measures again.
// Across processes each rank times its own stages and the ranks sum the
// costs (each stage's row is non-zero on one rank of a pipeline, and the
// replicas' are averaged), so that all search with the same numbers.

/// Schedule::Auto's limit per lane: `limit` stage activations, or with 0
/// the stage count (1F1B's peak on its first lane); a limit below what one
/// micro-batch through a lane's stages holds is an error naming both.
inline std::vector<double> activation_limits(
    double limit,
    const std::vector<int64_t>& lane_of_stage) {
  const auto stages = static_cast<int64_t>(lane_of_stage.size());
  const int64_t lanes =
      1 + *std::max_element(lane_of_stage.begin(), lane_of_stage.end());
  std::vector<double> one_microbatch(static_cast<size_t>(lanes), 0.0);
  for (const int64_t l : lane_of_stage) {
    one_microbatch[static_cast<size_t>(l)] += 1.0;
  }
  const double most =
      *std::max_element(one_microbatch.begin(), one_microbatch.end());
  TORCH_CHECK(
      limit == 0 || limit >= most,
      "gpipe: activation_limit ",
      limit,
      " is below one micro-batch through the stages of a lane (",
      most,
      "); use ",
      most,
      " or more, or 0 for the stage count");
  return std::vector<double>(
      static_cast<size_t>(lanes),
      limit == 0 ? static_cast<double>(stages) : limit);
}

/// The program searched for `costs` (one entry per stage), lowered.
inline Program searched_program(
    const std::vector<Costs>& costs,
    const std::vector<int64_t>& lane_of_stage,
    int64_t m,
    double limit) {
  return search_schedule(
             costs,
             lane_of_stage,
             m,
             SearchOptions().memory_limit(
                 activation_limits(limit, lane_of_stage)))
      .program;
}

/// While alive, `slot` (a pipe's timeline) records into a timeline of its
/// own that keeps every slice; the user's, if any, is put back after.
class MeasuringTimeline {
 public:
  explicit MeasuringTimeline(std::shared_ptr<Timeline>& slot)
      : slot_(slot),
        mine_(std::make_shared<Timeline>(TimelineOptions().window(0))),
        users_(std::exchange(slot, mine_)) {}
  MeasuringTimeline(const MeasuringTimeline&) = delete;
  MeasuringTimeline& operator=(const MeasuringTimeline&) = delete;
  ~MeasuringTimeline() {
    slot_ = std::move(users_);
  }

  std::vector<TimelineEvent> events() const {
    return mine_->events();
  }

 private:
  std::shared_ptr<Timeline>& slot_;
  std::shared_ptr<Timeline> mine_;
  std::shared_ptr<Timeline> users_;
};

/// One step's part in Schedule::Auto: whether it measures, the timeline it
/// records into meanwhile, and the search after it.
class AutoMeasurement {
 public:
  /// Measures when `schedule` is Auto, no program of the user's is set and
  /// m's program is not yet searched within `limit` (checked here).
  AutoMeasurement(
      bool user_program,
      Schedule schedule,
      double limit,
      ProgramCache& programs,
      int64_t m,
      std::vector<int64_t> lane_of_stage)
      : active_(
            !user_program && schedule == Schedule::Auto &&
            !programs.measured(m, limit)),
        limit_(limit),
        programs_(programs),
        m_(m),
        lanes_(std::move(lane_of_stage)) {
    if (active_) {
      activation_limits(limit_, lanes_);
    }
  }

  /// From now on, `slot` records into a timeline of this step's own.
  void record(std::shared_ptr<Timeline>& slot) {
    if (active_) {
      timeline_.emplace(slot);
    }
  }

  /// Ends the recording and keeps the program searched for the costs that
  /// `costs_of(events)` makes of it.
  template <typename CostsOf>
  void search(CostsOf&& costs_of) {
    if (!active_) {
      return;
    }
    const auto events = timeline_->events();
    timeline_.reset();
    programs_.keep_searched(
        m_, limit_, searched_program(costs_of(events), lanes_, m_, limit_));
  }

 private:
  bool active_;
  double limit_;
  ProgramCache& programs_;
  int64_t m_;
  std::vector<int64_t> lanes_;
  std::optional<MeasuringTimeline> timeline_;
};

} // namespace gpipe::detail
