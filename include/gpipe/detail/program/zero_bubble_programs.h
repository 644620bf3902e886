// The programs of the zero bubble schedules over several stages per lane:
// interleaved zero bubble (ZB1P on the interleaved placement), ZB-V and
// DualPipeV, each in the order torch.distributed.pipelining's schedule of
// the same name gives every rank (Note [The anchor's orders]).
//
// Why the anchor's orders and not orders of our own: a user moving from
// pipelining to gpipe, or comparing the two, should see the same schedule
// do the same work in the same order; where a better order exists for the
// costs at hand, it is a searched schedule's job, not a fixed recipe's.
// Letters as in schedules.h: m micro-batches, s a stage, i a micro-batch,
// l a lane, L lanes, V chunks (stages) per lane.
#pragma once

#include <gpipe/program.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <deque>
#include <map>
#include <utility>
#include <vector>

namespace gpipe::detail {

// Note [The anchor's orders]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~
// Each generator below writes lane l's compute actions in the order
// pipelining's `_calculate_single_rank_operations(rank = l)` gives (its
// idle steps dropped: the executor waits on what an action needs, not on a
// clock). Two of them need more micro-batches than some m (ZB-V: 2L - 1,
// DualPipeV: 2L; interleaved zero bubble: a multiple of its rounds) and
// pipelining either pads and drops (ZB-V) or refuses (the others). Here all
// three are built for the smallest count that fits and the micro-batches
// from m on are left out, which keeps a program valid: what is left needs
// nothing that was left out, and each lane keeps its order (a run of the
// whole program, restricted to what is left, is a run of what is left).
// Compute only: lower() adds the messages.

/// Counts each (stage, op)'s next micro-batch, as the anchor's recipes do.
class NextMicrobatch {
 public:
  int64_t take(int64_t stage, Op op) {
    return next_[{stage, static_cast<int>(op)}]++;
  }

 private:
  std::map<std::pair<int64_t, int>, int64_t> next_;
};

/// Removes the actions on micro-batches from m on.
inline void keep_first_microbatches(std::vector<Action>& lane, int64_t m) {
  lane.erase(
      std::remove_if(
          lane.begin(),
          lane.end(),
          [m](const Action& action) { return action.microbatch >= m; }),
      lane.end());
}

/// Interleaved zero bubble (ZB1P) on lane l of L, V = stages / L chunks,
/// for m micro-batches that pipelining accepts (m a multiple of its rounds,
/// max(1, m / L)): the warm-up forwards of interleaved 1F1B less one per hop
/// from the last lane, then F and I alternating, with each lane's W's
/// deferred by l steps and then run one per step, the rest at the end.
inline std::vector<Action> interleaved_zero_bubble_lane(
    int64_t l,
    int64_t lanes,
    int64_t chunks,
    int64_t m) {
  const int64_t rounds = std::max<int64_t>(1, m / lanes);
  const int64_t per_round = m / rounds;
  const int64_t per_lane = chunks * m;
  const int64_t warmup =
      std::min((chunks - 1) * per_round + (lanes - 1 - l), per_lane);
  auto forward_stage = [&](int64_t step) {
    return (step / per_round) % chunks * lanes + l;
  };
  auto backward_stage = [&](int64_t step) {
    return (chunks - 1 - (step - warmup) / per_round % chunks) * lanes + l;
  };
  NextMicrobatch next;
  std::vector<Action> mine;
  std::vector<int64_t> backward_steps;
  size_t weights = 0;
  auto add = [&](int64_t stage, Op op) {
    mine.push_back({stage, op, next.take(stage, op)});
  };
  auto add_weight = [&]() {
    add(backward_stage(backward_steps[weights++]), Op::W);
  };
  for (int64_t step = 0; step < warmup + per_lane; ++step) {
    if (step < per_lane) {
      add(forward_stage(step), Op::F);
    }
    if (step >= warmup) {
      add(backward_stage(step), Op::I);
      backward_steps.push_back(step);
      if (step - warmup >= l) {
        add_weight();
      }
    }
  }
  while (weights < backward_steps.size()) {
    add_weight();
  }
  return mine;
}

/// ZB-V on lane l of L (stages l and 2L - 1 - l), for m >= 2L - 1: warm-up
/// forwards down the V, then for each micro-batch F, I and W on the way up,
/// alternating between the two stages, then the I's of both, then the W's.
inline std::vector<Action> zero_bubble_v_lane(
    int64_t l,
    int64_t lanes,
    int64_t m) {
  const int64_t down = l;
  const int64_t up = 2 * lanes - 1 - l;
  std::vector<Action> mine;
  int64_t f_down = 0;
  int64_t f_up = 0;
  int64_t i_down = 0;
  int64_t i_up = 0;
  int64_t w_down = 0;
  int64_t w_up = 0;
  auto add = [&](int64_t stage, Op op, int64_t& count) {
    mine.push_back({stage, op, count++});
  };
  for (int64_t k = 0; k < 2 * (lanes - l) - 1; ++k) {
    add(down, Op::F, f_down);
  }
  for (int64_t k = 0; k < l; ++k) {
    add(up, Op::F, f_up);
    add(down, Op::F, f_down);
  }
  for (int64_t k = 0; k < lanes - l; ++k) {
    add(up, Op::F, f_up);
    add(up, Op::I, i_up);
    add(up, Op::W, w_up);
  }
  while (f_up < f_down || f_down < m) {
    if (f_down < m) {
      add(down, Op::F, f_down);
    }
    add(down, Op::I, i_down);
    add(down, Op::W, w_down);
    add(up, Op::F, f_up);
    add(up, Op::I, i_up);
    add(up, Op::W, w_up);
  }
  for (int64_t k = 0; k < l; ++k) {
    add(down, Op::I, i_down);
    add(up, Op::I, i_up);
  }
  for (int64_t k = 0; k < lanes - l; ++k) {
    add(down, Op::I, i_down);
    add(down, Op::W, w_down);
  }
  while (w_up < i_up) {
    add(up, Op::W, w_up);
  }
  while (w_down < i_down) {
    add(down, Op::W, w_down);
  }
  return mine;
}

/// DualPipeV on lane l of L (stages l and 2L - 1 - l), for m >= 2L, in
/// DeepSeek's eight steps: forwards down, forwards on both, I W F up, then
/// the steady state of pairs (F on one stage, B on the other), the
/// backwards' drain, then the deferred W's. A pair runs as its F then its B.
inline std::vector<Action> dual_pipe_v_lane(
    int64_t l,
    int64_t lanes,
    int64_t m) {
  const int64_t down = l;
  const int64_t up = 2 * lanes - 1 - l;
  NextMicrobatch next;
  std::deque<std::pair<int64_t, int64_t>> weights; // after their I
  std::vector<Action> mine;
  auto forward = [&](int64_t stage) {
    mine.push_back({stage, Op::F, next.take(stage, Op::F)});
  };
  // A full backward takes the I counter's micro-batch and advances both.
  auto backward = [&](int64_t stage) {
    mine.push_back({stage, Op::B, next.take(stage, Op::I)});
    next.take(stage, Op::W);
  };
  auto input_gradient = [&](int64_t stage) {
    const int64_t i = next.take(stage, Op::I);
    mine.push_back({stage, Op::I, i});
    weights.emplace_back(stage, i);
  };
  auto backward_or_input = [&](int64_t stage, bool split) {
    split ? input_gradient(stage) : backward(stage);
  };
  auto pending_weight = [&]() {
    if (!weights.empty()) {
      mine.push_back({weights.front().first, Op::W, weights.front().second});
      weights.pop_front();
    }
  };
  for (int64_t k = 0; k < 2 * (lanes - l - 1); ++k) {
    forward(down);
  }
  for (int64_t k = 0; k < l + 1; ++k) {
    forward(down);
    forward(up);
  }
  for (int64_t k = 0; k < lanes - l - 1; ++k) {
    input_gradient(up);
    pending_weight();
    forward(up);
  }
  for (int64_t k = 0; k < m - 2 * lanes + l + 1; ++k) {
    forward(down);
    backward(up);
    forward(up);
    backward(down);
  }
  for (int64_t k = 0; k < lanes - l - 1; ++k) {
    backward(up);
    forward(up);
    backward(down);
  }
  bool split = false;
  const int64_t half = (l + 1) / 2;
  for (int64_t k = 0; k < l + 1; ++k) {
    split = split || (k == half && l % 2 == 1);
    backward_or_input(up, split);
    split = split || (k == half && l % 2 == 0);
    backward_or_input(down, split);
  }
  for (int64_t k = 0; k < lanes - l - 1; ++k) {
    pending_weight();
    backward_or_input(down, split);
  }
  for (int64_t k = 0; k < l + 1; ++k) {
    pending_weight();
  }
  return mine;
}

} // namespace gpipe::detail
