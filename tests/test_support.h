// Helpers shared by the tests: models, plain-training references, comparisons.
#pragma once

#include <gpipe/gpipe.h>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <optional>
#include <string>
#include <vector>

namespace gpipe_test {

/// Every checkpoint mode, for tests that must hold in each.
constexpr gpipe::Checkpoint kCheckpointModes[] = {
    gpipe::Checkpoint::Never,
    gpipe::Checkpoint::ExceptLast,
    gpipe::Checkpoint::Always};

/// How a training step can run: forward() then backward() (no schedule), or
/// step() on each schedule.
const std::optional<gpipe::Schedule> kForwardAndEverySchedule[] = {
    std::nullopt,
    gpipe::Schedule::FillDrain,
    gpipe::Schedule::OneFOneB,
    gpipe::Schedule::Interleaved1F1B,
    gpipe::Schedule::ZeroBubbleH1,
    gpipe::Schedule::LoopedBFS,
    gpipe::Schedule::InterleavedZeroBubble,
    gpipe::Schedule::ZeroBubbleV,
    gpipe::Schedule::DualPipeV};

/// Whether `schedule` runs on `partitions` partitions: the V schedules
/// need an even count.
inline bool runs_on(
    const std::optional<gpipe::Schedule>& schedule,
    int64_t partitions) {
  return !schedule || !gpipe::places_stages_in_a_v(*schedule) ||
      partitions % 2 == 0;
}

/// The lanes the suites run `schedule` on: for the schedules over several
/// stages per lane and an even count, two partitions on each of
/// partitions / 2 lanes, as the schedule places them; else empty (the
/// pipe's default).
inline std::vector<int64_t> lanes_for(
    const std::optional<gpipe::Schedule>& schedule,
    int64_t partitions) {
  if (!schedule || gpipe::stages_per_lane(*schedule) == 1 ||
      partitions % 2 == 1) {
    return {};
  }
  return gpipe::schedule_placement(*schedule, partitions, partitions / 2);
}

/// Linear/Tanh layers, `layers` of each: a model every partition count fits.
inline torch::nn::Sequential make_mlp(
    int64_t layers,
    int64_t width,
    uint64_t seed = 0) {
  torch::manual_seed(seed);
  torch::nn::Sequential seq;
  for (int64_t l = 0; l < layers; ++l) {
    seq->push_back(torch::nn::Linear(width, width));
    seq->push_back(torch::nn::Tanh());
  }
  return seq;
}

/// A deep copy: the plain-training reference with the very same weights.
inline torch::nn::Sequential clone_of(const torch::nn::Sequential& seq) {
  return std::dynamic_pointer_cast<torch::nn::SequentialImpl>(seq->clone());
}

inline std::vector<torch::Tensor> grads_of(
    const std::vector<torch::Tensor>& parameters) {
  std::vector<torch::Tensor> grads;
  for (const auto& p : parameters) {
    grads.push_back(p.grad().defined() ? p.grad().clone() : torch::Tensor());
  }
  return grads;
}

/// The largest absolute difference between two tensors of one shape.
inline double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.to(torch::kCPU) - b.to(torch::kCPU)).abs().max().item<double>();
}

/// Equal up to float summation order: within `tolerance` of the largest
/// magnitude in `expected` (or absolutely, where that is below one).
inline void expect_close(
    const std::vector<torch::Tensor>& actual,
    const std::vector<torch::Tensor>& expected,
    double tolerance,
    const std::string& what) {
  ASSERT_EQ(actual.size(), expected.size()) << what;
  for (size_t k = 0; k < actual.size(); ++k) {
    ASSERT_EQ(actual[k].defined(), expected[k].defined()) << what << " #" << k;
    if (actual[k].defined()) {
      const double scale =
          std::max(1.0, expected[k].abs().max().item<double>());
      EXPECT_LE(max_abs_diff(actual[k], expected[k]), tolerance * scale)
          << what << " #" << k;
    }
  }
}

inline void expect_identical(
    const std::vector<torch::Tensor>& actual,
    const std::vector<torch::Tensor>& expected,
    const std::string& what) {
  ASSERT_EQ(actual.size(), expected.size()) << what;
  for (size_t k = 0; k < actual.size(); ++k) {
    EXPECT_TRUE(torch::equal(actual[k], expected[k])) << what << " #" << k;
  }
}

/// The message of a c10::Error without its backtrace.
template <typename Fn>
std::string error_of(Fn&& fn) {
  try {
    fn();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "(no error)";
}

/// What `fn` threw: its type's name, its message (what(), or the value of
/// an int) and its cell as gpipe::failed_cell recorded it ("partition 1,
/// micro-batch 0, loss_fn"; "" when none).
struct Failure {
  std::string type;
  std::string message;
  std::string cell;
};

template <typename Fn>
Failure failure_of(Fn&& fn) {
  Failure failure{"(no exception)", "", ""};
  try {
    fn();
    return failure;
  } catch (...) {
    failure.type = gpipe::detail::current_exception_type();
    if (const auto cell = gpipe::failed_cell(std::current_exception())) {
      failure.cell = "partition " + std::to_string(cell->partition) +
          ", micro-batch " + std::to_string(cell->microbatch) + ", " +
          cell->phase;
    }
    try {
      throw;
    } catch (const c10::Error& e) {
      failure.message = e.what_without_backtrace();
    } catch (const std::exception& e) {
      failure.message = e.what();
    } catch (int value) {
      failure.message = std::to_string(value);
    } catch (...) {
    }
  }
  return failure;
}

/// A GPT's output head: logits against the token embedding's own weight,
/// held as a submodule, so that the tie is a registered parameter of both
/// the first layer and this one.
struct TiedHeadImpl : torch::nn::Module {
  explicit TiedHeadImpl(torch::nn::Embedding embedding_)
      : embedding(register_module("embedding", std::move(embedding_))) {}
  torch::Tensor forward(const torch::Tensor& h) {
    return torch::matmul(h, embedding->weight.t());
  }
  torch::nn::Embedding embedding;
};
TORCH_MODULE(TiedHead);

/// Dynamic loss scaling done by hand, the reference GradScaler is held to:
/// gradients divided by the scale; a step with an inf or NaN gradient is
/// skipped and halves the scale, `interval` clean steps in a row double it.
struct LossScalingByHand {
  double scale;
  int64_t interval;
  int64_t clean = 0;

  /// Unscales the gradients of `parameters`, steps `optimizer` unless one
  /// is inf or NaN, updates the scale; returns whether one was.
  bool step(
      const std::vector<torch::Tensor>& parameters,
      torch::optim::Optimizer& optimizer) {
    bool found_inf = false;
    for (const auto& p : parameters) {
      torch::NoGradGuard no_grad;
      p.grad().div_(scale);
      found_inf = found_inf || !torch::isfinite(p.grad()).all().item<bool>();
    }
    if (found_inf) {
      scale *= 0.5;
      clean = 0;
    } else {
      optimizer.step();
      if (++clean == interval) {
        scale *= 2;
        clean = 0;
      }
    }
    return found_inf;
  }
};

/// A layer made of a function, for tests that need a layer to misbehave.
inline torch::nn::Functional layer(
    std::function<torch::Tensor(torch::Tensor)> fn) {
  return torch::nn::Functional(std::move(fn));
}

inline bool cuda_available() {
  return torch::cuda::is_available();
}

} // namespace gpipe_test

/// Skips the test where no CUDA device is present.
#define SKIP_WITHOUT_CUDA()                      \
  if (!gpipe_test::cuda_available()) {           \
    GTEST_SKIP() << "no CUDA device is present"; \
  }
