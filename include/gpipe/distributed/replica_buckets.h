// The replicas of a stage sum its gradients in buckets, each as soon as its
// gradients are final, so that the sums overlap the end of the drain
// instead of following it.
//
// Note [Replica sums overlap the drain]
// A rank's parameter gradients are final once its last weight-gradient op
// of the step (its m-th B or W per stage it runs: the runner counts them,
// step_runner.h) has accumulated them into `.grad`. While that op runs, a
// post-hook on each parameter's AccumulateGrad node (what DDP's reducer
// uses) marks the parameter ready; a bucket whose parameters are all ready
// starts its all-reduce at once, so the sum of the last layers' gradients
// runs while the backward computes the first layers'. What that op did not
// reach starts right after it; the sums are waited for after the drain.
// Buckets are laid out at each step from the step's parameters alone: in
// reverse order of registration (the order a backward finishes them), one
// dtype each, about DistributedOptions::replica_bucket_bytes each. Every
// replica runs the same model and so lays out the same buckets, and starts
// them strictly in order, so the replicas' sums pair up. A bucket holding
// a tied parameter (summed over its owners first: Note [Ties are found, and
// watched]) or one with hooks (delivered after the drain: Note [Where
// parameter gradients go]) starts after the drain, and so do the buckets
// after it. Only CPU gradients start from inside the backward: on a CUDA
// device it runs on the engine's device thread, so there they start right
// after the op, on the rank's own thread.
#pragma once

#include <gpipe/detail/step_runner.h>

#include <c10/util/Exception.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/utils/lambda_post_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/distributed/c10d/Work.hpp>
#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace gpipe::distributed {

/// When a step's sums over the replicas started, in buckets (Note [Replica
/// sums overlap the drain]).
struct ReplicaSums {
  /// Buckets summed, each once.
  int64_t buckets = 0;
  /// While this rank's last backward of the step ran.
  int64_t during_backward = 0;
  /// Once it was over.
  int64_t after_backward = 0;
  /// After the drain: holding a tied parameter or one with hooks, after
  /// such a bucket, or all with replica_bucket_bytes 0.
  int64_t after_drain = 0;
};

} // namespace gpipe::distributed

namespace gpipe::distributed::detail {

class ReplicaBuckets final : public gpipe::detail::LastWeightsWatch {
 public:
  /// Starts summing one flat bucket over the replicas.
  using Start =
      std::function<c10::intrusive_ptr<c10d::Work>(torch::Tensor& flat)>;
  /// One bucket of the step: `slots` index the step's parameters.
  struct Bucket {
    std::vector<size_t> slots;
    int64_t numel = 0;
    size_t ready = 0; // slots whose gradient is final
    bool after_drain = false; // holds a tied or hooked parameter
    torch::Tensor flat;
    c10::intrusive_ptr<c10d::Work> work;
    /// Per slot, the `.grad` it read and that tensor's version.
    std::vector<std::pair<const c10::TensorImpl*, uint32_t>> read;
  };

  /// About `bytes` per bucket (0: one per dtype, summed after the drain);
  /// `start` starts a sum.
  ReplicaBuckets(int64_t bytes, torch::Device on, Start start)
      : bytes_(bytes), on_(on), start_(std::move(start)) {}

  ReplicaBuckets(const ReplicaBuckets&) = delete;
  ReplicaBuckets& operator=(const ReplicaBuckets&) = delete;

  ~ReplicaBuckets() override {
    for (auto& [node, key] : hooked_nodes_) {
      node->del_post_hook(key);
    }
  }

  /// Lays out this step's buckets over `parameters` (the step's, each
  /// once); `after_drain(k)` says whether parameter k's gradient is final
  /// only after the drain; `weight` scales every gradient before the sum.
  void begin(
      const std::vector<torch::Tensor>& parameters,
      const std::function<bool(size_t)>& after_drain,
      double weight) {
    std::lock_guard<std::mutex> lock(mutex_);
    parameters_ = parameters;
    weight_ = weight;
    buckets_.clear();
    bucket_of_.clear();
    is_ready_.assign(parameters.size(), 0);
    started_ = 0;
    armed_ = false;
    report_ = ReplicaSums();
    std::unordered_map<c10::ScalarType, size_t> open; // dtype -> bucket
    for (size_t k = parameters.size(); k-- > 0;) {
      const auto& parameter = parameters[k];
      const auto dtype = parameter.scalar_type();
      const auto found = open.find(dtype);
      size_t b = 0;
      if (found == open.end() ||
          (bytes_ > 0 &&
           buckets_[found->second].numel * parameter.element_size() >=
               bytes_)) {
        b = buckets_.size();
        buckets_.emplace_back();
        open[dtype] = b;
      } else {
        b = found->second;
      }
      auto& bucket = buckets_[b];
      bucket.slots.push_back(k);
      bucket.numel += parameter.numel();
      bucket.after_drain = bucket.after_drain || bytes_ == 0 || after_drain(k);
      bucket_of_[parameter.unsafeGetTensorImpl()] = {b, k};
      if (bytes_ > 0) {
        watch(parameter);
      }
    }
  }

  void last_begins() override {
    std::lock_guard<std::mutex> lock(mutex_);
    armed_ = true;
  }

  /// Starts what the last op did not: every bucket up to the first that
  /// waits for the drain.
  void last_ended(bool completed) override {
    std::lock_guard<std::mutex> lock(mutex_);
    armed_ = false;
    if (completed) {
      start_in_order(When::AfterBackward);
    }
  }

  /// Starts the rest, after the drain (and the ties' sum).
  void start_rest() {
    std::lock_guard<std::mutex> lock(mutex_);
    armed_ = false;
    start_in_order(When::AfterDrain);
  }

  /// When the step's sums started.
  const ReplicaSums& report() const {
    return report_;
  }

  /// The buckets, all started: wait for each, then read `flat`.
  std::vector<Bucket>& buckets() {
    return buckets_;
  }

  /// Asserts that every gradient a bucket read is still what it read: a
  /// gradient accumulated after its bucket started would be missing from
  /// the sum (Note [Replica sums overlap the drain]).
  void check_unchanged() const {
    for (const auto& bucket : buckets_) {
      for (size_t j = 0; j < bucket.slots.size(); ++j) {
        const auto& parameter = parameters_[bucket.slots[j]];
        const auto& grad = parameter.grad();
        const auto [impl, version] = bucket.read[j];
        TORCH_INTERNAL_ASSERT(
            grad.defined() ? grad.unsafeGetTensorImpl() == impl &&
                    grad._version() == version
                           : impl == nullptr,
            "gpipe: the gradient of a parameter of shape ",
            parameter.sizes(),
            " changed after the replicas began summing it; "
            "DistributedOptions::replica_bucket_bytes(0) sums after the "
            "drain");
      }
    }
  }

 private:
  /// Hooks `parameter`'s AccumulateGrad once for the pipe's lifetime.
  void watch(const torch::Tensor& parameter) {
    const auto* key = parameter.unsafeGetTensorImpl();
    if (watched_.count(key) > 0 || !parameter.requires_grad()) {
      return;
    }
    auto node = torch::autograd::impl::grad_accumulator(parameter);
    if (!node) {
      return;
    }
    watched_.insert(key);
    const auto hook = node->add_post_hook(
        std::make_unique<torch::autograd::utils::LambdaPostHook>(
            [this, key](
                const torch::autograd::variable_list& outputs,
                const torch::autograd::variable_list& /*inputs*/) {
              ready(key);
              return outputs;
            }));
    hooked_nodes_.emplace_back(std::move(node), hook);
  }

  void ready(const c10::TensorImpl* key) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!armed_) {
      return;
    }
    const auto found = bucket_of_.find(key);
    if (found == bucket_of_.end() || is_ready_[found->second.second]) {
      return;
    }
    is_ready_[found->second.second] = 1;
    ++buckets_[found->second.first].ready;
    if (on_.is_cpu() && key->device().is_cpu()) {
      start_in_order(When::DuringBackward);
    }
  }

  enum class When { DuringBackward, AfterBackward, AfterDrain };

  /// Starts buckets in order while they may start: during the backward
  /// once every parameter is ready, after it whatever does not wait for
  /// the drain, after the drain all.
  void start_in_order(When when) {
    while (started_ < buckets_.size()) {
      auto& bucket = buckets_[started_];
      if ((bucket.after_drain && when != When::AfterDrain) ||
          (when == When::DuringBackward &&
           bucket.ready < bucket.slots.size())) {
        return;
      }
      std::vector<torch::Tensor> flat;
      flat.reserve(bucket.slots.size());
      for (const size_t k : bucket.slots) {
        const auto& parameter = parameters_[k];
        const auto& grad = parameter.grad();
        bucket.read.emplace_back(
            grad.defined() ? grad.unsafeGetTensorImpl() : nullptr,
            grad.defined() ? grad._version() : 0);
        flat.push_back(
            grad.defined()
                ? grad.reshape({-1}).to(on_)
                : torch::zeros(
                      {parameter.numel()}, parameter.options().device(on_)));
      }
      torch::NoGradGuard no_grad;
      bucket.flat = torch::cat(flat);
      if (weight_ != 1.0) {
        bucket.flat.mul_(weight_);
      }
      bucket.work = start_(bucket.flat);
      ++started_;
      ++report_.buckets;
      ++(when == When::DuringBackward      ? report_.during_backward
             : when == When::AfterBackward ? report_.after_backward
                                           : report_.after_drain);
    }
  }

  int64_t bytes_;
  torch::Device on_;
  Start start_;
  std::mutex mutex_; // the hooks run on the engine's threads
  std::vector<torch::Tensor> parameters_;
  double weight_ = 1.0;
  std::vector<Bucket> buckets_; // in the order they start
  // Per parameter: its bucket and slot.
  std::unordered_map<const c10::TensorImpl*, std::pair<size_t, size_t>>
      bucket_of_;
  std::vector<char> is_ready_; // per slot
  size_t started_ = 0;
  bool armed_ = false;
  ReplicaSums report_;
  std::unordered_set<const c10::TensorImpl*> watched_;
  std::vector<std::pair<std::shared_ptr<torch::autograd::Node>, uintptr_t>>
      hooked_nodes_;
};

} // namespace gpipe::distributed::detail
