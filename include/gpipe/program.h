// A pipeline program: what each lane (a worker thread, a device) runs, in
// order, written as text such as "lane 0: 0F0 0F1 0SEND_F0 0B0".
//
// Why a program and not a schedule enum: every schedule (fill-drain, 1F1B,
// interleaved, zero bubble) and every placement of stages on lanes comes down
// to one list of actions per lane, so the pipeline runs lists, the validator
// (simulate.h) checks lists, and a reader compares lists with the paper's
// figure. The text form is the one a test writes as a literal and a failing
// check prints. Letters: m micro-batches, s a stage, i a micro-batch, l a
// lane.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <map>
#include <ostream>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace gpipe {

/// What a stage does to a micro-batch. F forward; B backward (input and
/// weight gradients at once); I and W the two halves of a split backward
/// (gradient of the input, gradient of the weights); SEND and RECV move an
/// activation (F) or a gradient (B) between neighbouring stages on different
/// lanes.
enum class Op { F, B, I, W, SEND_F, RECV_F, SEND_B, RECV_B };

/// Every Op, in declaration order.
constexpr Op kOps[] = {
    Op::F,
    Op::B,
    Op::I,
    Op::W,
    Op::SEND_F,
    Op::RECV_F,
    Op::SEND_B,
    Op::RECV_B};

/// "F", "B", "I", "W", "SEND_F", "RECV_F", "SEND_B" or "RECV_B".
inline const char* to_string(Op op) {
  switch (op) {
    case Op::F:
      return "F";
    case Op::B:
      return "B";
    case Op::I:
      return "I";
    case Op::W:
      return "W";
    case Op::SEND_F:
      return "SEND_F";
    case Op::RECV_F:
      return "RECV_F";
    case Op::SEND_B:
      return "SEND_B";
    case Op::RECV_B:
      return "RECV_B";
  }
  return "unknown";
}

inline std::ostream& operator<<(std::ostream& os, Op op) {
  return os << to_string(op);
}

/// F, B, I or W: the actions that compute (the others communicate).
inline bool is_compute(Op op) {
  return op == Op::F || op == Op::B || op == Op::I || op == Op::W;
}

/// One thing a lane does: op on micro-batch i of a stage.
struct Action {
  /// The stage (partition) s it runs on.
  int64_t stage = 0;
  /// What it does.
  Op op = Op::F;
  /// The micro-batch i.
  int64_t microbatch = 0;

  /// The forward of micro-batch `i` on `stage`.
  static Action forward(int64_t i, int64_t stage = 0) {
    return {stage, Op::F, i};
  }
  /// The full backward of micro-batch `i` on `stage`.
  static Action backward(int64_t i, int64_t stage = 0) {
    return {stage, Op::B, i};
  }
  /// Same stage, op and micro-batch.
  bool operator==(const Action& other) const {
    return stage == other.stage && op == other.op &&
        microbatch == other.microbatch;
  }
  /// Not `==`.
  bool operator!=(const Action& other) const {
    return !(*this == other);
  }
};

/// Stage, op, micro-batch: "2F0", "2I5", "2W5", "2SEND_F0", "0RECV_B3".
inline std::string to_string(const Action& action) {
  // Appended piece by piece: GCC 12 warns falsely (-Wrestrict, GCC bug
  // 105329) on `std::to_string(s) + "F"` once inlined.
  std::string text = std::to_string(action.stage);
  text += to_string(action.op);
  text += std::to_string(action.microbatch);
  return text;
}

inline std::ostream& operator<<(std::ostream& os, const Action& action) {
  return os << to_string(action);
}

/// The action `text` names ("2F0", "0RECV_B3"); throws a c10::Error naming
/// the text when it is not one.
inline Action parse_action(const std::string& text) {
  auto fail = [&]() {
    TORCH_CHECK(
        false,
        "gpipe: cannot parse action '",
        text,
        "': expected <stage><op><micro-batch>, such as 2F0 or 0RECV_B3 (ops: F, B, I, W, SEND_F, RECV_F, SEND_B, RECV_B)");
  };
  size_t k = 0;
  auto number = [&]() {
    const size_t begin = k;
    while (k < text.size() &&
           std::isdigit(static_cast<unsigned char>(text[k]))) {
      ++k;
    }
    if (k == begin || k - begin > 9) {
      fail();
    }
    return static_cast<int64_t>(std::stoll(text.substr(begin, k - begin)));
  };
  Action action;
  action.stage = number();
  const size_t op_begin = k;
  while (k < text.size() &&
         !std::isdigit(static_cast<unsigned char>(text[k]))) {
    ++k;
  }
  const std::string name = text.substr(op_begin, k - op_begin);
  bool known = false;
  for (const Op op : kOps) {
    if (name == to_string(op)) {
      action.op = op;
      known = true;
    }
  }
  if (!known) {
    fail();
  }
  action.microbatch = number();
  if (k != text.size()) {
    fail();
  }
  return action;
}

/// What every lane runs: lanes[l] in order. Stage s runs on lane
/// lane_of_stage[s]; several stages may share a lane (interleaving, or every
/// stage on one CPU thread).
struct Program {
  /// The number of stages (partitions) n.
  int64_t stages = 0;
  /// The number of micro-batches m.
  int64_t microbatches = 0;
  /// The lane of each stage, `stages` entries numbered 0..L-1.
  std::vector<int64_t> lane_of_stage;
  /// Per lane, the actions it runs, in order.
  std::vector<std::vector<Action>> lanes;

  /// Same stages, micro-batches, placement and actions in the same order.
  bool operator==(const Program& other) const {
    return stages == other.stages && microbatches == other.microbatches &&
        lane_of_stage == other.lane_of_stage && lanes == other.lanes;
  }
  /// Not `==`.
  bool operator!=(const Program& other) const {
    return !(*this == other);
  }
};

/// One line per lane and nothing else: "lane 0: 0F0 0F1 0B0 ...\n".
inline std::string format_program(const Program& program) {
  std::string text;
  for (size_t l = 0; l < program.lanes.size(); ++l) {
    text += "lane ";
    text += std::to_string(l);
    text += ":";
    for (const auto& action : program.lanes[l]) {
      text += " ";
      text += to_string(action);
    }
    text += "\n";
  }
  return text;
}

inline std::ostream& operator<<(std::ostream& os, const Program& program) {
  return os << format_program(program);
}

/// The program `text` writes, one "lane l: actions" line per lane (lanes
/// 0..L-1, each once, in any order; blank lines and '#' comments allowed).
/// The stage and micro-batch counts are the largest ones named plus one, and
/// a stage's lane is the lane its actions appear on (the first, where they
/// appear on several: simulate rejects that). parse_program(format_program(p))
/// == p for every valid p.
inline Program parse_program(const std::string& text) {
  Program program;
  // Lanes and stages are collected before anything is sized by the largest
  // number named, so that "lane 999999999:" or "999999999F0" is an error,
  // not a gigabyte allocation.
  std::map<size_t, std::vector<Action>> lanes;
  std::set<int64_t> stages;
  std::istringstream lines(text);
  std::string line;
  int64_t number = 0;
  while (std::getline(lines, line)) {
    ++number;
    auto fail = [&](const std::string& why) {
      TORCH_CHECK(
          false,
          "gpipe: cannot parse program line ",
          number,
          ": ",
          why,
          " (line: '",
          line,
          "')");
    };
    const std::string code = line.substr(0, line.find('#'));
    std::istringstream words(code);
    std::string word;
    if (!(words >> word)) {
      continue;
    }
    if (word != "lane") {
      fail("expected 'lane <l>: <actions>'");
    }
    std::string label;
    if (!(words >> label) || label.size() < 2 || label.back() != ':') {
      fail("expected 'lane <l>: <actions>'");
    }
    label.pop_back();
    if (label.size() > 9 ||
        !std::all_of(label.begin(), label.end(), [](char c) {
          return std::isdigit(static_cast<unsigned char>(c));
        })) {
      fail("'" + label + "' is not a lane number");
    }
    const auto l = static_cast<size_t>(std::stoll(label));
    if (lanes.count(l) > 0) {
      fail("lane " + label + " appears twice");
    }
    auto& mine = lanes[l];
    while (words >> word) {
      Action action;
      try {
        action = parse_action(word);
      } catch (const c10::Error& e) {
        // The action's message, without a second "gpipe: " prefix.
        const std::string why = e.msg();
        fail(why.rfind("gpipe: ", 0) == 0 ? why.substr(7) : why);
      }
      mine.push_back(action);
      stages.insert(action.stage);
      program.stages = std::max(program.stages, action.stage + 1);
      program.microbatches =
          std::max(program.microbatches, action.microbatch + 1);
    }
  }
  const size_t lane_count = lanes.empty() ? 0 : lanes.rbegin()->first + 1;
  size_t expected = 0;
  for (const auto& lane : lanes) {
    TORCH_CHECK(
        lane.first == expected,
        "gpipe: cannot parse program: lane ",
        expected,
        " is missing (lanes: ",
        lane_count,
        ")");
    ++expected;
    program.lanes.push_back(std::move(lane.second));
  }
  int64_t next_stage = 0;
  for (const int64_t s : stages) {
    TORCH_CHECK(
        s == next_stage,
        "gpipe: cannot parse program: stage ",
        next_stage,
        " has no actions (stages: ",
        program.stages,
        ")");
    ++next_stage;
  }
  program.lane_of_stage.assign(static_cast<size_t>(program.stages), -1);
  for (size_t l = 0; l < program.lanes.size(); ++l) {
    for (const auto& action : program.lanes[l]) {
      auto& lane = program.lane_of_stage[static_cast<size_t>(action.stage)];
      if (lane == -1) {
        lane = static_cast<int64_t>(l);
      }
    }
  }
  return program;
}

namespace detail {

/// The lane of stage s, or -1 where s or its lane is out of range.
inline int64_t lane_of(const Program& program, int64_t s) {
  if (s < 0 || s >= static_cast<int64_t>(program.lane_of_stage.size())) {
    return -1;
  }
  const int64_t l = program.lane_of_stage[static_cast<size_t>(s)];
  return l >= 0 && l < static_cast<int64_t>(program.lanes.size()) ? l : -1;
}

/// Whether stages s and t are both placed, on different lanes.
inline bool apart(const Program& program, int64_t s, int64_t t) {
  const int64_t a = lane_of(program, s);
  const int64_t b = lane_of(program, t);
  return a != -1 && b != -1 && a != b;
}

} // namespace detail

/// The program with its communication: where neighbouring stages sit on
/// different lanes, a SEND right after the action that produces an
/// activation (F) or a gradient (B, I) and a RECV right before the action
/// that consumes it. A program that already communicates is returned
/// unchanged (simulate checks what it has).
inline Program lower(const Program& program) {
  for (const auto& lane : program.lanes) {
    for (const auto& action : lane) {
      if (!is_compute(action.op)) {
        return program;
      }
    }
  }
  Program lowered = program;
  for (auto& lane : lowered.lanes) {
    std::vector<Action> with;
    with.reserve(lane.size() * 2);
    for (const auto& a : lane) {
      const int64_t s = a.stage;
      const int64_t i = a.microbatch;
      const bool backward = a.op == Op::B || a.op == Op::I;
      if (a.op == Op::F && detail::apart(program, s - 1, s)) {
        with.push_back({s, Op::RECV_F, i});
      }
      if (backward && detail::apart(program, s, s + 1)) {
        with.push_back({s, Op::RECV_B, i});
      }
      with.push_back(a);
      if (a.op == Op::F && detail::apart(program, s, s + 1)) {
        with.push_back({s, Op::SEND_F, i});
      }
      if (backward && detail::apart(program, s - 1, s)) {
        with.push_back({s, Op::SEND_B, i});
      }
    }
    lane = std::move(with);
  }
  return lowered;
}

} // namespace gpipe
