// How a bundle's shapes travel between ranks: a fixed-size header of
// int64s (count, list flag, then per tensor whether it is defined, its
// dtype, requires_grad, dim and sizes), and the headers both ends of each
// link keep per step signature so that later steps send none.
//
// Note [Shapes are agreed once per batch shape]
// A receiver must allocate exactly what arrives, and a pipe learns its
// activations' shapes only by running (a batch of another size, a last
// micro-batch smaller than the others, a layer that returns a list). So the
// first time a bundle travels for a given step signature (the batch's
// shapes and dtypes, which the first stage tells every rank at the start of
// a step) it is preceded by a small fixed-size header: how many tensors,
// whether they form a list, and each tensor's dtype, shape and
// requires_grad. Both ends keep that header; in later steps of the same
// signature the bundle travels without one (on Gloo every message costs a
// round trip), and the sender checks that what it sends is what was agreed:
// a model whose shapes change under the same input shapes gets a `gpipe:`
// error naming DistributedOptions::agree_shapes_every_step, which sends the
// header every time. Nothing is ever reinterpreted.
#pragma once

#include <gpipe/detail/bundle.h>
#include <gpipe/detail/executor.h>

#include <c10/util/Exception.h>
#include <torch/types.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <functional>
#include <iterator>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace gpipe::distributed::detail {

using gpipe::detail::Bundle;
using gpipe::detail::Direction;
using gpipe::detail::Tag;

/// Gloo tags: (channel, direction) in bits 24-30, stage in 17-23, micro-batch
/// in 5-16, the message's index within its bundle in 0-4 (0: the header).
/// Code 127 is the pipe's own control messages.
constexpr int64_t kMaxStages = 128;
constexpr int64_t kMaxMicrobatches = 4096;
constexpr int64_t kMaxBundle = 31;
constexpr int64_t kControlCode = 127;
constexpr int64_t kOrderedCode = 126; // Gloo's one tag when by order
constexpr int64_t kHeaderSize = 160;

inline int wire_tag(const Tag& tag, int64_t k) {
  const int64_t code =
      tag.channel * 2 + (tag.direction == Direction::Backward ? 1 : 0);
  return static_cast<int>(
      (code << 24) | (tag.stage << 17) | (tag.microbatch << 5) | k);
}

inline int control_tag(int64_t kind) {
  return static_cast<int>((kControlCode << 24) | kind);
}

/// The header of `tensors`, padded to kHeaderSize; `what` names the
/// message in errors.
inline std::vector<int64_t> encode_header(
    const Bundle& tensors,
    bool is_list,
    const std::string& what) {
  std::vector<int64_t> header{static_cast<int64_t>(tensors.size()), is_list};
  for (const auto& tensor : tensors) {
    header.push_back(tensor.defined());
    if (!tensor.defined()) {
      continue;
    }
    header.push_back(static_cast<int64_t>(tensor.scalar_type()));
    header.push_back(tensor.requires_grad());
    header.push_back(tensor.dim());
    for (const int64_t size : tensor.sizes()) {
      header.push_back(size);
    }
  }
  TORCH_CHECK(
      static_cast<int64_t>(header.size()) <= kHeaderSize,
      "gpipe: the ",
      what,
      " has too many tensors or dimensions to describe in one header (",
      header.size(),
      " numbers, at most ",
      kHeaderSize,
      ")");
  header.resize(kHeaderSize, 0);
  return header;
}

/// "[2, 5] Double, undefined" for a header.
inline std::string describe_header(const std::vector<int64_t>& h) {
  std::ostringstream text;
  size_t at = 2;
  for (int64_t k = 0; k < h[0]; ++k) {
    text << (k == 0 ? "" : ", ");
    if (h[at++] == 0) {
      text << "undefined";
      continue;
    }
    const auto dtype = static_cast<c10::ScalarType>(h[at++]);
    ++at; // requires_grad
    const auto dim = static_cast<size_t>(h[at++]);
    text << c10::IntArrayRef(h.data() + at, dim) << " " << dtype;
    at += dim;
  }
  return text.str();
}

/// The tensors header `h` describes, allocated on `device` (undefined where
/// the sender's were); `what` and `from` name the message and its sender
/// in errors.
inline Bundle allocate_from_header(
    const int64_t* h,
    const torch::Device& device,
    const std::string& what,
    const std::string& from) {
  const int64_t count = h[0];
  TORCH_CHECK(
      count >= 0 && count <= kMaxBundle,
      "gpipe: a corrupt header for the ",
      what,
      " from ",
      from,
      " (",
      count,
      " tensors)");
  Bundle tensors(static_cast<size_t>(count));
  size_t at = 2;
  for (int64_t k = 0; k < count; ++k) {
    if (h[at++] == 0) {
      continue;
    }
    const auto dtype = static_cast<c10::ScalarType>(h[at++]);
    const bool requires_grad = h[at++] != 0;
    const int64_t dim = h[at++];
    TORCH_CHECK(
        dim >= 0 && at + static_cast<size_t>(dim) <= kHeaderSize,
        "gpipe: a corrupt header for the ",
        what,
        " from ",
        from);
    std::vector<int64_t> sizes(h + at, h + at + dim);
    at += static_cast<size_t>(dim);
    auto tensor =
        torch::empty(sizes, torch::TensorOptions().dtype(dtype).device(device));
    if (requires_grad) {
      tensor.requires_grad_(true);
    }
    tensors[static_cast<size_t>(k)] = std::move(tensor);
  }
  return tensors;
}

/// The headers both ends of each link agreed, per step signature (Note
/// [Shapes are agreed once per batch shape]); the last kSignaturesKept
/// signatures are kept.
class AgreedHeaders {
 public:
  /// Whether a step of `signature` completed, so that both ends of every
  /// message hold its header.
  bool completed(int64_t signature) const {
    return std::find(completed_.begin(), completed_.end(), signature) !=
        completed_.end();
  }

  /// A step of `signature` starts.
  void begin(int64_t signature) {
    signature_ = signature;
    if (std::find(signatures_.begin(), signatures_.end(), signature) !=
        signatures_.end()) {
      return;
    }
    signatures_.push_back(signature);
    if (signatures_.size() > kSignaturesKept) {
      // Every rank of the pipeline sees the same signatures in the same
      // order, so both ends of each link forget the same ones.
      const int64_t oldest = signatures_.front();
      signatures_.erase(signatures_.begin());
      for (auto it = agreed_.begin(); it != agreed_.end();) {
        it = it->first.front() == oldest ? agreed_.erase(it) : std::next(it);
      }
      completed_.erase(
          std::remove(completed_.begin(), completed_.end(), oldest),
          completed_.end());
    }
  }

  /// The step started last completed.
  void complete() {
    if (!completed(signature_)) {
      completed_.push_back(signature_);
    }
  }

  /// The header agreed for `tag` in this step's signature, or null.
  const std::vector<int64_t>* find(const Tag& tag) const {
    const auto found = agreed_.find(key_of(tag));
    return found == agreed_.end() ? nullptr : &found->second;
  }

  /// Agrees `header` for `tag` in this step's signature.
  const std::vector<int64_t>& agree(
      const Tag& tag,
      std::vector<int64_t> header) {
    return agreed_.emplace(key_of(tag), std::move(header)).first->second;
  }

 private:
  static constexpr size_t kSignaturesKept = 16;
  using Key = std::array<int64_t, 5>; // signature, then the tag

  Key key_of(const Tag& tag) const {
    return {
        signature_,
        tag.stage,
        tag.microbatch,
        tag.direction == Direction::Forward ? 0 : 1,
        tag.channel};
  }

  int64_t signature_ = 0;
  std::vector<int64_t> signatures_; // oldest first
  std::vector<int64_t> completed_; // signatures whose shapes are agreed
  std::map<Key, std::vector<int64_t>> agreed_; // headers, per link and step
};

} // namespace gpipe::distributed::detail
