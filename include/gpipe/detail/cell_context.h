// Which cell failed, and in what: the context every error escaping a cell
// carries ("gpipe: partition 2 failed on micro-batch 5 in backward").
//
// Why a room of its own: both pipes, the step runner and the executor stamp
// errors the same way, and how an exception travels out of a cell (its type,
// its context) is one decision to make in one place.
#pragma once

#include <gpipe/failure.h>

#include <c10/util/Exception.h>

#include <cstdint>
#include <exception>
#include <string>
#include <utility>

namespace gpipe::detail {

/// Where a cell sits in the pipe, for error messages and timelines.
struct CellIndex {
  int64_t microbatch = 0;
  int64_t partition = 0;
};

inline std::string cell_context(const CellIndex& cell, const char* phase) {
  return cell_failure(cell.partition, cell.microbatch, phase);
}

inline bool starts_with_cell_context(const std::string& text) {
  return text.rfind("gpipe: partition ", 0) == 0;
}

/// Calls `fn`; an error escaping it learns which cell failed and in what
/// (Note [Exceptions keep their type]). Whatever its type, the exception
/// that leaves is the one thrown, and its cell is recorded for
/// `gpipe::failed_cell`; a c10::Error also gets the cell as context (a
/// c10::OutOfMemoryError stays catchable as one). Context is added, and
/// the cell recorded, once: by the innermost cell.
template <typename Fn>
decltype(auto) with_cell_context(
    const CellIndex& cell,
    const char* phase,
    Fn&& fn) {
  try {
    return std::forward<Fn>(fn)();
  } catch (c10::Error& e) {
    bool known = starts_with_cell_context(e.msg());
    for (const auto& context : e.context()) {
      known = known || starts_with_cell_context(context);
    }
    if (!known) {
      e.add_context(cell_context(cell, phase));
    }
    FailedCells::instance().record(
        std::current_exception(), {cell.partition, cell.microbatch, phase});
    throw;
  } catch (...) {
    FailedCells::instance().record(
        std::current_exception(), {cell.partition, cell.microbatch, phase});
    throw;
  }
}

} // namespace gpipe::detail
