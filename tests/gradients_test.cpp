// Whole-model gradient utilities in one process: the global norm of a pipe's
// gradients, clipped as LibTorch clips plain training's with every tensor
// counted once, and dynamic loss scaling step for step against plain
// scaling done by hand.
#include "test_support.h"

#include <cmath>
#include <limits>
#include <sstream>

using gpipe::GPipe;
using gpipe::GPipeOptions;
using gpipe::GradScaler;
using gpipe::GradScalerOptions;
using gpipe_test::error_of;

namespace {

using Pipe = GPipe<torch::nn::Sequential>;

torch::nn::Sequential make_tied_model() {
  torch::manual_seed(3);
  torch::nn::Embedding embedding(9, 5);
  torch::nn::Sequential seq(
      embedding,
      torch::nn::Linear(5, 5),
      torch::nn::Tanh(),
      torch::nn::Linear(5, 5),
      torch::nn::Tanh(),
      gpipe_test::TiedHead(embedding));
  seq->to(torch::kDouble);
  return seq;
}

torch::Tensor cross_entropy(const torch::Tensor& out, const torch::Tensor& t) {
  return torch::nn::functional::cross_entropy(out, t);
}

const double kInfinity = std::numeric_limits<double>::infinity();

} // namespace

TEST(Gradients, UniqueParametersListsATiedTensorOnce) {
  auto seq = make_tied_model();
  EXPECT_EQ(seq->parameters().size(), 6u); // the tie, twice
  const auto unique = gpipe::unique_parameters(*seq);
  ASSERT_EQ(unique.size(), 5u);
  EXPECT_TRUE(unique[0].is_same(seq->parameters()[0]));
}

TEST(Gradients, ClippingAPipeEqualsLibTorchsClippingOfThePlainModel) {
  const auto ids = torch::randint(0, 9, {12}, torch::kLong);
  const auto next = torch::randint(0, 9, {12}, torch::kLong);
  for (const double norm_type : {2.0, 1.0, 3.5, kInfinity, 0.0}) {
    for (const double max_norm : {0.05, 100.0}) {
      auto plain = make_tied_model();
      cross_entropy(plain->forward(ids), next).backward();
      const auto plain_parameters = gpipe::unique_parameters(*plain);
      const double want = torch::nn::utils::clip_grad_norm_(
          plain_parameters, max_norm, norm_type);

      auto seq = make_tied_model();
      Pipe pipe(
          seq, GPipeOptions(3).microbatches(4).concurrent_cpu_partitions(true));
      pipe->step(ids, next, cross_entropy);
      const double got = gpipe::clip_grad_norm(*pipe, max_norm, norm_type);
      const auto what = "norm " + std::to_string(norm_type) + ", max " +
          std::to_string(max_norm);
      EXPECT_NEAR(got, want, 1e-9 * std::max(1.0, want)) << what;
      gpipe_test::expect_close(
          gpipe_test::grads_of(gpipe::unique_parameters(*seq)),
          gpipe_test::grads_of(plain_parameters),
          1e-9,
          what);
    }
  }
}

TEST(Gradients, ATiedWeightCountsOnceInTheNorm) {
  auto seq = make_tied_model();
  const auto ids = torch::randint(0, 9, {8}, torch::kLong);
  cross_entropy(seq->forward(ids), ids).backward();
  double squares = 0;
  for (const auto& p : gpipe::unique_parameters(*seq)) {
    squares += p.grad().pow(2).sum().item<double>();
  }
  // LibTorch's own, given Module::parameters(), counts the tie twice.
  const double twice =
      torch::nn::utils::clip_grad_norm_(seq->parameters(), 1e9);
  const double once = gpipe::clip_grad_norm(*seq, 1e9);
  EXPECT_NEAR(once, std::sqrt(squares), 1e-12);
  EXPECT_GT(twice, once * (1 + 1e-6));
}

TEST(Gradients, AnInfiniteOrNaNNormScalesAsLibTorchsOrIsAnErrorWhenAsked) {
  for (const double poison : {kInfinity, std::nan("")}) {
    auto a = torch::ones({3}, torch::kDouble).requires_grad_();
    auto b = torch::ones({2}, torch::kDouble).requires_grad_();
    a.mutable_grad() = torch::tensor({1.0, poison, 2.0}, torch::kDouble);
    b.mutable_grad() = torch::tensor({3.0, 4.0}, torch::kDouble);
    auto c = a.detach().clone().requires_grad_();
    auto d = b.detach().clone().requires_grad_();
    c.mutable_grad() = a.grad().clone();
    d.mutable_grad() = b.grad().clone();
    const double want = torch::nn::utils::clip_grad_norm_({c, d}, 1.0);
    const double got = gpipe::clip_grad_norm({a, b}, 1.0);
    EXPECT_TRUE(std::isnan(want) ? std::isnan(got) : got == want) << got;
    EXPECT_TRUE(torch::equal(a.grad().isnan(), c.grad().isnan()));
    EXPECT_TRUE(torch::equal(b.grad().isnan(), d.grad().isnan()));
    const auto message = error_of([&] {
      gpipe::clip_grad_norm({a, b}, 1.0, 2.0, /*error_if_nonfinite=*/true);
    });
    EXPECT_NE(
        message.find("gpipe: the total gradient norm of order 2"),
        std::string::npos)
        << message;
  }
}

TEST(Gradients, ANegativeNormTypeIsAnErrorNamingIt) {
  auto a = torch::ones({3}).requires_grad_();
  a.mutable_grad() = torch::ones({3});
  const auto message = error_of([&] { gpipe::clip_grad_norm({a}, 1.0, -1.0); });
  EXPECT_NE(
      message.find("norm type >= 0 or infinity, got -1"), std::string::npos)
      << message;
}

/// A tied embedding and head on K partitions (concurrent CPU lanes, or the
/// schedule's lanes), every schedule and checkpoint mode: 3 clipped AdamW
/// steps equal plain training's, the tie one tensor throughout.
void expect_tied_model_trains_like_plain(const torch::Device& device) {
  torch::manual_seed(31);
  const auto ids = torch::randint(0, 9, {3, 12}, torch::kLong);
  const auto next = torch::randint(0, 9, {3, 12}, torch::kLong);
  for (const int64_t partitions : {2, 3, 4}) {
    for (const auto schedule : gpipe::kEverySchedule) {
      if (!gpipe_test::runs_on(schedule, partitions)) {
        continue;
      }
      for (const auto mode : gpipe_test::kCheckpointModes) {
        const auto what = std::to_string(partitions) + " partitions, " +
            gpipe::to_string(schedule) + ", " + gpipe::to_string(mode);
        auto plain = make_tied_model();
        plain->to(device);
        auto seq = make_tied_model();
        const auto lanes = gpipe_test::lanes_for(schedule, partitions);
        Pipe pipe(
            seq,
            GPipeOptions(partitions)
                .microbatches(4)
                .checkpoint(mode)
                .schedule(schedule)
                .devices(std::vector<torch::Device>(
                    static_cast<size_t>(partitions), device))
                .lanes(device.is_cpu() ? lanes : std::vector<int64_t>{})
                .concurrent_cpu_partitions(lanes.empty()));
        const auto plain_parameters = gpipe::unique_parameters(*plain);
        const auto pipe_parameters = gpipe::unique_parameters(*pipe);
        ASSERT_EQ(pipe_parameters.size(), plain_parameters.size());
        torch::optim::AdamW plain_adamw(
            plain_parameters, torch::optim::AdamWOptions(0.01));
        torch::optim::AdamW pipe_adamw(
            pipe_parameters, torch::optim::AdamWOptions(0.01));
        for (int64_t step = 0; step < 3; ++step) {
          const auto x = ids[step].to(device);
          const auto y = next[step].to(device);
          plain_adamw.zero_grad();
          cross_entropy(plain->forward(x), y).backward();
          const double want =
              torch::nn::utils::clip_grad_norm_(plain_parameters, 0.5);
          plain_adamw.step();
          pipe_adamw.zero_grad();
          pipe->step(x, y, cross_entropy);
          const double got = gpipe::clip_grad_norm(*pipe, 0.5);
          pipe_adamw.step();
          EXPECT_NEAR(got, want, 1e-6 * want) << what << ", step " << step;
          gpipe_test::expect_close(
              pipe_parameters,
              plain_parameters,
              1e-6,
              what + ", weights after step " + std::to_string(step));
        }
        // The tie is still one tensor, under both of its names.
        EXPECT_TRUE(seq->parameters().front().is_same(seq->parameters().back()))
            << what;
      }
    }
  }
}

TEST(
    Gradients,
    ATiedEmbeddingAndHeadOnTwoThreeAndFourCpuLanesTrainLikePlainForThreeClippedSteps) {
  expect_tied_model_trains_like_plain(torch::kCPU);
}

TEST(
    Gradients,
    ATiedEmbeddingAndHeadOnOneGpuTrainLikePlainForThreeClippedSteps_CUDA) {
  if (!gpipe_test::cuda_available()) {
    GTEST_SKIP() << "no CUDA device";
  }
  expect_tied_model_trains_like_plain(torch::Device(torch::kCUDA, 0));
}

TEST(
    GradScaler,
    ScaledTrainingThroughAPipeEqualsPlainScalingByHandStepForStep) {
  auto plain = make_tied_model();
  auto seq = make_tied_model();
  Pipe pipe(seq, GPipeOptions(3).microbatches(3));
  const auto plain_parameters = gpipe::unique_parameters(*plain);
  torch::optim::SGD plain_sgd(plain_parameters, torch::optim::SGDOptions(0.1));
  torch::optim::SGD pipe_sgd(
      gpipe::unique_parameters(*pipe), torch::optim::SGDOptions(0.1));
  GradScaler scaler(GradScalerOptions().init_scale(256).growth_interval(3));
  gpipe_test::LossScalingByHand by_hand{256, 3};
  torch::manual_seed(21);
  for (int step = 0; step < 9; ++step) {
    const auto ids = torch::randint(0, 9, {9}, torch::kLong);
    const auto next = torch::randint(0, 9, {9}, torch::kLong);
    const bool poisoned = step == 2 || step == 6;
    plain_sgd.zero_grad();
    const auto want = cross_entropy(plain->forward(ids), next);
    (want * by_hand.scale).backward();
    if (poisoned) {
      plain->ptr(1)->named_parameters()["bias"].grad()[0] = std::nan("");
    }
    const bool plain_inf = by_hand.step(plain_parameters, plain_sgd);

    pipe_sgd.zero_grad();
    const auto loss = pipe->step(ids, next, scaler.scaled(cross_entropy));
    gpipe_test::expect_close(
        {scaler.unscaled(loss)}, {want.detach()}, 1e-12, "loss");
    if (poisoned) {
      pipe->ptr(1)->named_parameters()["bias"].grad()[0] = std::nan("");
    }
    EXPECT_EQ(scaler.step(pipe_sgd), !plain_inf) << "step " << step;
    EXPECT_EQ(scaler.found_inf(), plain_inf) << "step " << step;
    scaler.update();
    EXPECT_EQ(scaler.scale(), by_hand.scale) << "step " << step;
    gpipe_test::expect_close(
        gpipe::unique_parameters(*seq),
        plain_parameters,
        1e-12,
        "weights after step " + std::to_string(step));
  }
}

TEST(GradScaler, AnInfGradientSkipsTheStepAndBacksOffTheScale) {
  auto w = torch::ones({2}).requires_grad_();
  torch::optim::SGD sgd({w}, torch::optim::SGDOptions(1.0));
  GradScaler scaler(GradScalerOptions().init_scale(8).backoff_factor(0.25));
  w.mutable_grad() =
      torch::tensor({1.0f, std::numeric_limits<float>::infinity()});
  EXPECT_TRUE(scaler.unscale(sgd));
  EXPECT_FALSE(scaler.step(sgd));
  scaler.update();
  EXPECT_EQ(scaler.scale(), 2.0);
  EXPECT_TRUE(torch::equal(w, torch::ones({2})));
}

TEST(GradScaler, TheScaleGrowsAfterGrowthIntervalCleanStepsInARow) {
  auto w = torch::ones({2}).requires_grad_();
  torch::optim::SGD sgd({w}, torch::optim::SGDOptions(0.0));
  GradScaler scaler(GradScalerOptions().init_scale(4).growth_interval(2));
  std::vector<double> scales;
  for (int step = 0; step < 5; ++step) {
    w.mutable_grad() = torch::ones({2});
    EXPECT_TRUE(scaler.step(sgd));
    scaler.update();
    scales.push_back(scaler.scale());
  }
  EXPECT_EQ(scales, (std::vector<double>{4, 8, 8, 16, 16}));
  EXPECT_EQ(scaler.growth_tracker(), 1);
}

TEST(GradScaler, ASavedScalerResumesWithItsScaleAndGrowthTracker) {
  auto w = torch::ones({2}).requires_grad_();
  torch::optim::SGD sgd({w}, torch::optim::SGDOptions(0.0));
  GradScaler scaler(GradScalerOptions().init_scale(64).growth_interval(3));
  const auto kept_loss = scaler.scaled(cross_entropy);
  w.mutable_grad() = torch::full({2}, std::nan(""));
  scaler.step(sgd);
  scaler.update(); // 32
  w.mutable_grad() = torch::ones({2});
  scaler.step(sgd);
  scaler.update(); // 32, one clean step
  std::stringstream archive;
  torch::save(scaler, archive);
  GradScaler restored(GradScalerOptions().growth_interval(3));
  const auto restored_loss = restored.scaled(cross_entropy);
  torch::load(restored, archive);
  EXPECT_EQ(restored.scale(), 32.0);
  EXPECT_EQ(restored.growth_tracker(), 1);
  // Loss functions made earlier multiply by the current scale.
  const auto logits = torch::zeros({1, 3});
  const auto target = torch::zeros({1}, torch::kLong);
  const double loss = cross_entropy(logits, target).item<double>();
  EXPECT_DOUBLE_EQ(kept_loss(logits, target).item<double>(), 32 * loss);
  EXPECT_DOUBLE_EQ(restored_loss(logits, target).item<double>(), 32 * loss);
}

TEST(GradScaler, ADisabledScalerPassesEverythingThrough) {
  auto w = torch::ones({2}).requires_grad_();
  torch::optim::SGD sgd({w}, torch::optim::SGDOptions(1.0));
  GradScaler scaler(GradScalerOptions().enabled(false));
  w.mutable_grad() = torch::ones({2});
  EXPECT_FALSE(scaler.unscale(sgd));
  EXPECT_TRUE(scaler.step(sgd));
  scaler.update();
  EXPECT_EQ(scaler.scale(), 1.0);
  EXPECT_TRUE(torch::equal(w, torch::zeros({2})));
}

TEST(GradScaler, BadOptionsAndCallsOutOfOrderAreErrorsNamingThem) {
  EXPECT_NE(
      error_of([] {
        GradScaler(GradScalerOptions().init_scale(0));
      }).find("init_scale > 0, got 0"),
      std::string::npos);
  EXPECT_NE(
      error_of([] {
        GradScaler(GradScalerOptions().growth_factor(0.5));
      }).find("growth_factor > 1, got 0.5"),
      std::string::npos);
  EXPECT_NE(
      error_of([] {
        GradScaler(GradScalerOptions().backoff_factor(1));
      }).find("0 < backoff_factor < 1, got 1"),
      std::string::npos);
  EXPECT_NE(
      error_of([] {
        GradScaler(GradScalerOptions().growth_interval(0));
      }).find("growth_interval > 0, got 0"),
      std::string::npos);
  auto w = torch::ones({2}).requires_grad_();
  w.mutable_grad() = torch::ones({2});
  GradScaler scaler;
  EXPECT_NE(
      error_of([&] { scaler.update(); }).find("update ran before unscale"),
      std::string::npos);
  scaler.unscale({w});
  EXPECT_NE(
      error_of([&] { scaler.unscale({w}); }).find("unscale ran twice"),
      std::string::npos);
}
