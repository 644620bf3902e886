// The zero bubble paper's heuristic (Qi et al. 2023, section 3.2), for
// stages of unequal cost and a memory limit per lane: lanes are simulated
// together, and a lane that comes free picks, among what is ready, by a
// policy: an input gradient (I) or a forward (F) first, and a weight
// gradient (W) to fill a gap that is at least `fill` times its cost, or
// whenever a forward is held back by memory. Each policy gives one order
// per lane; search_schedule (search.h) tries several and improves the best.
#pragma once

#include <gpipe/program.h>
#include <gpipe/simulation.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <deque>
#include <limits>
#include <optional>
#include <string>
#include <vector>

namespace gpipe::detail {

/// How a free lane chooses.
struct GreedyPolicy {
  /// I before F when both are ready (else F before I).
  bool input_gradient_first = true;
  /// A W fills a wait of at least fill * its cost (0: any wait).
  double fill = 0.0;
};

/// What the greedy run sees of the problem.
struct GreedyProblem {
  std::vector<Costs> costs; // per stage
  std::vector<int64_t> lane_of_stage;
  int64_t lanes = 1;
  int64_t m = 1;
  std::vector<double> activation; // per stage, one micro-batch's
  std::vector<double> memory; // per lane, the most held at once
};

/// One greedy run over all lanes at once: each round, every lane that has
/// work left says what it would do next and when, and the earliest start is
/// committed (so what a lane sees ready is complete up to that time).
class GreedyRun {
 public:
  GreedyRun(const GreedyProblem& problem, const GreedyPolicy& policy)
      : problem_(problem),
        policy_(policy),
        stages_(static_cast<int64_t>(problem.lane_of_stage.size())),
        m_(problem.m),
        f_end_(static_cast<size_t>(stages_ * m_), kNever),
        i_end_(f_end_.size(), kNever),
        next_f_(static_cast<size_t>(stages_), 0),
        next_i_(static_cast<size_t>(stages_), 0),
        waiting_w_(static_cast<size_t>(stages_)),
        w_done_(static_cast<size_t>(stages_), 0),
        free_(static_cast<size_t>(problem.lanes), 0.0),
        held_(static_cast<size_t>(problem.lanes), 0.0),
        left_(static_cast<size_t>(problem.lanes), 0) {
    for (int64_t s = 0; s < stages_; ++s) {
      left_[static_cast<size_t>(lane_of(s))] += 3 * m_;
    }
  }

  /// Per lane, its compute actions in order; nothing where memory keeps
  /// every lane from going on.
  std::optional<Program> run() {
    Program program;
    program.stages = stages_;
    program.microbatches = m_;
    program.lane_of_stage = problem_.lane_of_stage;
    program.lanes.resize(static_cast<size_t>(problem_.lanes));
    for (int64_t remaining = 3 * stages_ * m_; remaining > 0; --remaining) {
      Choice best;
      for (int64_t l = 0; l < problem_.lanes; ++l) {
        if (left_[static_cast<size_t>(l)] > 0) {
          const Choice mine = choose(l);
          if (mine.stage != -1 && mine.start < best.start) {
            best = mine;
          }
        }
      }
      if (best.stage == -1) {
        return std::nullopt;
      }
      program.lanes[static_cast<size_t>(best.lane)].push_back(commit(best));
    }
    return program;
  }

 private:
  static constexpr double kNever = std::numeric_limits<double>::infinity();

  struct Choice {
    int64_t lane = -1;
    int64_t stage = -1;
    Op op = Op::F;
    double start = kNever;
  };

  int64_t lane_of(int64_t s) const {
    return problem_.lane_of_stage[static_cast<size_t>(s)];
  }
  const Costs& cost(int64_t s) const {
    return problem_.costs[static_cast<size_t>(s)];
  }
  size_t at(int64_t s, int64_t i) const {
    return static_cast<size_t>(s * m_ + i);
  }
  /// The receive before an action of stage s that takes what stage `from`
  /// sends: as simulate runs it, on s's lane, `comm` long, once the lane is
  /// free and the send is done; nothing between stages on one lane.
  double receive(int64_t from, int64_t s) const {
    return lane_of(from) == lane_of(s) ? 0.0 : cost(s).comm;
  }
  double f_ready(int64_t s) const {
    const int64_t i = next_f_[static_cast<size_t>(s)];
    if (i >= m_) {
      return kNever;
    }
    return s == 0 ? 0.0 : f_end_[at(s - 1, i)];
  }
  double i_ready(int64_t s) const {
    const int64_t i = next_i_[static_cast<size_t>(s)];
    if (i >= next_f_[static_cast<size_t>(s)]) {
      return kNever;
    }
    const double forward = f_end_[at(s, i)];
    return s == stages_ - 1 ? forward : std::max(forward, i_end_[at(s + 1, i)]);
  }

  /// Whether lane l may start stage s's next forward: its memory must keep
  /// room for the rest of the lane's oldest micro-batch in flight, which
  /// can then always finish and free what it holds (a lane filled with
  /// younger micro-batches' first stages could never run the oldest's
  /// later ones).
  bool fits_forward(int64_t l, int64_t s) const {
    int64_t oldest = -1;
    for (int64_t t = 0; t < stages_; ++t) {
      const auto k = static_cast<size_t>(t);
      if (lane_of(t) == l && w_done_[k] < next_f_[k] &&
          (oldest == -1 || w_done_[k] < oldest)) {
        oldest = w_done_[k];
      }
    }
    double need = problem_.activation[static_cast<size_t>(s)];
    if (oldest != -1 && oldest != next_f_[static_cast<size_t>(s)]) {
      for (int64_t t = 0; t < stages_; ++t) {
        if (lane_of(t) == l && next_f_[static_cast<size_t>(t)] <= oldest) {
          need += problem_.activation[static_cast<size_t>(t)];
        }
      }
    }
    return held_[static_cast<size_t>(l)] + need <=
        problem_.memory[static_cast<size_t>(l)] + 1e-9;
  }

  /// What lane l does next under the policy, and when.
  Choice choose(int64_t l) const {
    const double now = free_[static_cast<size_t>(l)];
    Choice next; // the F or I that can start soonest
    int64_t w_stage = -1;
    bool memory_bound = false;
    auto better = [&](double ready, Op op, int64_t s) {
      if (next.stage == -1) {
        return true;
      }
      const double start = std::max(ready, now);
      if (start != next.start) {
        return start < next.start;
      }
      // Ready together: the policy's op, then the later stage's I (the
      // critical path runs back) and the earlier stage's F.
      if (op != next.op) {
        return (op == Op::I) == policy_.input_gradient_first;
      }
      return op == Op::I ? s > next.stage : s < next.stage;
    };
    for (int64_t s = 0; s < stages_; ++s) {
      if (lane_of(s) != l) {
        continue;
      }
      const auto k = static_cast<size_t>(s);
      if (!waiting_w_[k].empty() && w_stage == -1) {
        w_stage = s;
      }
      const bool fits = fits_forward(l, s);
      const double rf = f_ready(s);
      memory_bound = memory_bound || (rf != kNever && !fits);
      const double ri = i_ready(s);
      if (ri != kNever && better(ri, Op::I, s)) {
        next = {l, s, Op::I, std::max(ri, now)};
      }
      if (rf != kNever && fits && better(rf, Op::F, s)) {
        next = {l, s, Op::F, std::max(rf, now)};
      }
    }
    const double gap = next.stage == -1 ? kNever : next.start - now;
    if (w_stage != -1 &&
        (next.stage == -1 || (memory_bound && gap > 0) ||
         (gap > 0 && gap >= policy_.fill * cost(w_stage).W))) {
      return {l, w_stage, Op::W, now};
    }
    return next;
  }

  /// Runs `choice`: its action, with the micro-batch its stage is at.
  Action commit(const Choice& choice) {
    const auto k = static_cast<size_t>(choice.stage);
    const auto l = static_cast<size_t>(choice.lane);
    int64_t i = 0;
    double end = choice.start;
    if (choice.op == Op::F) {
      i = next_f_[k]++;
      end += cost(choice.stage).F +
          (choice.stage > 0 ? receive(choice.stage - 1, choice.stage) : 0.0);
      f_end_[at(choice.stage, i)] = end;
      held_[l] += problem_.activation[k];
    } else if (choice.op == Op::I) {
      i = next_i_[k]++;
      end += cost(choice.stage).I +
          (choice.stage + 1 < stages_ ? receive(choice.stage + 1, choice.stage)
                                      : 0.0);
      i_end_[at(choice.stage, i)] = end;
      waiting_w_[k].push_back(i);
    } else {
      i = waiting_w_[k].front();
      waiting_w_[k].pop_front();
      ++w_done_[k];
      end += cost(choice.stage).W;
      held_[l] -= problem_.activation[k]; // the lane runs nothing meanwhile
    }
    free_[l] = end;
    --left_[l];
    return {choice.stage, choice.op, i};
  }

  const GreedyProblem& problem_;
  GreedyPolicy policy_;
  int64_t stages_;
  int64_t m_;
  std::vector<double> f_end_;
  std::vector<double> i_end_;
  std::vector<int64_t> next_f_;
  std::vector<int64_t> next_i_;
  std::vector<std::deque<int64_t>> waiting_w_;
  std::vector<int64_t> w_done_; // per stage, W's done (in micro-batch order)
  std::vector<double> free_;
  std::vector<double> held_;
  std::vector<int64_t> left_;
};

} // namespace gpipe::detail
