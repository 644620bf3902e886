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
// model trains without the pipe, and checks the pipe's rule one forward at a
// time: a pop whose stash did not happen fails at once, a stash whose last
// pop did not happen fails at the next forward (Note [Skips outside a pipe]).
//
// Under checkpointing, the recompute of a stashing partition stashes into
// its rebuilt graph (nothing is sent twice) and a popping partition keeps
// the popped tensor as one of its inputs, so its recompute pops it again.
#pragma once

#include <gpipe/detail/skip_frame.h>

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>
#include <torch/nn/module.h>
#include <torch/types.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

namespace gpipe {
namespace skip {

/// Note [Skips outside a pipe]
/// In a plain Sequential stash and pop go through a per-thread store
/// (detail::plain_skip_store), which checks what a pipe checks for each
/// micro-batch: a skip is stashed once and popped once per forward. A
/// LibTorch module has no hook around its forward, so the store cannot see
/// a module return without its declared stash or pop; it sees the next
/// event instead. A pop of a name not stashed since its last pop fails at
/// once (its stash did not happen, or it was popped twice); a stash of a
/// name still in the store fails, releasing the stale tensor, at the next
/// forward (its pop did not happen, or a forward stopped by an error between
/// them). A pipe reports both within the forward, per partition.

/// The base of a module that stashes or pops skip tensors: it declares the
/// names, and `stash`/`pop` (called in its forward) use them.
class Skippable : public detail::SkipDeclarations {
 public:
  /// Declares the names this module stashes and pops: each non-empty, none
  /// twice in a list (a `gpipe:` error otherwise).
  Skippable(std::vector<std::string> stashes, std::vector<std::string> pops)
      : SkipDeclarations(std::move(stashes), std::move(pops)) {}

  /// Hands `tensor` to the layer that pops `name` (on micro-batch of the
  /// running cell under a pipe).
  void stash(const std::string& name, torch::Tensor tensor) {
    check_declared(name, stashes(), "stash", "stashes");
    TORCH_CHECK(
        tensor.defined(),
        "gpipe: skip '",
        qualified(name),
        "' stashed an undefined tensor");
    const std::string key = qualified(name);
    auto* frame = detail::current_skip_frame();
    if (frame == nullptr) {
      auto& store = detail::plain_skip_store();
      const auto stashed = store.emplace(key, std::move(tensor));
      if (!stashed.second) {
        store.erase(stashed.first);
        TORCH_CHECK(
            false,
            "gpipe: skip '",
            key,
            "' was stashed again outside a pipe before its last stash was ",
            "popped: the layer that declares its pop did not pop it, or a ",
            "forward stopped between the stash and the pop (a skip is ",
            "stashed once and popped once per forward, as in a pipe)");
      }
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
    check_declared(name, pops(), "pop", "pops");
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
        frame == nullptr ? std::string(" outside a pipe")
                         : " in " + frame->where(),
        ": the layer that declares its stash did not stash it, or it was ",
        "popped twice");
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
