// The programs a pipe runs, built and validated once per shape: `step()`'s
// per (schedule, micro-batch count, messages matched by order or not), the
// user's own program lowered once, the programs Schedule::Auto searched,
// and `forward()`'s forward-only program per count. Both pipes keep one.
#pragma once

#include <gpipe/options.h>
#include <gpipe/ordered_messages.h>
#include <gpipe/program.h>
#include <gpipe/schedules.h>
#include <gpipe/simulate.h>

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <cstdint>
#include <map>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace gpipe::detail {

class ProgramCache {
 public:
  /// The program `step` runs for m micro-batches through n stages on
  /// `lanes`: `options.program()` when set, else the schedule's, lowered
  /// and validated.
  const Program& step_program(
      const GPipeOptions& options,
      int64_t n,
      int64_t m,
      const std::vector<int64_t>& lanes) {
    if (!options.program()) {
      return scheduled(options.schedule(), n, m, lanes);
    }
    return given(
        *options.program(), n, m, lanes, false, "set GPipeOptions::lanes");
  }

  /// The user's program `mine`, checked against the pipe (n stages, this
  /// batch's m micro-batches, `lanes`; `fix` says how to match the lanes),
  /// lowered and validated once; with `by_order`, placed and checked for
  /// messages matched by order.
  const Program& given(
      const Program& mine,
      int64_t n,
      int64_t m,
      const std::vector<int64_t>& lanes,
      bool by_order,
      const char* fix) {
    TORCH_CHECK(
        mine.stages == n && mine.microbatches == m,
        "gpipe: the program has ",
        mine.stages,
        " stages and ",
        mine.microbatches,
        " micro-batches, but the pipe has ",
        n,
        " partitions and this batch ",
        m,
        " micro-batches (a batch smaller than microbatches() gives fewer)");
    TORCH_CHECK(
        mine.lane_of_stage == lanes,
        "gpipe: the program places stages on lanes [",
        c10::Join(", ", mine.lane_of_stage),
        "], but the pipe runs its partitions on lanes [",
        c10::Join(", ", lanes),
        "] (",
        fix,
        " to match)");
    auto& kept = user_programs_[by_order ? 1 : 0];
    if (!kept || !(kept->first == mine)) {
      Program lowered = lower(mine);
      simulate(lowered); // validates, throws with the grid
      if (by_order) {
        lowered = lower_for_ordered_messages(lowered);
        simulate(lowered);
        check_ordered_messages(lowered);
      }
      kept.emplace(mine, std::move(lowered));
    }
    return kept->second;
  }

  /// `schedule`'s program for m micro-batches through n stages on
  /// `lanes`, lowered and validated; with `by_order`, its receives placed
  /// for messages matched by order and checked (Note [Messages matched by
  /// order]).
  /// Schedule::Auto's program is the one searched for m (keep_searched),
  /// or ZeroBubbleH1's until a step has measured it.
  const Program& scheduled(
      Schedule schedule,
      int64_t n,
      int64_t m,
      const std::vector<int64_t>& lanes,
      bool by_order = false) {
    if (schedule == Schedule::Auto && searched_limit_.count(m) == 0) {
      schedule = Schedule::ZeroBubbleH1;
    }
    const auto key = std::make_tuple(static_cast<int>(schedule), m, by_order);
    auto found = programs_.find(key);
    if (found == programs_.end()) {
      Program program = schedule == Schedule::Auto
          ? programs_.at(std::make_tuple(static_cast<int>(schedule), m, false))
          : build_program(schedule, n, m, lanes);
      simulate(program);
      if (by_order) {
        program = lower_for_ordered_messages(program);
        simulate(program);
        check_ordered_messages(program);
      }
      found = programs_.emplace(key, std::move(program)).first;
    }
    return found->second;
  }

  /// Whether Schedule::Auto has a program searched for m micro-batches
  /// within activation limit `limit`.
  bool measured(int64_t m, double limit) const {
    const auto found = searched_limit_.find(m);
    return found != searched_limit_.end() && found->second == limit;
  }

  /// Keeps `program` (lowered, validated) as Schedule::Auto's for m
  /// micro-batches, searched within `limit`.
  void keep_searched(int64_t m, double limit, Program program) {
    programs_.erase(std::make_tuple(static_cast<int>(Schedule::Auto), m, true));
    programs_[std::make_tuple(static_cast<int>(Schedule::Auto), m, false)] =
        std::move(program);
    searched_limit_[m] = limit;
  }

  /// The forward-only program for m micro-batches (clock_cycles' order).
  const Program& forward_program(
      int64_t n,
      int64_t m,
      const std::vector<int64_t>& lanes) {
    auto found = forward_programs_.find(m);
    if (found == forward_programs_.end()) {
      Program program = gpipe::forward_program(n, m, lanes);
      simulate(program);
      found = forward_programs_.emplace(m, std::move(program)).first;
    }
    return found->second;
  }

 private:
  std::map<std::tuple<int, int64_t, bool>, Program> programs_;
  std::map<int64_t, Program> forward_programs_;
  std::map<int64_t, double> searched_limit_; // Schedule::Auto's, per m
  // The user's program as given and lowered, by tags [0] and by order [1].
  std::optional<std::pair<Program, Program>> user_programs_[2];
};

} // namespace gpipe::detail
