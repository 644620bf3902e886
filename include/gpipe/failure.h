// Which cell a failure came from, for exceptions of any type.
//
// Note [Exceptions keep their type]
// An exception raised in a cell (a layer's forward, its backward, loss_fn,
// a hook) reaches the caller of `pipe(x)`, `step()` or the user's
// `backward()` as the very object that was thrown, as in plain training:
// `catch (const DataError&)`, `catch (const std::bad_alloc&)` and
// `catch (int)` all work. A c10::Error also gets the cell as context
// ("gpipe: partition 2 failed on micro-batch 5 in backward"), which keeps
// its type. Any other type carries no message gpipe could extend, so its
// cell is recorded beside it instead: `gpipe::failed_cell(e)` returns the
// cell of exception `e` (the innermost cell that saw it) wherever it is
// caught, on any thread. The executor's first-failure-wins and the pipe
// being usable afterwards do not depend on the type. Across processes the
// failing rank rethrows its original; its peers get a c10::Error naming the
// rank, the cell, the type and the message.
#pragma once

#include <c10/util/Exception.h>

#include <cxxabi.h>

#include <cstdint>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <typeinfo>
#include <utility>
#include <vector>

namespace gpipe {

/// Where a failure was raised: partition j, micro-batch i, and the phase
/// ("forward", "backward", "backward_input", "backward_weight", "loss_fn",
/// "copy").
struct FailedCell {
  /// The partition j (a global stage number across processes).
  int64_t partition = 0;
  /// The micro-batch i.
  int64_t microbatch = 0;
  /// What the cell was doing.
  std::string phase;
};

namespace detail {

/// "partition 2 on micro-batch 5": how every message names a cell.
inline std::string cell_name(int64_t partition, int64_t microbatch) {
  return "partition " + std::to_string(partition) + " on micro-batch " +
      std::to_string(microbatch);
}

/// "gpipe: partition 2 failed on micro-batch 5 in backward": the context
/// of an error that left a cell.
inline std::string cell_failure(
    int64_t partition,
    int64_t microbatch,
    const std::string& phase) {
  return "gpipe: partition " + std::to_string(partition) +
      " failed on micro-batch " + std::to_string(microbatch) + " in " + phase;
}

/// The cells of the most recent exceptions that left a cell, by exception
/// object (Note [Exceptions keep their type]). Kept for the last
/// kRemembered exceptions: enough for every lane of a pipe failing at once.
class FailedCells {
 public:
  static FailedCells& instance() {
    static FailedCells cells;
    return cells;
  }

  /// Records `cell` for `error` unless a cell is known for it already (an
  /// inner cell saw it first).
  void record(const std::exception_ptr& error, const FailedCell& cell) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& entry : entries_) {
      if (entry.first == error) {
        return;
      }
    }
    if (entries_.size() == kRemembered) {
      entries_.erase(entries_.begin());
    }
    entries_.emplace_back(error, cell);
  }

  std::optional<FailedCell> find(const std::exception_ptr& error) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& entry : entries_) {
      if (entry.first == error) {
        return entry.second;
      }
    }
    return std::nullopt;
  }

 private:
  static constexpr size_t kRemembered = 64;
  std::mutex mutex_;
  std::vector<std::pair<std::exception_ptr, FailedCell>> entries_;
};

/// The name of the type of the exception being handled ("DataError",
/// "std::bad_alloc", "int").
inline std::string current_exception_type() {
  const std::type_info* type = abi::__cxa_current_exception_type();
  if (type == nullptr) {
    return "unknown";
  }
  int status = 0;
  std::unique_ptr<char, void (*)(void*)> name(
      abi::__cxa_demangle(type->name(), nullptr, nullptr, &status), std::free);
  return status == 0 && name ? std::string(name.get()) : type->name();
}

} // namespace detail

/// The cell exception `error` was raised in, when it left a pipe's cell;
/// nothing otherwise. Call it where the exception is caught:
///   catch (const DataError&) { gpipe::failed_cell(std::current_exception()); }
inline std::optional<FailedCell> failed_cell(const std::exception_ptr& error) {
  return detail::FailedCells::instance().find(error);
}

/// The exception being handled as one line for another process or a log:
/// a c10::Error's message (with its cell); for another type,
/// "gpipe: partition j failed on micro-batch i in <phase>: <type>: <what>"
/// (what() where it has one).
inline std::string describe_current_exception() {
  const auto error = std::current_exception();
  std::string what;
  try {
    std::rethrow_exception(error);
  } catch (const c10::Error& e) {
    return e.what();
  } catch (const std::exception& e) {
    what = std::string(": ") + e.what();
  } catch (...) {
  }
  std::string text = detail::current_exception_type() + what;
  if (const auto cell = failed_cell(error)) {
    text =
        detail::cell_failure(cell->partition, cell->microbatch, cell->phase) +
        ": " + text;
  }
  return text;
}

} // namespace gpipe
