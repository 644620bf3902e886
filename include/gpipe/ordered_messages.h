// Whether a program can run with its messages matched by order, as NCCL
// matches them.
//
// Why: NCCL ignores tags. It pairs the k-th send from one rank to another
// with the k-th receive posted there, and a send completes only once its
// receive is posted. Gloo's tags hide both problems; over NCCL a program
// that is valid in one process can deliver an activation to the wrong
// micro-batch or wait forever. This header proves, before the first step,
// that it will do neither.
//
// Note [Messages matched by order]
// Between two computations, a lane's communication actions form one batch,
// which the transport issues as one coalesced group (ncclGroupStart/End):
// the group's messages progress independently, and the lane goes on once
// each of them has met its other end, which it does once both ends' groups
// were issued. `lower` receives right before the consumer, which is valid
// with tags but not by order: a rank may send two activations in one order
// while its peer, busy elsewhere, consumes them in the other. So
// `lower_for_ordered_messages` places the communication by time instead:
// it runs the program's unit-time simulation, which every rank computes
// alike, sends each message right after its producer as before, and posts
// each receive in the receiver's first batch at or after the moment its
// message leaves, receives sorted by that moment. Between two lanes, both
// ends then order their messages by the moment they leave, so the k-th
// message matches itself. `check_ordered_messages` proves it for the
// program at hand, and that no group waits forever: it runs every lane by
// these rules (a computation runs once reached; a group holds its lane until
// each of its messages' other end was issued). Receivers must know the
// shapes before they issue a group, so a step whose shapes are not yet
// agreed goes with tags instead (Note [Shapes are agreed once per batch
// shape]). A Gloo transport can follow the same rules
// (DistributedOptions::match_by_order) to run on CPUs what NCCL would.
#pragma once

#include <gpipe/program.h>
#include <gpipe/simulate.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace gpipe {
namespace detail {

/// Where a communication action's message goes: (receiving stage,
/// micro-batch, 0 for an activation and 1 for a gradient).
using MessageAddress = std::tuple<int64_t, int64_t, int>;

inline MessageAddress message_address(const Action& action) {
  switch (action.op) {
    case Op::SEND_F:
      return {action.stage + 1, action.microbatch, 0};
    case Op::RECV_F:
      return {action.stage, action.microbatch, 0};
    case Op::SEND_B:
      return {action.stage - 1, action.microbatch, 1};
    case Op::RECV_B:
      return {action.stage, action.microbatch, 1};
    default:
      TORCH_INTERNAL_ASSERT(
          false, "gpipe: ", to_string(action), " sends no message");
  }
  return {};
}

inline bool is_send(Op op) {
  return op == Op::SEND_F || op == Op::SEND_B;
}

} // namespace detail

/// The program `lower` made, with its receives placed by time (Note
/// [Messages matched by order]). Computations and sends keep their places.
inline Program lower_for_ordered_messages(const Program& lowered) {
  const Simulation run = simulate(lowered);
  std::map<detail::MessageAddress, double> leaves_at;
  for (const auto& lane : run.lanes) {
    for (const auto& timed : lane) {
      if (detail::is_send(timed.action.op)) {
        leaves_at[detail::message_address(timed.action)] = timed.start;
      }
    }
  }
  Program placed = lowered;
  for (size_t l = 0; l < run.lanes.size(); ++l) {
    const auto& timed = run.lanes[l];
    std::vector<std::pair<double, Action>> receives;
    for (const auto& t : timed) {
      if (!is_compute(t.action.op) && !detail::is_send(t.action.op)) {
        receives.emplace_back(
            leaves_at.at(detail::message_address(t.action)), t.action);
      }
    }
    std::sort(
        receives.begin(), receives.end(), [](const auto& a, const auto& b) {
          return std::make_pair(a.first, detail::message_address(a.second)) <
              std::make_pair(b.first, detail::message_address(b.second));
        });
    auto& lane = placed.lanes[l];
    lane.clear();
    size_t next = 0;
    for (const auto& t : timed) {
      if (detail::is_send(t.action.op)) {
        lane.push_back(t.action);
      } else if (is_compute(t.action.op)) {
        while (next < receives.size() && receives[next].first <= t.start) {
          lane.push_back(receives[next++].second);
        }
        lane.push_back(t.action);
      }
    }
    TORCH_INTERNAL_ASSERT(
        next == receives.size(),
        "gpipe: a receive after its lane's last computation");
  }
  return placed;
}

/// Throws a `gpipe:` error naming the actions involved unless the valid,
/// lowered `program` runs with its messages matched by order (Note
/// [Messages matched by order]).
inline void check_ordered_messages(const Program& program) {
  const int64_t lanes = static_cast<int64_t>(program.lanes.size());
  auto lane_of_stage = [&](int64_t s) {
    return program.lane_of_stage[static_cast<size_t>(s)];
  };
  // (a) the k-th message from lane a to lane b is the same at both ends.
  std::map<std::pair<int64_t, int64_t>, std::vector<Action>> sent;
  std::map<std::pair<int64_t, int64_t>, std::vector<Action>> received;
  for (int64_t l = 0; l < lanes; ++l) {
    for (const Action& action : program.lanes[static_cast<size_t>(l)]) {
      if (is_compute(action.op)) {
        continue;
      }
      const auto [to_stage, i, backward] = detail::message_address(action);
      if (detail::is_send(action.op)) {
        sent[{l, lane_of_stage(to_stage)}].push_back(action);
      } else {
        const int64_t from_stage = backward ? to_stage + 1 : to_stage - 1;
        received[{lane_of_stage(from_stage), l}].push_back(action);
      }
    }
  }
  for (const auto& [link, sends] : sent) {
    const auto& receives = received[link];
    for (size_t k = 0; k < std::min(sends.size(), receives.size()); ++k) {
      TORCH_CHECK(
          detail::message_address(sends[k]) ==
              detail::message_address(receives[k]),
          "gpipe: this program cannot run with messages matched by order ",
          "(NCCL): message ",
          k,
          " from lane ",
          link.first,
          " to lane ",
          link.second,
          " is ",
          to_string(sends[k]),
          " at the sender but ",
          to_string(receives[k]),
          " at the receiver");
    }
  }
  // (b) run the lanes: a group holds its lane until each of its messages'
  // other end was issued.
  std::vector<size_t> at(static_cast<size_t>(lanes), 0); // next action
  std::vector<bool> holding(static_cast<size_t>(lanes), false);
  // Per message, bit 0: its send was issued; bit 1: its receive.
  std::map<detail::MessageAddress, int> issued;
  auto batch_end = [&](const std::vector<Action>& lane, size_t k) {
    while (k < lane.size() && !is_compute(lane[k].op)) {
      ++k;
    }
    return k;
  };
  bool moved = true;
  while (moved) {
    moved = false;
    for (int64_t l = 0; l < lanes; ++l) {
      const auto& lane = program.lanes[static_cast<size_t>(l)];
      auto& k = at[static_cast<size_t>(l)];
      while (k < lane.size()) {
        if (is_compute(lane[k].op)) {
          ++k;
          moved = true;
          continue;
        }
        const size_t end = batch_end(lane, k);
        if (!holding[static_cast<size_t>(l)]) {
          holding[static_cast<size_t>(l)] = true;
          for (size_t a = k; a < end; ++a) {
            issued[detail::message_address(lane[a])] |=
                detail::is_send(lane[a].op) ? 1 : 2;
          }
          moved = true;
        }
        bool met = true;
        for (size_t a = k; a < end && met; ++a) {
          met = issued[detail::message_address(lane[a])] == 3;
        }
        if (!met) {
          break;
        }
        holding[static_cast<size_t>(l)] = false;
        k = end;
        moved = true;
      }
    }
  }
  std::string stuck;
  for (int64_t l = 0; l < lanes; ++l) {
    const auto& lane = program.lanes[static_cast<size_t>(l)];
    const size_t k = at[static_cast<size_t>(l)];
    if (k < lane.size()) {
      stuck += (stuck.empty() ? "" : ", ") + std::string("lane ") +
          std::to_string(l) + " at " + to_string(lane[k]);
    }
  }
  TORCH_CHECK(
      stuck.empty(),
      "gpipe: this program cannot run with messages matched by order ",
      "(NCCL): its coalesced groups wait for each other (",
      stuck,
      ")");
}

} // namespace gpipe
