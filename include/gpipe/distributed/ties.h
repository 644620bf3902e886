// Tied parameters across the ranks of a pipeline: a parameter that stages
// on different ranks use (a GPT's token embedding, first stage, and its
// output projection, last stage), kept as one copy per owner rank.
//
// Why: in one process a tied module is one tensor and autograd sums its
// gradient's terms. Across processes each owner holds its own copy, and each
// copy's gradient holds only its own stage's terms; plain training's
// gradient is their sum. So after the drain the owners all-reduce this
// step's gradients of their tied copies over a group of just the owners (of
// this pipeline; replicas then average as for every parameter), every copy
// takes the identical optimizer step, and the copies stay bit-identical.
//
// Note [Ties are found, and watched]
// Every rank builds the whole Sequential (same seed), so each can see which
// registered parameters the cut stages share, by tensor identity: no rank
// needs to be told. A weight captured inside a lambda is not registered and
// cannot be seen; register it (a head module that holds the embedding as a
// submodule). A pipe built stage by stage cannot see its ties (each stage is
// built apart): DistributedOptions::tie declares them by name, and their
// copies take the first name's value when the pipe is built
// (declared_ties.h); a rank that holds several copies (the V schedules
// place the first and the last stage on one rank) sums them before the
// owners do. Each step the owners compare a fingerprint of their copies'
// bits (two wrapping integer sums, exact in any order): a copy modified
// behind the pipe's back is a `gpipe:` error on every owner, which fails the
// step everywhere, instead of silent drift. The fingerprints are taken and
// their sum started as the step begins, and the verdict is waited for
// before the loss goes out; the gradients are summed after it, so only the
// owners wait for the last of them to drain, not the ranks that wait for
// the loss (a GPT's middle stages in 1F1B).
// The first step reads every element; later steps read at most 65,536 of
// them, every stride-th from an offset that moves by one each step, so a
// check costs microseconds even for a vocabulary-sized embedding (a whole
// read of 38M floats took 0.5 s on one core here). A change to most of a
// copy (a load or an optimizer step on one rank) is seen at the next step;
// a change to a single element within numel / 65,536 steps.
#pragma once

#include <gpipe/distributed/failure.h>
#include <gpipe/distributed/options.h>
#include <gpipe/distributed/placement.h>
#include <gpipe/distributed/world.h>

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace gpipe::distributed {

/// A parameter that stages on several ranks of a pipeline share.
struct TiedParameter {
  /// Its name in the Sequential (the first of its names).
  std::string name;
  /// The stages whose layers use it, ascending.
  std::vector<int64_t> stages;
  /// The positions in the pipeline that hold those stages (at least two),
  /// ascending; the first counts it in whole-pipe sums (clip_grad_norm).
  std::vector<int64_t> positions;
};

namespace detail {

/// A tie as found or declared, with this rank's copies of it: one tensor
/// for a tie found (the whole model is built on every rank), one per name
/// on this rank's stages for a declared tie (declared_ties.h).
struct FoundTie {
  TiedParameter tie;
  std::vector<torch::Tensor> copies;
  /// Declared: the position whose copy (the first name's) every copy takes
  /// when the pipe is built; -1: found, the copies are one tensor already.
  int64_t source = -1;
};

/// The registered parameters of the whole model cut into `parts` that
/// stages at different positions share, in the order of their first stage
/// and name.
inline std::vector<FoundTie> find_ties(
    const std::vector<torch::nn::Sequential>& parts,
    const RankPlacement& placement) {
  std::unordered_map<const c10::TensorImpl*, size_t> index;
  std::vector<FoundTie> found;
  for (size_t s = 0; s < parts.size(); ++s) {
    const int64_t position = placement.position_of_stage[s];
    for (const auto& named : parts[s]->named_parameters()) {
      const auto* key = named.value().unsafeGetTensorImpl();
      const auto at = index.emplace(key, found.size());
      if (at.second) {
        found.push_back({{named.key(), {}, {}}, {named.value()}, -1});
      }
      auto& tie = found[at.first->second].tie;
      if (tie.stages.empty() || tie.stages.back() != static_cast<int64_t>(s)) {
        tie.stages.push_back(static_cast<int64_t>(s));
      }
      if (std::find(tie.positions.begin(), tie.positions.end(), position) ==
          tie.positions.end()) {
        tie.positions.push_back(position);
      }
    }
  }
  std::vector<FoundTie> ties;
  for (auto& each : found) {
    if (each.tie.positions.size() > 1) {
      std::sort(each.tie.positions.begin(), each.tie.positions.end());
      ties.push_back(std::move(each));
    }
  }
  return ties;
}

/// Two wrapping sums of a tensor's bits (Note [Ties are found, and
/// watched]), folded to 20 bits each so that their squares summed over
/// owners stay exact in a double.
inline std::pair<double, double> bits_fingerprint(
    const torch::Tensor& value,
    int64_t check) {
  torch::NoGradGuard no_grad;
  constexpr int64_t kSample = int64_t{1} << 16;
  auto flat = value.detach().reshape({-1});
  if (check > 0 && flat.numel() > kSample) {
    const int64_t stride = (flat.numel() + kSample - 1) / kSample;
    flat = flat.slice(0, check % stride, flat.numel(), stride);
  }
  flat = flat.contiguous();
  torch::ScalarType as;
  switch (flat.element_size()) {
    case 8:
      as = torch::kInt64;
      break;
    case 4:
      as = torch::kInt32;
      break;
    case 2:
      as = torch::kInt16;
      break;
    default:
      as = torch::kUInt8;
  }
  const auto bits = flat.view(as);
  constexpr int64_t kChunk = int64_t{1} << 20;
  uint64_t first = 0;
  uint64_t second = 0;
  for (int64_t at = 0; at < bits.numel(); at += kChunk) {
    const auto chunk = bits.narrow(0, at, std::min(kChunk, bits.numel() - at))
                           .to(torch::kInt64);
    // Integer sums wrap identically in any order, on any device.
    first += static_cast<uint64_t>(chunk.sum().item<int64_t>());
    second +=
        static_cast<uint64_t>(chunk.bitwise_xor(chunk.bitwise_right_shift(7))
                                  .mul(chunk.bitwise_and(0xFFFF).add(1))
                                  .sum()
                                  .item<int64_t>());
  }
  const auto fold = [](uint64_t v) {
    v ^= v >> 31;
    v *= 0x9E3779B97F4A7C15ULL;
    v ^= v >> 29;
    return static_cast<double>(v & 0xFFFFF);
  };
  return {fold(first), fold(second)};
}

/// This rank's tied copies and the owner groups that sum their gradients.
class Ties {
 public:
  /// The ties `found` in the whole model, and a group per owner set that
  /// holds this rank (made on every member in the same order).
  Ties(
      std::vector<FoundTie> found,
      const std::shared_ptr<World>& world,
      const RankPlacement& placement,
      const DistributedOptions& options,
      const std::string& prefix,
      FailureBoard& board)
      : world_(world),
        board_(board),
        on_(placement.nccl ? options.device() : torch::Device(torch::kCPU)) {
    // Owner sets in a fixed order on every rank, so that ranks in two
    // groups never wait for each other in opposite orders.
    std::map<std::vector<int64_t>, std::vector<size_t>> by_owners;
    for (size_t k = 0; k < found.size(); ++k) {
      ties_.push_back(found[k].tie);
      by_owners[found[k].tie.positions].push_back(k);
    }
    const int64_t position = placement.position;
    for (const auto& [positions, members] : by_owners) {
      if (std::find(positions.begin(), positions.end(), position) ==
          positions.end()) {
        continue;
      }
      Owners owners;
      for (const int64_t p : positions) {
        owners.ranks.push_back(placement.rank_at(p));
      }
      if (positions.size() > 1) { // else every copy is on this rank
        const std::string name = prefix + "tie_" + c10::Join("_", positions) +
            "_replica" + std::to_string(placement.replica);
        owners.group = placement.nccl
            ? world->new_nccl_group(name, owners.ranks, options.device())
            : world->new_group(name, owners.ranks);
      }
      for (const size_t k : members) {
        const auto& copies = found[k].copies;
        owners.ties.push_back(k);
        owners.copies.push_back(copies);
        for (size_t c = 0; c < copies.size(); ++c) {
          held_.insert(copies[c].unsafeGetTensorImpl());
          if (c > 0 || positions.front() != position) {
            uncounted_.insert(copies[c].unsafeGetTensorImpl());
          }
        }
        if (found[k].source >= 0) {
          take_the_first_value(owners, found[k], position, positions);
        }
      }
      owners_.push_back(std::move(owners));
    }
  }

  /// Every tie of the pipeline.
  const std::vector<TiedParameter>& all() const {
    return ties_;
  }

  /// Whether this rank owns a copy that it shares with another rank.
  bool any_here() const {
    return !owners_.empty();
  }

  /// Whether `parameter` is a copy this rank shares with another rank.
  bool holds(const torch::Tensor& parameter) const {
    return held_.count(parameter.unsafeGetTensorImpl()) > 0;
  }

  /// Those of `parameters` this rank counts in whole-pipe sums: a tied
  /// copy counts on its first owner only.
  std::vector<torch::Tensor> counted(
      const std::vector<torch::Tensor>& parameters) const {
    std::vector<torch::Tensor> counted;
    for (const auto& parameter : parameters) {
      if (uncounted_.count(parameter.unsafeGetTensorImpl()) == 0) {
        counted.push_back(parameter);
      }
    }
    return counted;
  }

  /// Starts comparing the owners' copies: a fingerprint of each copy's
  /// bits, summed over the owners without waiting. At the step's start, so
  /// the verdict is in long before the loss goes out and no rank waits for
  /// it (Note [Ties are found, and watched]).
  void start_check() {
    torch::NoGradGuard no_grad;
    for (auto& owners : owners_) {
      const auto n = static_cast<int64_t>(owners.copies.size());
      // Per tie: [f1, f1^2, f2, f2^2] of this rank's first copy (its other
      // copies must match it).
      auto fingerprints = torch::zeros({4 * n}, torch::kFloat64);
      auto* f = fingerprints.data_ptr<double>();
      for (int64_t k = 0; k < n; ++k) {
        const auto& copies = owners.copies[static_cast<size_t>(k)];
        const auto [f1, f2] = bits_fingerprint(copies.front(), checks_);
        bool same_here = true;
        for (const auto& copy : copies) {
          same_here = same_here &&
              bits_fingerprint(copy, checks_) == std::make_pair(f1, f2);
        }
        check_same(owners, k, same_here);
        f[4 * k] = f1;
        f[4 * k + 1] = f1 * f1;
        f[4 * k + 2] = f2;
        f[4 * k + 3] = f2 * f2;
      }
      owners.fingerprints = fingerprints.to(on_);
      if (owners.group) {
        owners.checking = board_.start_sum(
            *owners.group,
            owners.fingerprints,
            world_->timeout(),
            failed_while(owners, "the fingerprints of the tied copies"));
      }
    }
    ++checks_;
  }

  /// Waits for the comparison start_check began; throws where the copies
  /// differ.
  void finish_check() {
    for (auto& owners : owners_) {
      if (!owners.fingerprints.defined()) {
        continue;
      }
      if (owners.checking) {
        board_.wait_for(
            owners.checking,
            failed_while(owners, "the fingerprints of the tied copies"));
        owners.checking.reset();
      }
      const auto summed = owners.fingerprints.to(torch::kCPU);
      owners.fingerprints = torch::Tensor();
      const auto* f = summed.data_ptr<double>();
      const auto size = static_cast<double>(owners.ranks.size());
      for (int64_t k = 0; k < static_cast<int64_t>(owners.copies.size()); ++k) {
        // All equal exactly when size * sum(f^2) == sum(f)^2.
        check_same(
            owners,
            k,
            size * f[4 * k + 1] == f[4 * k] * f[4 * k] &&
                size * f[4 * k + 3] == f[4 * k + 2] * f[4 * k + 2]);
      }
    }
  }

  /// Sums this step's gradients of the copies over their owners, after
  /// finish_check. A copy keeps no gradient where no owner's copy has one.
  void reduce() {
    finish_check();
    torch::NoGradGuard no_grad;
    for (auto& owners : owners_) {
      const auto n = static_cast<int64_t>(owners.copies.size());
      std::map<c10::ScalarType, std::vector<int64_t>> by_dtype;
      for (int64_t k = 0; k < n; ++k) {
        by_dtype[owners.copies[static_cast<size_t>(k)].front().scalar_type()]
            .push_back(k);
      }
      for (const auto& [dtype, slots] : by_dtype) {
        const auto on = torch::TensorOptions().dtype(dtype).device(on_);
        std::vector<torch::Tensor> flat;
        // After the gradients, one flag per tie: its copies here have a
        // gradient (summed, they say whether any owner's has).
        std::vector<double> has_grad;
        for (size_t j = 0; j < slots.size(); ++j) {
          // This rank's copies summed in copy order.
          torch::Tensor sum;
          for (const auto& copy :
               owners.copies[static_cast<size_t>(slots[j])]) {
            if (copy.grad().defined()) {
              auto grad = copy.grad().reshape({-1}).to(on_);
              sum = sum.defined() ? sum + grad : grad;
            }
          }
          const auto& first =
              owners.copies[static_cast<size_t>(slots[j])].front();
          flat.push_back(
              sum.defined() ? sum : torch::zeros({first.numel()}, on));
          has_grad.push_back(sum.defined() ? 1.0 : 0.0);
        }
        const auto flags = static_cast<int64_t>(has_grad.size());
        flat.push_back(torch::tensor(has_grad, torch::kFloat64).to(on));
        auto bucket = torch::cat(flat);
        if (owners.group) {
          board_.sum_over(
              *owners.group,
              bucket,
              world_->timeout(),
              failed_while(owners, "the gradients of the tied copies"));
        }
        const auto any_grad = bucket.narrow(0, bucket.numel() - flags, flags)
                                  .to(torch::kCPU, torch::kFloat64);
        const auto* any = any_grad.data_ptr<double>();
        int64_t at = 0;
        for (size_t j = 0; j < slots.size(); ++j) {
          const auto& copies = owners.copies[static_cast<size_t>(slots[j])];
          const auto& first = copies.front();
          auto summed = bucket.narrow(0, at, first.numel())
                            .view(first.sizes())
                            .to(first.device());
          at += first.numel();
          for (const auto& copy : copies) {
            copy.mutable_grad() = any[j] > 0 ? summed.clone() : torch::Tensor();
          }
        }
      }
    }
  }

 private:
  struct Owners {
    std::vector<int64_t> ranks;
    c10::intrusive_ptr<c10d::Backend> group; // null: one rank owns all
    std::vector<size_t> ties; // indices into ties_
    std::vector<std::vector<torch::Tensor>> copies; // this rank's, per tie
    torch::Tensor fingerprints; // this step's, from start_check
    c10::intrusive_ptr<c10d::Work> checking; // their sum, not waited for
  };

  /// Throws unless `same`: the copies of owners' k-th tie are equal.
  void check_same(const Owners& owners, int64_t k, bool same) const {
    const auto& tie = ties_[owners.ties[static_cast<size_t>(k)]];
    TORCH_CHECK(
        same,
        "gpipe: the copies of tied parameter \"",
        tie.name,
        "\" (stages ",
        c10::Join(", ", tie.stages),
        ") on ranks ",
        c10::Join(", ", owners.ranks),
        " differ: one was modified behind the pipe's back (step every "
        "copy with the same optimizer, on every owner rank)");
  }

  /// A declared tie's copies take its first name's value (held at the
  /// tie's source position), on every owner.
  void take_the_first_value(
      Owners& owners,
      const FoundTie& tie,
      int64_t position,
      const std::vector<int64_t>& positions) {
    torch::NoGradGuard no_grad;
    const auto& copies = tie.copies;
    auto value = position == tie.source
        ? copies.front().detach().to(on_).clone()
        : torch::empty_like(
              copies.front(), copies.front().options().device(on_));
    if (owners.group) {
      std::vector<torch::Tensor> tensors{value};
      c10d::BroadcastOptions from;
      from.rootRank = static_cast<int64_t>(
          std::find(positions.begin(), positions.end(), tie.source) -
          positions.begin());
      from.timeout = world_->timeout();
      board_.wait_for(
          owners.group->broadcast(tensors, from),
          "an owner of tied parameter \"" + tie.tie.name +
              "\" failed, exited or timed out while the copies took its value");
    }
    for (const auto& copy : copies) {
      copy.copy_(value);
    }
  }

  static std::string failed_while(const Owners& owners, const char* what) {
    return "an owner of a tied parameter among ranks " +
        c10::Join(", ", owners.ranks) +
        " failed, exited or timed out while summing " + what;
  }

  std::vector<TiedParameter> ties_;
  std::shared_ptr<World> world_;
  FailureBoard& board_;
  torch::Device on_;
  std::vector<Owners> owners_;
  int64_t checks_ = 0; // steps checked, the same count on every owner
  std::set<const c10::TensorImpl*> uncounted_;
  std::set<const c10::TensorImpl*> held_;
};

} // namespace detail
} // namespace gpipe::distributed
