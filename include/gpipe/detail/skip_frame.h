// The skip tensors of the running cell, and what a skippable module
// declares.
//
// Why below <gpipe/skip.h>: the pipe's layout (detail/skip_layout.h) reads
// the declarations and its cells (detail/stage.h) fill the frame, and a
// detail header includes nothing above it. The public face, stash and pop,
// is skip::Skippable (gpipe/skip.h), which derives from SkipDeclarations.
#pragma once

#include <gpipe/failure.h>

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace gpipe::detail {

/// The skip tensors of the cell running on this thread: the popped ones it
/// received and the ones its layers stash (pipe.h fills and empties it).
struct SkipFrame {
  std::map<std::string, torch::Tensor> available;
  /// The version of each received skip when its cell began: a pop checks
  /// that nothing wrote into it since (Note [A skip is not written between
  /// its stash and its pop]).
  std::map<std::string, uint32_t> versions;
  /// The running cell, for messages.
  int64_t partition = 0;
  int64_t microbatch = 0;
  /// What runs when it is not a cell ("layer 3 while profiling"); empty: a
  /// cell.
  std::string label;

  /// "partition 2 on micro-batch 3", built only for a message.
  std::string where() const {
    if (!label.empty()) {
      return label;
    }
    return cell_name(partition, microbatch);
  }
};

inline SkipFrame*& current_skip_frame() {
  thread_local SkipFrame* frame = nullptr;
  return frame;
}

/// Outside a pipe: the store stash and pop use in a plain Sequential.
inline std::map<std::string, torch::Tensor>& plain_skip_store() {
  thread_local std::map<std::string, torch::Tensor> store;
  return store;
}

/// Makes `frame` the current one for the guard's lifetime.
class SkipFrameGuard {
 public:
  explicit SkipFrameGuard(SkipFrame* frame)
      : before_(std::exchange(current_skip_frame(), frame)) {}
  ~SkipFrameGuard() {
    current_skip_frame() = before_;
  }
  SkipFrameGuard(const SkipFrameGuard&) = delete;
  SkipFrameGuard& operator=(const SkipFrameGuard&) = delete;

 private:
  SkipFrame* before_;
};

/// What a skippable module declares: the names it stashes and pops, and the
/// namespace they live in. The base of skip::Skippable (gpipe/skip.h).
class SkipDeclarations {
 public:
  virtual ~SkipDeclarations() = default;
  SkipDeclarations(const SkipDeclarations&) = default;
  SkipDeclarations& operator=(const SkipDeclarations&) = default;

  /// The names this module stashes and pops, unqualified.
  const std::vector<std::string>& stashes() const {
    return stashes_;
  }
  const std::vector<std::string>& pops() const {
    return pops_;
  }

  /// Puts this module's names into namespace `ns` ("" is the global one).
  void isolate(std::string ns) {
    namespace_ = std::move(ns);
  }
  const std::string& skip_namespace() const {
    return namespace_;
  }

  /// `name` as the pipe knows it: "ns/name", or "name" in no namespace.
  std::string qualified(const std::string& name) const {
    return namespace_.empty() ? name : namespace_ + "/" + name;
  }

 protected:
  SkipDeclarations(
      std::vector<std::string> stashes,
      std::vector<std::string> pops)
      : stashes_(std::move(stashes)), pops_(std::move(pops)) {
    check_names(stashes_, "stashes");
    check_names(pops_, "pops");
  }

 private:
  static void check_names(
      const std::vector<std::string>& names,
      const char* what) {
    for (size_t k = 0; k < names.size(); ++k) {
      TORCH_CHECK(
          !names[k].empty(),
          "gpipe: a skip name is empty (",
          what,
          ": [",
          c10::Join(", ", names),
          "])");
      TORCH_CHECK(
          std::find(names.begin(), names.begin() + k, names[k]) ==
              names.begin() + k,
          "gpipe: skip '",
          names[k],
          "' is declared twice in ",
          what,
          " ([",
          c10::Join(", ", names),
          "])");
    }
  }

  std::vector<std::string> stashes_;
  std::vector<std::string> pops_;
  std::string namespace_;
};

} // namespace gpipe::detail
