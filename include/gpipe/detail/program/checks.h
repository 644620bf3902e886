// What can be checked of a program without running it, one check a
// function: its shape (stages, micro-batches, lanes, lane_of_stage), each
// action in range and on its stage's lane, each action once and in an order
// that can work (a consumer after its producer and its receive), every send
// matched by a receive, and nothing missing. Each fault is printed on the
// grid of a run up to where it happens (runner.h).
#pragma once

#include <gpipe/detail/program/runner.h>
#include <gpipe/program.h>
#include <gpipe/simulation.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace gpipe::detail {

/// How many times each (op, stage, micro-batch) appears in a program.
class ActionCounts {
 public:
  explicit ActionCounts(const Program& p)
      : stages_(p.stages),
        m_(p.microbatches),
        count_(static_cast<size_t>(8 * p.stages * p.microbatches), 0) {}

  int& operator()(Op op, int64_t s, int64_t i) {
    return count_[index(op, s, i)];
  }
  /// Whether the action appears; false for a stage out of range.
  bool has(Op op, int64_t s, int64_t i) const {
    return s >= 0 && s < stages_ && count_[index(op, s, i)] > 0;
  }

 private:
  size_t index(Op op, int64_t s, int64_t i) const {
    return static_cast<size_t>(
        (static_cast<int64_t>(op) * stages_ + s) * m_ + i);
  }
  int64_t stages_;
  int64_t m_;
  std::vector<int> count_;
};

/// At least one stage, micro-batch and lane, and every stage on a lane.
inline void check_shape(const Program& p) {
  const auto lanes = static_cast<int64_t>(p.lanes.size());
  auto reject = [&](const std::string& fault) {
    reject_program(fault, {}, lanes, "before step 0");
  };
  if (p.stages < 1 || p.microbatches < 1 || lanes < 1) {
    reject(
        "needs at least one stage, micro-batch and lane (stages: " +
        std::to_string(p.stages) +
        ", micro-batches: " + std::to_string(p.microbatches) +
        ", lanes: " + std::to_string(lanes) + ")");
  }
  if (static_cast<int64_t>(p.lane_of_stage.size()) != p.stages) {
    reject(
        "lane_of_stage has " + std::to_string(p.lane_of_stage.size()) +
        " entries for " + std::to_string(p.stages) + " stages");
  }
  for (int64_t s = 0; s < p.stages; ++s) {
    const int64_t l = p.lane_of_stage[static_cast<size_t>(s)];
    if (l < 0 || l >= lanes) {
      reject(
          "stage " + std::to_string(s) + " is on lane " + std::to_string(l) +
          ", out of range (lanes: " + std::to_string(lanes) + ")");
    }
  }
  // Every (stage, micro-batch) needs its F: fewer compute actions than that
  // can never be valid, and the checks below size tables by stages x
  // micro-batches, which a stray huge micro-batch number would blow up.
  int64_t compute = 0;
  for (const auto& lane : p.lanes) {
    compute += std::count_if(lane.begin(), lane.end(), [](const Action& a) {
      return is_compute(a.op);
    });
  }
  if (compute / p.stages < p.microbatches) {
    reject(
        "has " + std::to_string(compute) +
        " compute actions, fewer than one F per stage and micro-batch (stages: " +
        std::to_string(p.stages) +
        ", micro-batches: " + std::to_string(p.microbatches) + ")");
  }
}

/// Every action in range and on its stage's lane; returns the counts.
inline ActionCounts count_actions(const Program& p) {
  ActionCounts counts(p);
  for (size_t l = 0; l < p.lanes.size(); ++l) {
    for (size_t k = 0; k < p.lanes[l].size(); ++k) {
      const Action& a = p.lanes[l][k];
      if (a.stage < 0 || a.stage >= p.stages || a.microbatch < 0 ||
          a.microbatch >= p.microbatches) {
        reject_at(
            p,
            lane_action(l, a) +
                " is out of range (stages: " + std::to_string(p.stages) +
                ", micro-batches: " + std::to_string(p.microbatches) + ")",
            l,
            k);
      }
      const int64_t home = p.lane_of_stage[static_cast<size_t>(a.stage)];
      if (home != static_cast<int64_t>(l)) {
        reject_at(
            p,
            lane_action(l, a) + " is on lane " + std::to_string(l) +
                ", but stage " + std::to_string(a.stage) + " runs on lane " +
                std::to_string(home),
            l,
            k);
      }
      ++counts(a.op, a.stage, a.microbatch);
    }
  }
  return counts;
}

/// Walks each lane in order, checking each action against what its lane
/// has done before it (the same lane holds every action of a stage). A
/// send or receive without its match is kept, to report after what is
/// missing: a missing B leaves its stage's gradient unsent, and the B is
/// the fault.
class OrderCheck {
 public:
  OrderCheck(const Program& p, const ActionCounts& counts)
      : p_(p), counts_(counts), seen_(p) {}

  void run() {
    for (l_ = 0; l_ < p_.lanes.size(); ++l_) {
      for (k_ = 0; k_ < p_.lanes[l_].size(); ++k_) {
        a_ = p_.lanes[l_][k_];
        if (seen_(a_.op, a_.stage, a_.microbatch)++ > 0) {
          fail("appears twice");
        }
        if (is_compute(a_.op)) {
          check_compute();
        } else {
          check_message();
        }
      }
    }
  }

  /// The first unmatched send or receive, once `run` is done.
  void reject_unmatched() const {
    if (!unmatched_.empty()) {
      reject_at(p_, unmatched_, unmatched_lane_, unmatched_at_);
    }
  }

 private:
  void check_compute() {
    const int64_t s = a_.stage;
    if (a_.op == Op::F) {
      if (s > 0 && apart(p_, s - 1, s) && !was_seen(Op::RECV_F, s)) {
        fail(
            "comes before its receive " + text(Op::RECV_F, s) + " (stage " +
            std::to_string(s - 1) + " runs on lane " + lane_text(s - 1) + ")");
      }
      return;
    }
    if (a_.op == Op::B && (counted(Op::I, s) || counted(Op::W, s))) {
      fail(
          "and " + text(counted(Op::I, s) ? Op::I : Op::W, s) +
          " both appear: a backward is either B, or I and W");
    }
    if (a_.op != Op::B && counted(Op::B, s)) {
      fail(
          "and " + text(Op::B, s) +
          " both appear: a backward is either B, or I and W");
    }
    if (a_.op == Op::W) {
      if (!was_seen(Op::I, s)) {
        fail("comes before its input gradient " + text(Op::I, s));
      }
      return;
    }
    if (!was_seen(Op::F, s)) {
      fail("comes before its forward " + text(Op::F, s));
    }
    if (s + 1 < p_.stages && apart(p_, s, s + 1) && !was_seen(Op::RECV_B, s)) {
      fail(
          "comes before its receive " + text(Op::RECV_B, s) + " (stage " +
          std::to_string(s + 1) + " runs on lane " + lane_text(s + 1) + ")");
    }
  }

  void check_message() {
    const int64_t s = a_.stage;
    switch (a_.op) {
      case Op::SEND_F:
        check_peer(s + 1);
        if (!was_seen(Op::F, s)) {
          fail("comes before " + text(Op::F, s) + ", which it sends");
        }
        match(Op::RECV_F, s + 1, "receive");
        break;
      case Op::RECV_F:
        check_peer(s - 1);
        match(Op::SEND_F, s - 1, "send");
        break;
      case Op::SEND_B:
        check_peer(s - 1);
        if (!was_seen(Op::B, s) && !was_seen(Op::I, s)) {
          fail(
              "comes before " + text(Op::B, s) + " or " + text(Op::I, s) +
              ", which it sends");
        }
        match(Op::RECV_B, s - 1, "receive");
        break;
      case Op::RECV_B:
        check_peer(s + 1);
        match(Op::SEND_B, s + 1, "send");
        break;
      default:
        break;
    }
  }

  /// A neighbour to talk to: it exists and is on another lane.
  void check_peer(int64_t peer) {
    const int64_t s = a_.stage;
    if (peer < 0 || peer >= p_.stages) {
      fail(
          "talks to stage " + std::to_string(peer) +
          ", which does not exist (stages: " + std::to_string(p_.stages) + ")");
    }
    if (!apart(p_, s, peer)) {
      fail(
          "talks between stages " + std::to_string(std::min(s, peer)) +
          " and " + std::to_string(std::max(s, peer)) + ", which share lane " +
          lane_text(s) +
          " (communication is only between neighbours on different lanes)");
    }
  }

  /// Keeps the first send or receive whose `op` at `stage` never appears.
  void match(Op op, int64_t stage, const char* kind) {
    if (!counted(op, stage) && unmatched_.empty()) {
      unmatched_ = lane_action(l_, a_) + " has no matching " + kind + " " +
          text(op, stage);
      unmatched_lane_ = l_;
      unmatched_at_ = k_;
    }
  }

  [[noreturn]] void fail(const std::string& why) const {
    reject_at(p_, lane_action(l_, a_) + " " + why, l_, k_);
  }
  bool was_seen(Op op, int64_t stage) const {
    return seen_.has(op, stage, a_.microbatch);
  }
  bool counted(Op op, int64_t stage) const {
    return counts_.has(op, stage, a_.microbatch);
  }
  std::string text(Op op, int64_t stage) const {
    return to_string(Action{stage, op, a_.microbatch});
  }
  std::string lane_text(int64_t stage) const {
    return std::to_string(p_.lane_of_stage[static_cast<size_t>(stage)]);
  }

  const Program& p_;
  const ActionCounts& counts_;
  ActionCounts seen_; // up to the action being checked
  size_t l_ = 0;
  size_t k_ = 0;
  Action a_;
  std::string unmatched_;
  size_t unmatched_lane_ = 0;
  size_t unmatched_at_ = 0;
};

/// Every (stage, micro-batch) has its F, and, in a program with any
/// backward, its B or its I and W; what is missing is shown on the grid of
/// the whole run.
inline void check_complete(const Program& p, const ActionCounts& counts) {
  bool backward = false;
  for (const auto& lane : p.lanes) {
    for (const Action& a : lane) {
      backward = backward || a.op == Op::B || a.op == Op::I || a.op == Op::W;
    }
  }
  std::string missing;
  for (int64_t s = 0; s < p.stages && missing.empty(); ++s) {
    for (int64_t i = 0; i < p.microbatches && missing.empty(); ++i) {
      auto has = [&](Op op) { return counts.has(op, s, i); };
      auto text = [&](Op op) { return to_string(Action{s, op, i}); };
      if (!has(Op::F)) {
        missing = text(Op::F) + " is missing";
      } else if (backward && !has(Op::B) && !has(Op::I)) {
        missing = text(Op::B) + " is missing (or " + text(Op::I) + " and " +
            text(Op::W) + ")";
      } else if (has(Op::I) && !has(Op::W)) {
        missing = text(Op::W) + " is missing";
      }
    }
  }
  if (missing.empty()) {
    return;
  }
  Runner runner(p, unit_costs(), false);
  const Run run = runner.run(no_limit(p));
  const double end = end_of(run);
  reject_program(
      missing,
      grid_of(run, end),
      static_cast<int64_t>(p.lanes.size()),
      "step " + std::to_string(std::llround(end)) + ": " +
          (run.finished ? std::string("every lane is done")
                        : waits(p, runner, run)));
}

/// Every check above, in the order their faults are reported.
inline void check_program(const Program& p) {
  check_shape(p);
  const ActionCounts counts = count_actions(p);
  OrderCheck order(p, counts);
  order.run();
  check_complete(p, counts);
  order.reject_unmatched();
}

/// The unit-time run of a checked program: its grid, and a deadlock
/// reported on it.
inline Run unit_time_run(const Program& program) {
  Runner unit(program, unit_costs(), false);
  Run layout = unit.run(no_limit(program));
  if (!layout.finished) {
    const std::string waiting = waits(program, unit, layout);
    const double end = end_of(layout);
    reject_program(
        "deadlock (" + waiting + ")",
        grid_of(layout, end),
        static_cast<int64_t>(program.lanes.size()),
        "step " + std::to_string(std::llround(end)) + ": " + waiting);
  }
  return layout;
}

} // namespace gpipe::detail
