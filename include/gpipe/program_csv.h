// Programs in torch.distributed.pipelining's CSV schedule files, read and
// written beside gpipe's own text form.
//
// Why: pipelining keeps a schedule as one list of action strings per rank
// and dumps and loads it as CSV, one row a rank (`_dump_csv`, `_load_csv`):
// compute-only, as its generators write it ("0F0,0F1,,0B1,0B0", an empty
// cell an idle step), or compute+comms, its runtime's lowered list with the
// sends and receives. Its actions are gpipe's under the same names (stage,
// op, micro-batch; SEND and RECV named by the stage that sends or receives,
// as here) and a rank is a lane, so a schedule written for pipelining runs
// in gpipe by reading its file, a gpipe program runs in pipelining's runtime
// by writing one, and the two libraries' schedules can be held side by side.
// What pipelining has and gpipe has not (overlapped pairs, FSDP actions,
// receives placed early) is spelled out at parse_program below. Letters: m
// micro-batches, s a stage, i a micro-batch, l a lane, r a row (a rank).
#pragma once

#include <gpipe/program.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <map>
#include <optional>
#include <ostream>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace gpipe {

/// How a program is written: gpipe's text ("lane 0: 0F0 0B0"), or one of
/// pipelining's two CSV forms.
enum class ProgramFormat {
  /// gpipe's own form: format_program, parse_program (program.h).
  Text,
  /// pipelining's compute-only CSV: F, B, I, W (and OVERLAP_F_B) per rank.
  PipeliningComputeOnly,
  /// pipelining's compute+comms CSV: every action of its runtime's list.
  PipeliningComputeComms,
};

/// "text", "pipelining_compute_only" or "pipelining_compute_comms".
inline const char* to_string(ProgramFormat format) {
  switch (format) {
    case ProgramFormat::Text:
      return "text";
    case ProgramFormat::PipeliningComputeOnly:
      return "pipelining_compute_only";
    case ProgramFormat::PipeliningComputeComms:
      return "pipelining_compute_comms";
  }
  return "unknown";
}

inline std::ostream& operator<<(std::ostream& os, ProgramFormat format) {
  return os << to_string(format);
}

namespace detail {

/// One cell of a CSV text, quotes undone, and where it is (1-based).
struct CsvCell {
  std::string text;
  int64_t row = 0;
  int64_t column = 0;
};

/// The cell's text for a message: at most 60 characters, bytes that do not
/// print as \xNN.
inline std::string printable(const std::string& text) {
  std::string out;
  for (size_t k = 0; k < text.size() && k < 60; ++k) {
    const auto c = static_cast<unsigned char>(text[k]);
    if (std::isprint(c)) {
      out += static_cast<char>(c);
    } else {
      const char* digits = "0123456789abcdef";
      out += "\\x";
      out += digits[c >> 4];
      out += digits[c & 15];
    }
  }
  return text.size() > 60 ? out + "..." : out;
}

/// Throws "gpipe: cannot parse pipelining CSV at row r (rank r - 1),
/// column c (both 1-based): why (cell: 'text')".
inline void reject_cell(const CsvCell& cell, const std::string& why) {
  TORCH_CHECK(
      false,
      "gpipe: cannot parse pipelining CSV at row ",
      cell.row,
      " (rank ",
      cell.row - 1,
      "), column ",
      cell.column,
      " (both 1-based): ",
      why,
      " (cell: '",
      printable(cell.text),
      "')");
}

/// The rows of a CSV text as Python's csv module writes and reads them
/// (pipelining's _dump_csv, _load_csv): cells split at ',', a cell in
/// double quotes may hold ',', '"' (doubled) and line ends, a line ends at
/// "\r\n", "\n" or "\r", and a line with nothing on it is a row (a rank
/// without actions). Stricter than Python's reader in one place: text after
/// a cell's closing quote is an error, not joined to the cell.
inline std::vector<std::vector<CsvCell>> csv_rows(const std::string& text) {
  std::vector<std::vector<CsvCell>> rows;
  const size_t n = text.size();
  size_t k = 0;
  auto at_cell_end = [&]() {
    return k == n || text[k] == ',' || text[k] == '\r' || text[k] == '\n';
  };
  while (k < n) {
    std::vector<CsvCell> row;
    const auto r = static_cast<int64_t>(rows.size()) + 1;
    for (int64_t column = 1;; ++column) {
      CsvCell cell{"", r, column};
      if (text[k] == '"') {
        bool closed = false;
        for (++k; k < n && !closed; ++k) {
          if (text[k] != '"') {
            cell.text += text[k];
          } else if (k + 1 < n && text[k + 1] == '"') {
            cell.text += '"';
            ++k;
          } else {
            closed = true;
          }
        }
        if (!closed) {
          reject_cell(cell, "its opening '\"' is never closed");
        }
        if (!at_cell_end()) {
          reject_cell(
              cell,
              "text follows its closing '\"'; expected ',' or the end of the line");
        }
      } else {
        while (!at_cell_end()) {
          cell.text += text[k++];
        }
      }
      row.push_back(std::move(cell));
      if (k == n || text[k] != ',') {
        break;
      }
      ++k;
      if (k == n) {
        row.push_back(CsvCell{"", r, column + 1});
        break;
      }
    }
    if (k < n && text[k] == '\r') {
      ++k;
    }
    if (k < n && text[k] == '\n') {
      ++k;
    }
    rows.push_back(std::move(row));
  }
  return rows;
}

/// The text without the spaces and tabs around it (pipelining strips them).
inline std::string trimmed(const std::string& text) {
  const size_t begin = text.find_first_not_of(" \t");
  if (begin == std::string::npos) {
    return "";
  }
  return text.substr(begin, text.find_last_not_of(" \t") - begin + 1);
}

/// pipelining's actions that gpipe drops: FSDP's unshard and reshard, and
/// the gradient reduction after a stage's last backward.
constexpr const char* kPipeliningFsdpOps[] = {
    "UNSHARD",
    "RESHARD",
    "REDUCE_GRAD"};

/// The one action `text` names ("2F0", "0SEND_F1"), or nothing for an FSDP
/// action ("1UNSHARD"); a fault names `cell`.
inline std::vector<Action> pipelining_action(
    const std::string& text,
    const CsvCell& cell) {
  const std::string expected =
      "expected <stage><op><micro-batch> such as 2F0 or 0RECV_B3, <stage><op> for UNSHARD, RESHARD and REDUCE_GRAD, or (<action>;<action>)OVERLAP_F_B";
  size_t k = 0;
  auto digits = [&]() {
    const size_t begin = k;
    while (k < text.size() &&
           std::isdigit(static_cast<unsigned char>(text[k]))) {
      ++k;
    }
    return text.substr(begin, k - begin);
  };
  const std::string stage = digits();
  const size_t op_begin = k;
  while (k < text.size() &&
         !std::isdigit(static_cast<unsigned char>(text[k]))) {
    ++k;
  }
  const std::string name = text.substr(op_begin, k - op_begin);
  const std::string microbatch = digits();
  if (stage.empty() || stage.size() > 9 || k != text.size()) {
    reject_cell(cell, expected);
  }
  for (const char* fsdp : kPipeliningFsdpOps) {
    if (name == fsdp) {
      if (!microbatch.empty()) {
        reject_cell(cell, name + " takes no micro-batch");
      }
      return {};
    }
  }
  for (const Op op : kOps) {
    if (name == to_string(op)) {
      if (microbatch.empty() || microbatch.size() > 9) {
        reject_cell(cell, name + " needs a micro-batch of 1 to 9 digits");
      }
      return {Action{std::stoll(stage), op, std::stoll(microbatch)}};
    }
  }
  reject_cell(
      cell,
      "unknown op '" + name +
          "' (pipelining's ops: F, B, I, W, SEND_F, RECV_F, SEND_B, RECV_B, UNSHARD, RESHARD, REDUCE_GRAD, OVERLAP_F_B)");
  return {};
}

/// The actions one cell holds, in order: none for an empty cell (an idle
/// step) or an FSDP action, one, or an OVERLAP_F_B's compute actions.
inline std::vector<Action> pipelining_actions(const CsvCell& cell) {
  const std::string text = trimmed(cell.text);
  if (text.empty() || text[0] != '(') {
    return text.empty() ? std::vector<Action>{} : pipelining_action(text, cell);
  }
  const size_t close = text.find(')');
  if (close == std::string::npos || text.substr(close + 1) != "OVERLAP_F_B") {
    reject_cell(
        cell,
        "a group of actions is written (<action>;<action>)OVERLAP_F_B, the only group pipelining has");
  }
  std::vector<Action> actions;
  const std::string inside = text.substr(1, close - 1);
  size_t begin = 0;
  while (begin <= inside.size()) {
    const size_t end = std::min(inside.find(';', begin), inside.size());
    const std::string part = trimmed(inside.substr(begin, end - begin));
    if (!part.empty()) {
      const std::vector<Action> one = pipelining_action(part, cell);
      if (one.empty() || !is_compute(one.front().op)) {
        reject_cell(
            cell,
            "OVERLAP_F_B groups compute actions (F, B, I, W), not '" + part +
                "'");
      }
      actions.push_back(one.front());
    }
    begin = end + 1;
  }
  if (actions.empty()) {
    reject_cell(cell, "OVERLAP_F_B groups no action");
  }
  return actions;
}

/// Throws "gpipe: cannot parse pipelining CSV: <what> k has no action
/// (...)" unless `named` (sorted) is 0..size-1.
inline void check_numbered(
    const std::set<int64_t>& named,
    const char* what,
    const char* plural) {
  int64_t expected = 0;
  for (const int64_t number : named) {
    TORCH_CHECK(
        number == expected,
        "gpipe: cannot parse pipelining CSV: ",
        what,
        " ",
        expected,
        " has no action, but ",
        what,
        " ",
        *named.rbegin(),
        " has (",
        plural,
        " are numbered from 0, each used)");
    ++expected;
  }
}

/// parse_program for the two CSV formats.
inline Program parse_pipelining_csv(const std::string& text, bool comms) {
  const auto rows = csv_rows(text);
  Program program;
  program.lanes.resize(rows.size());
  std::map<int64_t, CsvCell> first_cell; // of each stage: its row its lane
  std::set<int64_t> microbatches;
  for (size_t r = 0; r < rows.size(); ++r) {
    for (const CsvCell& cell : rows[r]) {
      for (const Action& action : pipelining_actions(cell)) {
        if (!comms && !is_compute(action.op)) {
          reject_cell(
              cell,
              "a compute-only file has no communication; read it as ProgramFormat::PipeliningComputeComms");
        }
        const auto found = first_cell.emplace(action.stage, cell).first;
        if (found->second.row != cell.row) {
          reject_cell(
              cell,
              "stage " + std::to_string(action.stage) + " is on row " +
                  std::to_string(found->second.row) + " too (column " +
                  std::to_string(found->second.column) +
                  "); a stage runs on one rank");
        }
        program.lanes[r].push_back(action);
        microbatches.insert(action.microbatch);
      }
    }
  }
  std::set<int64_t> stages;
  for (const auto& entry : first_cell) {
    stages.insert(entry.first);
  }
  check_numbered(stages, "stage", "stages");
  check_numbered(microbatches, "micro-batch", "micro-batches");
  program.stages = static_cast<int64_t>(stages.size());
  program.microbatches = static_cast<int64_t>(microbatches.size());
  for (const auto& entry : first_cell) {
    program.lane_of_stage.push_back(entry.second.row - 1);
  }
  return comms ? program : lower(program);
}

/// format_program for the two CSV formats.
inline std::string format_pipelining_csv(const Program& given, bool comms) {
  const Program program = comms ? lower(given) : given;
  std::string text;
  std::map<int64_t, int64_t> backwards; // per stage, its B and W so far
  for (const auto& lane : program.lanes) {
    std::string row;
    auto add = [&row](const std::string& cell) {
      row += row.empty() ? cell : "," + cell;
    };
    // The stage whose last backward was the last action written, due its
    // REDUCE_GRAD after that backward's send, as pipelining puts it.
    std::optional<Action> reduce;
    auto flush = [&]() {
      if (reduce) {
        add(std::to_string(reduce->stage) + "REDUCE_GRAD");
        reduce.reset();
      }
    };
    for (const Action& action : lane) {
      if (!comms && !is_compute(action.op)) {
        continue;
      }
      if (reduce &&
          action != Action{reduce->stage, Op::SEND_B, reduce->microbatch}) {
        flush();
      }
      add(to_string(action));
      if (comms && (action.op == Op::B || action.op == Op::W) &&
          ++backwards[action.stage] == program.microbatches) {
        reduce = action;
      }
    }
    flush();
    text += row + "\r\n";
  }
  return text;
}

} // namespace detail

/// The program `text` writes in `format`. Text is parse_program(text)
/// (program.h). The two CSV formats read pipelining's files, row r rank r
/// and lane r, each cell one action as pipelining's _Action prints it
/// ("2F0", "1I3", "0SEND_F1", "1RECV_B0", "(0F1;2B0)OVERLAP_F_B",
/// "0UNSHARD"); spaces around a cell are ignored. The stage and micro-batch
/// counts are the largest named plus one (each from 0 up must appear), and
/// a stage's lane is the row its actions are on. Every fault is a c10::Error
/// "gpipe: cannot parse pipelining CSV at row r (rank r - 1), column c
/// (both 1-based): ... (cell: '...')", or names the stage or micro-batch
/// that no cell has.
///
/// What pipelining writes that gpipe has not:
/// - Empty cells: pipelining's idle steps (None in its lists). Skipped: a
///   lane waits at its next action until what it needs is there.
/// - OVERLAP_F_B, "(0F3;3B1)OVERLAP_F_B" (DualPipeV): its actions, in
///   order. One lane runs one action at a time, so the forward and the
///   backward run one after the other, not overlapped; pipelining's runtime
///   also runs them one after the other unless a custom function is
///   registered for OVERLAP_F_B.
/// - UNSHARD, RESHARD and REDUCE_GRAD (no micro-batch): dropped. They are
///   FSDP's (gather and free a stage's sharded parameters) and the end of a
///   stage's backward (FSDP's gradient reduction, then the gradients scaled
///   by 1/m); gpipe does not shard parameters, and a gpipe step ends every
///   stage's backward itself. They order no computation.
///
/// SEND and RECV mean the same in both: pipelining's lowering writes
/// SEND_F(s, i) after F(s, i) and RECV_F(s + 1, i) on stage s + 1's rank,
/// SEND_B(s, i) after B or I(s, i) and RECV_B(s - 1, i) on stage s - 1's
/// rank; nothing is converted.
///
/// PipeliningComputeOnly: F, B, I, W and OVERLAP_F_B only (a SEND or RECV is
/// an error: read the file as PipeliningComputeComms); the program is then
/// lowered (`lower`), its communication gpipe's.
///
/// PipeliningComputeComms: kept as written, for simulate to check. Where
/// pipelining puts its receives: its lowering places a receive on the
/// receiving rank when it places the send, at the end of what that rank
/// holds so far, often before other actions that come ahead of the
/// receive's consumer ("1RECV_F0,1F0,1RECV_F1,1B0,1SEND_B0,1RECV_F2,1F1"):
/// its runtime posts the receive there and waits for it at the consumer.
/// gpipe's receive waits where it stands. The file is still a valid gpipe
/// program: each receive comes before its consumer, and a receive waits only
/// on its send, which the lowering placed before it, so the lanes cannot
/// wait on each other in a circle. A simulated run of it waits earlier than
/// pipelining's runtime would, though: to time a pipelining schedule, read
/// its compute-only file, which gpipe lowers with each receive right before
/// its consumer.
inline Program parse_program(const std::string& text, ProgramFormat format) {
  switch (format) {
    case ProgramFormat::Text:
      return parse_program(text);
    case ProgramFormat::PipeliningComputeOnly:
      return detail::parse_pipelining_csv(text, /*comms=*/false);
    case ProgramFormat::PipeliningComputeComms:
      return detail::parse_pipelining_csv(text, /*comms=*/true);
  }
  TORCH_CHECK(false, "gpipe: unknown ProgramFormat ", static_cast<int>(format));
}

/// `program` written in `format`. Text is format_program(program). The CSV
/// formats write one row per lane, one action a cell, each row ending
/// "\r\n" as Python's csv module writes (no cell needs quoting), and load
/// with pipelining's _load_csv:
/// - PipeliningComputeOnly: each lane's F, B, I and W, in order, without
///   idle cells (format "compute_only", for PipelineScheduleMulti and its
///   subclasses, _PipelineScheduleRuntime lowering it with its own
///   sends and receives; the single-stage ScheduleGPipe and Schedule1F1B
///   have no _load_csv).
/// - PipeliningComputeComms: every action of lower(program), and
///   sREDUCE_GRAD after stage s's last backward (the m-th B or W) and its
///   send, where pipelining's own lowering puts it (format "compute_comms", for
///   _PipelineScheduleRuntime): its runtime scales the gradients by 1/m
///   there, so without it a step would keep the gradients' sum. No
///   UNSHARD or RESHARD: they do nothing for a stage without FSDP; for one
///   with FSDP, load the compute-only file and let pipelining place them.
///   (pipelining's _simulate rejects REDUCE_GRAD, UNSHARD and RESHARD, on
///   its own lowered lists too: leave them out before simulating.)
/// parse_program(format_program(p, f), f) == p for every lowered p.
inline std::string format_program(
    const Program& program,
    ProgramFormat format) {
  switch (format) {
    case ProgramFormat::Text:
      return format_program(program);
    case ProgramFormat::PipeliningComputeOnly:
      return detail::format_pipelining_csv(program, /*comms=*/false);
    case ProgramFormat::PipeliningComputeComms:
      return detail::format_pipelining_csv(program, /*comms=*/true);
  }
  TORCH_CHECK(false, "gpipe: unknown ProgramFormat ", static_cast<int>(format));
}

} // namespace gpipe
