// Pipeline schedules as pure functions: GPipe's fill-drain clock, and the
// per-partition action lists of each schedule (fill-drain, 1F1B, zero bubble
// H1). program.h turns them into programs, simulate.h validates them, and
// schedules.h places them on lanes.
//
// Why functions and not loops inside the pipeline: the schedule is the one
// thing every reader of a pipeline wants to check by eye, so it is kept free
// of tensors and threads and is tested against literal lists laid out like the
// schedule diagram, and every generated schedule is checked by a validator
// that prints the schedule as a grid when it finds a fault. Letters are fixed
// everywhere: m micro-batches, n partitions, i a micro-batch, j a partition,
// k a clock tick, s a lockstep step.
#pragma once

#include <gpipe/program.h>
#include <gpipe/simulate.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <ostream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace gpipe {

/// One clock tick: the (micro-batch i, partition j) cells that run at once.
using ClockTick = std::vector<std::pair<int64_t, int64_t>>;

/// The fill-drain schedule: m + n - 1 ticks; tick k holds every (i, j) with
/// i + j == k, ordered by partition. Backward runs the same ticks in reverse.
///
///   m=3, n=3:  k=0: (0,0)
///              k=1: (1,0) (0,1)
///              k=2: (2,0) (1,1) (0,2)
///              k=3:       (2,1) (1,2)
///              k=4:             (2,2)
inline std::vector<ClockTick> clock_cycles(int64_t m, int64_t n) {
  TORCH_CHECK(
      m >= 1 && n >= 1,
      "gpipe: clock_cycles needs at least one micro-batch and one partition (m: ",
      m,
      ", n: ",
      n,
      ")");
  std::vector<ClockTick> ticks;
  ticks.reserve(static_cast<size_t>(m + n - 1));
  for (int64_t k = 0; k < m + n - 1; ++k) {
    ClockTick tick;
    for (int64_t j = std::max<int64_t>(1 + k - m, 0); j < std::min(1 + k, n);
         ++j) {
      tick.emplace_back(k - j, j);
    }
    ticks.push_back(std::move(tick));
  }
  return ticks;
}

/// The order in which `step` runs forwards and backwards.
enum class Schedule {
  /// All forwards, then all backwards (GPipe): every micro-batch's
  /// activations are alive at the turn.
  FillDrain,
  /// One forward, one backward (PipeDream-Flush): partition j runs n - j - 1
  /// warm-up forwards, then alternates, then drains; at most n - j
  /// micro-batches are in flight on partition j, whatever m is. With m < n
  /// the warm-up is cut to m and it degenerates gracefully into fill-drain.
  OneFOneB,
  /// 1F1B over V chunks per lane (Narayanan et al. 2021): stage s on lane
  /// s mod L, a smaller bubble for more communication. Needs lanes, so only
  /// build_program (schedules.h) makes it.
  Interleaved1F1B,
  /// Zero bubble H1 (Qi et al. 2023): the backward split into I (gradient of
  /// the input, on the critical path) and W (gradient of the weights, put in
  /// the bubbles). 1F1B's peak in flight (n micro-batches, partition 0's) on
  /// every partition, with at most n - j waiting for their I on partition j;
  /// about a third of 1F1B's bubble.
  ZeroBubbleH1,
  /// Fill-drain over V chunks per lane (torch.distributed.pipelining's
  /// LoopedBFS): each lane runs every micro-batch's forward on its first
  /// stage, then on its next, and so on, then the backwards the same way
  /// with its stages in reverse. Breadth first, like fill-drain, which it is
  /// with one stage per lane: every micro-batch's activations are alive at
  /// the turn; the bubble of V stages per lane is about fill-drain's over V.
  LoopedBFS,
  /// Zero bubble over V chunks per lane (Qi et al. 2023, ZB1P as
  /// torch.distributed.pipelining's InterleavedZeroBubble): interleaved
  /// 1F1B's placement and order, stage s on lane s mod L, with each backward
  /// split into I and W and the W's deferred into the bubbles. Any number of
  /// stages per lane; with one it is a zero bubble schedule of its own (not
  /// ZeroBubbleH1's greedy order).
  InterleavedZeroBubble,
  /// Zero bubble in a V (Qi et al. 2023, section 6): two stages per lane,
  /// stage s and 2L - 1 - s on lane s, so the first and the last stage share
  /// lane 0 and a micro-batch goes down the lanes and back up. 1F1B's peak
  /// activations with almost no bubble when F, I and W cost the same.
  ZeroBubbleV,
  /// DeepSeek-V3's DualPipeV (Liu et al. 2024): the V placement of
  /// ZeroBubbleV, with the forward of one stage paired with the backward of
  /// the other in the steady state. Where pipelining overlaps such a pair
  /// (OVERLAP_F_B), a lane here runs the two one after the other: one CPU
  /// thread or one CUDA stream cannot truly overlap them.
  DualPipeV,
  /// A program searched for this pipe (search.h): the first step of each
  /// micro-batch count runs ZeroBubbleH1 and measures every stage's F, I,
  /// W and messages; later steps run the program search_schedule finds for
  /// those costs within the options' activation_limit.
  Auto,
};

inline const char* to_string(Schedule schedule) {
  switch (schedule) {
    case Schedule::FillDrain:
      return "fill_drain";
    case Schedule::OneFOneB:
      return "1f1b";
    case Schedule::Interleaved1F1B:
      return "interleaved_1f1b";
    case Schedule::ZeroBubbleH1:
      return "zero_bubble_h1";
    case Schedule::LoopedBFS:
      return "looped_bfs";
    case Schedule::InterleavedZeroBubble:
      return "interleaved_zero_bubble";
    case Schedule::ZeroBubbleV:
      return "zero_bubble_v";
    case Schedule::DualPipeV:
      return "dual_pipe_v";
    case Schedule::Auto:
      return "auto";
  }
  return "unknown";
}

inline std::ostream& operator<<(std::ostream& os, Schedule schedule) {
  return os << to_string(schedule);
}

/// Every fixed Schedule, in declaration order (all but Auto, which is
/// searched).
constexpr Schedule kEverySchedule[] = {
    Schedule::FillDrain,
    Schedule::OneFOneB,
    Schedule::Interleaved1F1B,
    Schedule::ZeroBubbleH1,
    Schedule::LoopedBFS,
    Schedule::InterleavedZeroBubble,
    Schedule::ZeroBubbleV,
    Schedule::DualPipeV};

/// Whether `schedule` folds its stages onto lanes in a V: stage s and
/// 2L - 1 - s on lane s, two stages per lane (ZeroBubbleV, DualPipeV).
inline bool places_stages_in_a_v(Schedule schedule) {
  return schedule == Schedule::ZeroBubbleV || schedule == Schedule::DualPipeV;
}

/// How many stages each lane runs in the placement `schedule` is drawn,
/// tested and shown with: 1 for the schedules of one stage per lane, 2 for
/// the others (Interleaved1F1B, LoopedBFS and InterleavedZeroBubble run any
/// number; ZeroBubbleV and DualPipeV exactly 2).
inline int64_t stages_per_lane(Schedule schedule) {
  switch (schedule) {
    case Schedule::Interleaved1F1B:
    case Schedule::LoopedBFS:
    case Schedule::InterleavedZeroBubble:
    case Schedule::ZeroBubbleV:
    case Schedule::DualPipeV:
      return 2;
    default:
      return 1;
  }
}

/// The lane of each of `stages` stages on `lanes` lanes in the placement
/// `schedule` runs on: stage s on lane s mod L, or in a V for ZeroBubbleV
/// and DualPipeV (stage s on lane s for s < L, else on 2L - 1 - s; then
/// stages must be 2L). Throws a c10::Error naming the counts when they do
/// not fit.
inline std::vector<int64_t> schedule_placement(
    Schedule schedule,
    int64_t stages,
    int64_t lanes) {
  TORCH_CHECK(
      lanes >= 1 && stages >= lanes && stages % lanes == 0,
      "gpipe: ",
      to_string(schedule),
      " places the same number of stages on every lane; ",
      stages,
      " stages do not fit ",
      lanes,
      " lanes");
  TORCH_CHECK(
      !places_stages_in_a_v(schedule) || stages == 2 * lanes,
      "gpipe: ",
      to_string(schedule),
      " runs exactly two stages per lane, in a V: ",
      stages,
      " stages need ",
      stages / 2,
      " lanes (got ",
      lanes,
      stages % 2 == 0 ? ")" : "; and an even number of stages)");
  std::vector<int64_t> lane_of_stage;
  for (int64_t s = 0; s < stages; ++s) {
    lane_of_stage.push_back(
        places_stages_in_a_v(schedule) && s >= lanes ? 2 * lanes - 1 - s
                                                     : s % lanes);
  }
  return lane_of_stage;
}

/// The schedule `to_string` names ("fill_drain", "1f1b", ...); throws a
/// c10::Error naming the text and every valid name when it is none.
inline Schedule parse_schedule(const std::string& name) {
  if (name == to_string(Schedule::Auto)) {
    return Schedule::Auto;
  }
  std::string names;
  for (const Schedule schedule : kEverySchedule) {
    if (name == to_string(schedule)) {
      return schedule;
    }
    names += names.empty() ? "" : ", ";
    names += to_string(schedule);
  }
  TORCH_CHECK(
      false,
      "gpipe: unknown schedule '",
      name,
      "' (schedules: ",
      names,
      ", auto)");
}

/// What a partition does to a micro-batch: what a schedule orders (forward,
/// backward, or the backward's two halves), and the two more a timeline
/// records (a recompute inside a backward, a copy between devices).
enum class Phase {
  Forward,
  Backward,
  Recompute,
  Copy,
  BackwardInput,
  BackwardWeight
};

/// The phase's name: "forward", "backward", "recompute", "copy",
/// "backward_input" or "backward_weight" (also the category of a Chrome
/// trace slice).
inline const char* to_string(Phase phase) {
  switch (phase) {
    case Phase::Forward:
      return "forward";
    case Phase::Backward:
      return "backward";
    case Phase::Recompute:
      return "recompute";
    case Phase::Copy:
      return "copy";
    case Phase::BackwardInput:
      return "backward_input";
    case Phase::BackwardWeight:
      return "backward_weight";
  }
  return "unknown";
}

/// actions[j] is partition j's actions in the order it runs them (each with
/// stage j).
using PartitionActions = std::vector<std::vector<Action>>;

namespace detail {

/// Zero bubble H1 by a greedy run in unit steps, one partition per lane: at
/// each step partition j does, in priority, its next F if what it needs was
/// done at an earlier step, fewer than n - j micro-batches wait for their I
/// (1F1B's bound, on the activations an I needs) and fewer than n wait for
/// their W (1F1B's peak, partition 0's); else its next I if ready; else its
/// oldest pending W; else nothing. The W's so deferred fill what would be
/// 1F1B's drain bubble: with F = I = W = 1 it takes 3 m + n - 1 steps for
/// m >= n (1F1B: 3 m + 3 (n - 1)).
inline PartitionActions zero_bubble_h1(int64_t m, int64_t n) {
  constexpr int64_t kNotYet = -1;
  const auto cells = static_cast<size_t>(m);
  std::vector<std::vector<int64_t>> f_at(
      static_cast<size_t>(n), std::vector<int64_t>(cells, kNotYet));
  auto i_at = f_at;
  std::vector<int64_t> next_f(static_cast<size_t>(n), 0);
  std::vector<int64_t> next_i(static_cast<size_t>(n), 0);
  std::vector<int64_t> next_w(static_cast<size_t>(n), 0);
  PartitionActions actions(static_cast<size_t>(n));
  int64_t remaining = 3 * m * n;
  for (int64_t t = 0; remaining > 0; ++t) {
    auto before = [&](const std::vector<std::vector<int64_t>>& at,
                      int64_t j,
                      int64_t i) {
      const int64_t when = at[static_cast<size_t>(j)][static_cast<size_t>(i)];
      return when != kNotYet && when < t;
    };
    for (int64_t j = 0; j < n; ++j) {
      const auto k = static_cast<size_t>(j);
      auto& mine = actions[k];
      const int64_t fi = next_f[k];
      const int64_t ii = next_i[k];
      if (fi < m && (j == 0 || before(f_at, j - 1, fi)) && fi - ii < n - j &&
          fi - next_w[k] < n) {
        mine.push_back({j, Op::F, fi});
        f_at[k][static_cast<size_t>(fi)] = t;
        ++next_f[k];
      } else if (
          ii < m && before(f_at, j, ii) &&
          (j == n - 1 || before(i_at, j + 1, ii))) {
        mine.push_back({j, Op::I, ii});
        i_at[k][static_cast<size_t>(ii)] = t;
        ++next_i[k];
      } else if (next_w[k] < next_i[k]) {
        mine.push_back({j, Op::W, next_w[k]++});
      } else {
        continue;
      }
      --remaining;
    }
  }
  return actions;
}

} // namespace detail

/// The actions of `schedule` for m micro-batches on n partitions, one
/// partition per lane (Interleaved1F1B needs lanes: build_program; LoopedBFS
/// with one partition per lane is FillDrain).
inline PartitionActions schedule_actions(
    Schedule schedule,
    int64_t m,
    int64_t n) {
  TORCH_CHECK(
      m >= 1 && n >= 1,
      "gpipe: a schedule needs at least one micro-batch and one partition (m: ",
      m,
      ", n: ",
      n,
      ")");
  TORCH_CHECK(
      schedule != Schedule::Auto,
      "gpipe: auto is searched for the costs a pipe measures; use search_schedule (search.h), or Schedule::Auto in a pipe's options (m: ",
      m,
      ", n: ",
      n,
      ")");
  TORCH_CHECK(
      schedule != Schedule::Interleaved1F1B &&
          schedule != Schedule::InterleavedZeroBubble &&
          !places_stages_in_a_v(schedule),
      "gpipe: ",
      to_string(schedule),
      " puts several stages on each lane; use build_program with lane_of_stage (m: ",
      m,
      ", n: ",
      n,
      ")");
  if (schedule == Schedule::ZeroBubbleH1) {
    return detail::zero_bubble_h1(m, n);
  }
  PartitionActions actions(static_cast<size_t>(n));
  for (int64_t j = 0; j < n; ++j) {
    auto& mine = actions[static_cast<size_t>(j)];
    if (schedule == Schedule::FillDrain || schedule == Schedule::LoopedBFS) {
      for (int64_t i = 0; i < m; ++i) {
        mine.push_back(Action::forward(i, j));
      }
      for (int64_t i = m - 1; i >= 0; --i) {
        mine.push_back(Action::backward(i, j));
      }
      continue;
    }
    const int64_t warmup = std::min(n - j - 1, m);
    int64_t next_forward = 0;
    int64_t next_backward = 0;
    for (; next_forward < warmup; ++next_forward) {
      mine.push_back(Action::forward(next_forward, j));
    }
    while (next_forward < m) {
      mine.push_back(Action::forward(next_forward++, j));
      mine.push_back(Action::backward(next_backward++, j));
    }
    while (next_backward < m) {
      mine.push_back(Action::backward(next_backward++, j));
    }
  }
  return actions;
}

/// Runs `actions` in lockstep, each partition on its own lane (partition j
/// is stage j; an action's own stage field is ignored): at each step every
/// partition does its next action if what it needs was done at an earlier
/// step. Returns the grid, or throws simulate's c10::Error ("gpipe: invalid
/// program: ...", the grid so far) when the actions are not a valid
/// schedule, or "gpipe: invalid schedule: ..." when their shape is wrong.
inline ScheduleGrid lockstep(
    const PartitionActions& actions,
    int64_t m,
    int64_t n) {
  TORCH_CHECK(
      static_cast<int64_t>(actions.size()) == n,
      "gpipe: invalid schedule: actions for ",
      actions.size(),
      " partitions, expected ",
      n);
  Program program;
  program.stages = n;
  program.microbatches = m;
  for (int64_t j = 0; j < n; ++j) {
    program.lane_of_stage.push_back(j);
    program.lanes.push_back(actions[static_cast<size_t>(j)]);
    for (auto& action : program.lanes.back()) {
      action.stage = j;
    }
  }
  return simulate(lower(program), detail::unit_costs()).grid;
}

} // namespace gpipe
