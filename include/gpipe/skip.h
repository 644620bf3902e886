// Skip connections across partitions: a module stashes a tensor under a
// name, a later module pops it, wherever the partition boundaries fall.
//
// Why: a U-Net's decoder needs the encoder's activation from several layers
// back, and a Sequential hands each layer only its predecessor's output.
// Threading the skip through every layer in between (returning it in a
// list) would copy it through every partition between the two and make
// every layer know about it. A skippable module instead declares what it
// stashes and pops; the pipe checks the layout when it is built and routes
// each stashed tensor straight from the stashing partition's device to the
// popping partition's, its gradient straight back.
//
//   struct DownImpl : torch::nn::Module, gpipe::skip::Skippable {
//     DownImpl() : Skippable(/*stashes=*/{"down"}, /*pops=*/{}) {}
//     torch::Tensor forward(const torch::Tensor& x) {
//       auto y = torch::relu(x);
//       stash("down", y);
//       return y * 0.5;
//     }
//   };
//   struct UpImpl : torch::nn::Module, gpipe::skip::Skippable {
//     UpImpl() : Skippable(/*stashes=*/{}, /*pops=*/{"down"}) {}
//     torch::Tensor forward(const torch::Tensor& x) {
//       return x + pop("down");
//     }
//   };
//
// Rules, checked at construction with `gpipe:` errors: every popped name is
// stashed by an earlier layer (or the same one), every stashed name is
// popped, no name is stashed or popped by two layers. The same module class
// can appear several times: `gpipe::skip::isolate(module, "level2")` puts the
// names of every skippable module in `module`'s tree into a namespace, so
// "level2/down" and "level3/down" are two skips. Outside a pipe (the plain
// Sequential), stash and pop work through a per-thread store, so the same
// model trains without the pipe.
//
// Under checkpointing, the recompute of a stashing partition stashes into
// its rebuilt graph (nothing is sent twice) and a popping partition keeps
// the popped tensor as one of its inputs, so its recompute pops it again.
#pragma once

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>
#include <torch/nn/module.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace gpipe {
namespace detail {

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

  /// "partition 2 on micro-batch 3", built only for a message.
  std::string where() const {
    return "partition " + std::to_string(partition) + " on micro-batch " +
        std::to_string(microbatch);
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

} // namespace detail

namespace skip {

/// The base of a module that stashes or pops skip tensors: it declares the
/// names, and `stash`/`pop` (called in its forward) use them.
class Skippable {
 public:
  /// Declares the names this module stashes and pops: each non-empty, none
  /// twice in a list (a `gpipe:` error otherwise).
  Skippable(std::vector<std::string> stashes, std::vector<std::string> pops)
      : stashes_(std::move(stashes)), pops_(std::move(pops)) {
    check_names(stashes_, "stashes");
    check_names(pops_, "pops");
  }
  virtual ~Skippable() = default;
  /// Copies the declarations and the namespace (a cloned module keeps them).
  Skippable(const Skippable&) = default;
  /// Copies the declarations and the namespace.
  Skippable& operator=(const Skippable&) = default;

  /// The names this module stashes, unqualified.
  const std::vector<std::string>& stashes() const {
    return stashes_;
  }
  /// The names this module pops, unqualified.
  const std::vector<std::string>& pops() const {
    return pops_;
  }

  /// Puts this module's names into namespace `ns` ("" is the global one).
  void isolate(std::string ns) {
    namespace_ = std::move(ns);
  }
  /// The module's namespace ("" is the global one).
  const std::string& skip_namespace() const {
    return namespace_;
  }

  /// `name` as the pipe knows it: "ns/name", or "name" in no namespace.
  std::string qualified(const std::string& name) const {
    return namespace_.empty() ? name : namespace_ + "/" + name;
  }

  /// Hands `tensor` to the layer that pops `name` (on micro-batch of the
  /// running cell under a pipe).
  void stash(const std::string& name, torch::Tensor tensor) {
    check_declared(name, stashes_, "stash", "stashes");
    TORCH_CHECK(
        tensor.defined(),
        "gpipe: skip '",
        qualified(name),
        "' stashed an undefined tensor");
    const std::string key = qualified(name);
    auto* frame = detail::current_skip_frame();
    if (frame == nullptr) {
      detail::plain_skip_store()[key] = std::move(tensor);
      return;
    }
    const bool fresh = frame->available.emplace(key, std::move(tensor)).second;
    TORCH_CHECK(
        fresh,
        "gpipe: skip '",
        key,
        "' was stashed twice in ",
        frame->where(),
        " (a skip is stashed once and popped once per micro-batch)");
  }

  /// The tensor stashed under `name` (on this micro-batch under a pipe).
  torch::Tensor pop(const std::string& name) {
    check_declared(name, pops_, "pop", "pops");
    const std::string key = qualified(name);
    auto* frame = detail::current_skip_frame();
    auto& store =
        frame == nullptr ? detail::plain_skip_store() : frame->available;
    const auto found = store.find(key);
    TORCH_CHECK(
        found != store.end(),
        "gpipe: skip '",
        key,
        "' was popped before it was stashed",
        frame == nullptr ? std::string() : " in " + frame->where(),
        " (or popped twice)");
    torch::Tensor tensor = std::move(found->second);
    store.erase(found);
    if (frame != nullptr) {
      const auto version = frame->versions.find(key);
      TORCH_CHECK(
          version == frame->versions.end() ||
              version->second == tensor._version(),
          "gpipe: skip '",
          key,
          "' was written in place between its stash and its pop in ",
          frame->where(),
          "; the pipe hands the pop the tensor as stashed, with the stash's ",
          "gradient path, so an in-place write in between would be lost: ",
          "write into a copy, or stash a clone");
    }
    return tensor;
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

  void check_declared(
      const std::string& name,
      const std::vector<std::string>& declared,
      const char* verb,
      const char* list) const {
    TORCH_CHECK(
        std::find(declared.begin(), declared.end(), name) != declared.end(),
        "gpipe: ",
        verb,
        "('",
        name,
        "') by a module that does not declare it (",
        list,
        ": [",
        c10::Join(", ", declared),
        "]); declare it in the Skippable constructor so the pipe can route it");
  }

  std::vector<std::string> stashes_;
  std::vector<std::string> pops_;
  std::string namespace_;
};

/// Puts every skippable module in `module`'s tree into namespace `ns`, so
/// that the same block can be used several times in one model.
inline void isolate(torch::nn::Module& module, const std::string& ns) {
  for (const auto& child : module.modules(/*include_self=*/true)) {
    if (auto* skippable = dynamic_cast<Skippable*>(child.get())) {
      skippable->isolate(ns);
    }
  }
}

template <typename ModuleHolder>
auto isolate(const ModuleHolder& holder, const std::string& ns)
    -> decltype(holder.ptr(), void()) {
  isolate(*holder.ptr(), ns);
}

} // namespace skip
} // namespace gpipe
