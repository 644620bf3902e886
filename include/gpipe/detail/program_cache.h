// The programs a pipe runs, built and validated once per shape: `step()`'s
// per (schedule, micro-batch count, messages matched by order or not), the
// user's own program lowered once, and `forward()`'s forward-only program
// per count. Both pipes keep one.
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
    const Program& mine = *options.program();
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
        "] (set GPipeOptions::lanes to match)");
    if (!user_program_ || !(user_program_->first == mine)) {
      Program lowered = lower(mine);
      simulate(lowered); // validates, throws with the grid
      user_program_.emplace(mine, std::move(lowered));
    }
    return user_program_->second;
  }

  /// `schedule`'s program for m micro-batches through n stages on
  /// `lanes`, lowered and validated; with `by_order`, its receives placed
  /// for messages matched by order and checked (Note [Messages matched by
  /// order]).
  const Program& scheduled(
      Schedule schedule,
      int64_t n,
      int64_t m,
      const std::vector<int64_t>& lanes,
      bool by_order = false) {
    const auto key = std::make_tuple(static_cast<int>(schedule), m, by_order);
    auto found = programs_.find(key);
    if (found == programs_.end()) {
      Program program = build_program(schedule, n, m, lanes);
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
  std::optional<std::pair<Program, Program>> user_program_; // as given, lowered
};

} // namespace gpipe::detail
