// Whether the code running now is a checkpointed forward or its recompute.
//
// Why modules need to know: a checkpointed cell runs its partition twice,
// once in forward (keeping only the input) and once in backward (to rebuild
// the graph). Everything the forward computes comes out the same, but side
// effects happen twice: a counter counts twice, a cache fills twice, a
// statistics hook sees the batch twice. A module that has such side effects
// asks `is_recomputing()` and skips them there, as torchgpipe's modules do.
//
//   struct CountingImpl : torch::nn::Module {
//     torch::Tensor forward(const torch::Tensor& x) {
//       if (!gpipe::is_recomputing()) {
//         ++seen;  // once per micro-batch, whatever the checkpoint mode
//       }
//       return x;
//     }
//     int64_t seen = 0;
//   };
#pragma once

namespace gpipe {

namespace detail {

struct RecomputeFlags {
  bool checkpointing = false;
  bool recomputing = false;
};

inline RecomputeFlags& recompute_flags() {
  thread_local RecomputeFlags flags;
  return flags;
}

/// Sets one flag of this thread for the guard's lifetime.
class RecomputeFlagGuard {
 public:
  RecomputeFlagGuard(bool RecomputeFlags::*flag, bool value)
      : flag_(flag), before_(recompute_flags().*flag) {
    recompute_flags().*flag_ = value;
  }
  ~RecomputeFlagGuard() {
    recompute_flags().*flag_ = before_;
  }
  RecomputeFlagGuard(const RecomputeFlagGuard&) = delete;
  RecomputeFlagGuard& operator=(const RecomputeFlagGuard&) = delete;

 private:
  bool RecomputeFlags::*flag_;
  bool before_;
};

} // namespace detail

/// True inside the forward of a cell whose activations will be recomputed
/// in backward (a checkpointed micro-batch), false elsewhere, including in
/// the recompute itself.
inline bool is_checkpointing() {
  return detail::recompute_flags().checkpointing;
}

/// True while a cell re-runs its partition in backward to rebuild what its
/// checkpointed forward did not keep.
inline bool is_recomputing() {
  return detail::recompute_flags().recomputing;
}

} // namespace gpipe
