// Whole-model gradient utilities in one process: the global norm of a pipe's
// gradients, clipped as LibTorch clips plain training's with every tensor
// counted once, and dynamic loss scaling step for step against plain
// scaling done by hand.
#include "test_support.h"

#include <cmath>
#include <limits>
#include <sstream>

namespace gradients_test {

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

/// make_tied_model's layers with a head of its own, equal to the embedding
/// only once a declared tie sets it so ("5.embedding.weight").
torch::nn::Sequential make_model_with_its_own_head() {
  torch::nn::Sequential seq(
      torch::nn::Embedding(9, 5),
      torch::nn::Linear(5, 5),
      torch::nn::Tanh(),
      torch::nn::Linear(5, 5),
      torch::nn::Tanh(),
      gpipe_test::TiedHead(torch::nn::Embedding(9, 5)));
  seq->to(torch::kDouble);
  // make_tied_model's values; the head keeps its own draw.
  torch::NoGradGuard no_grad;
  auto mine = seq->named_parameters();
  for (const auto& item : make_tied_model()->named_parameters()) {
    if (item.key() != "5.embedding.weight") {
      mine[item.key()].copy_(item.value());
    }
  }
  return seq;
}

/// K = devices.size() partitions, 4 micro-batches, on the schedule's lanes
/// where the devices are CPUs (a lane per partition where it names none).
GPipeOptions options_on(
    const std::vector<torch::Device>& devices,
    gpipe::Schedule schedule,
    gpipe::Checkpoint mode) {
  const auto partitions = static_cast<int64_t>(devices.size());
  const bool cpu = devices.front().is_cpu();
  const auto lanes = cpu ? gpipe_test::lanes_for(schedule, partitions)
                         : std::vector<int64_t>{};
  return GPipeOptions(partitions)
      .microbatches(4)
      .checkpoint(mode)
      .schedule(schedule)
      .devices(devices)
      .lanes(lanes)
      .concurrent_cpu_partitions(cpu && lanes.empty());
}

const std::vector<std::string> kHeadTie{"0.weight", "5.embedding.weight"};

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
        Pipe pipe(
            seq,
            options_on(
                std::vector<torch::Device>(
                    static_cast<size_t>(partitions), device),
                schedule,
                mode));
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

/// The tied model's embedding and head as two tensors declared tied, on
/// `devices` (K = their count): 3 clipped AdamW steps equal plain training
/// of the model whose tie is one tensor, through `step()` on every schedule
/// and checkpoint mode, and through `forward()` and a backward that
/// accumulates two batches; the copies stay equal after every step.
void expect_declared_tie_trains_like_plain(
    const std::vector<torch::Device>& devices) {
  const auto partitions = static_cast<int64_t>(devices.size());
  torch::manual_seed(37);
  const auto ids = torch::randint(0, 9, {6, 12}, torch::kLong);
  const auto next = torch::randint(0, 9, {6, 12}, torch::kLong);
  const auto first = devices.front();
  const auto last = devices.back();
  for (const auto schedule : gpipe::kEverySchedule) {
    if (!gpipe_test::runs_on(schedule, partitions)) {
      continue;
    }
    for (const auto mode : gpipe_test::kCheckpointModes) {
      for (const bool through_forward : {false, true}) {
        if (through_forward && schedule != gpipe::Schedule::FillDrain) {
          continue; // forward() then backward() is fill-drain
        }
        const auto what = std::to_string(partitions) + " partitions, " +
            gpipe::to_string(schedule) + ", " + gpipe::to_string(mode) +
            (through_forward ? ", forward and backward" : ", step");
        auto plain = make_tied_model();
        plain->to(first);
        auto seq = make_model_with_its_own_head();
        Pipe pipe(seq, options_on(devices, schedule, mode).tie(kHeadTie));
        const auto plain_parameters = gpipe::unique_parameters(*plain);
        const auto counted = pipe->counted_parameters();
        ASSERT_EQ(counted.size(), plain_parameters.size()) << what;
        torch::optim::AdamW plain_adamw(
            plain_parameters, torch::optim::AdamWOptions(0.01));
        torch::optim::AdamW pipe_adamw(
            pipe->parameters(), torch::optim::AdamWOptions(0.01));
        for (int64_t step = 0; step < 3; ++step) {
          plain_adamw.zero_grad();
          pipe_adamw.zero_grad();
          for (int64_t part = 0; part < (through_forward ? 2 : 1); ++part) {
            const auto x = ids[2 * step + part];
            const auto y = next[2 * step + part];
            cross_entropy(plain->forward(x.to(first)), y.to(first)).backward();
            if (through_forward) {
              cross_entropy(pipe->forward(x.to(first)), y.to(last)).backward();
            } else {
              pipe->step(x.to(first), y.to(last), cross_entropy);
            }
          }
          const double want =
              torch::nn::utils::clip_grad_norm_(plain_parameters, 0.5);
          const double got = gpipe::clip_grad_norm(*pipe, 0.5);
          plain_adamw.step();
          pipe_adamw.step();
          const auto where = what + ", step " + std::to_string(step);
          EXPECT_NEAR(got, want, 1e-6 * want) << where;
          gpipe_test::expect_close(
              counted, plain_parameters, 1e-6, where + ", weights");
          auto named = seq->named_parameters();
          EXPECT_TRUE(torch::equal(
              named["0.weight"], named["5.embedding.weight"].to(first)))
              << where << ": the copies differ";
        }
      }
    }
  }
}

TEST(Gradients, ADeclaredTieOfTwoTensorsOnCpuLanesTrainsLikeOneSharedTensor) {
  for (const int64_t partitions : {2, 3, 4}) {
    expect_declared_tie_trains_like_plain(std::vector<torch::Device>(
        static_cast<size_t>(partitions), torch::kCPU));
  }
}

TEST(
    Gradients,
    ADeclaredTieAcrossGpusTrainsLikeOneSharedTensorOnOneGpu_MultiCUDA) {
  if (torch::cuda::device_count() < 2) {
    GTEST_SKIP() << "fewer than two CUDA devices";
  }
  std::vector<torch::Device> devices;
  for (size_t d = 0; d < std::min<size_t>(torch::cuda::device_count(), 4);
       ++d) {
    devices.emplace_back(torch::kCUDA, static_cast<c10::DeviceIndex>(d));
  }
  expect_declared_tie_trains_like_plain(devices);
}

TEST(Gradients, ATiedCopyChangedOrLeftOutOfTheOptimizerIsAnErrorAtTheNextCall) {
  const auto ids = torch::randint(0, 9, {8}, torch::kLong);
  {
    auto seq = make_model_with_its_own_head();
    Pipe pipe(seq, GPipeOptions(2).microbatches(2).tie(kHeadTie));
    pipe->step(ids, ids, cross_entropy);
    {
      torch::NoGradGuard no_grad;
      seq->named_parameters()["5.embedding.weight"][3][1] += 1e-3;
    }
    const auto message = error_of([&] { pipe->step(ids, ids, cross_entropy); });
    EXPECT_NE(
        message.find("gpipe: the copies of a declared tie differ: "
                     "\"0.weight\" (cpu) and \"5.embedding.weight\" (cpu)"),
        std::string::npos)
        << message;
  }
  {
    // An optimizer given the counted parameters steps one copy only.
    auto seq = make_model_with_its_own_head();
    Pipe pipe(seq, GPipeOptions(2).microbatches(2).tie(kHeadTie));
    torch::optim::SGD sgd(pipe->counted_parameters(), 0.1);
    pipe->step(ids, ids, cross_entropy);
    sgd.step();
    const auto message = error_of([&] { pipe->forward(ids); });
    EXPECT_NE(
        message.find("the copies of a declared tie differ"), std::string::npos)
        << message;
  }
}

TEST(Gradients, BadTieDeclarationsAreErrorsNamingThem) {
  auto expect_error = [](torch::nn::Sequential seq,
                         std::vector<std::string> tie,
                         const std::string& expected) {
    const auto message =
        error_of([&] { Pipe pipe(seq, GPipeOptions(2).tie(std::move(tie))); });
    EXPECT_NE(message.find(expected), std::string::npos) << message;
  };
  expect_error(
      make_model_with_its_own_head(),
      {"0.weight"},
      "gpipe: a tie names at least two parameters, got 1 (0.weight)");
  expect_error(
      make_model_with_its_own_head(),
      {"0.weight", "9.weight"},
      "gpipe: tie(): \"9.weight\" is not a parameter of the Sequential");
  expect_error(
      make_model_with_its_own_head(),
      {"0.weight", "5.embedding.weight", "0.weight"},
      "gpipe: tie(): \"0.weight\" is named in a tie twice");
  expect_error(
      make_tied_model(),
      {"0.weight", "5.embedding.weight"},
      "gpipe: tie(): \"5.embedding.weight\" is the same tensor as another");
  expect_error(
      make_model_with_its_own_head(),
      {"0.weight", "1.weight"},
      "gpipe: tie(): \"0.weight\" is Double[9, 5] but \"1.weight\" is "
      "Double[5, 5]");
  auto half_frozen = make_model_with_its_own_head();
  half_frozen->named_parameters()["5.embedding.weight"].requires_grad_(false);
  expect_error(
      half_frozen,
      kHeadTie,
      "gpipe: tie(): \"0.weight\" requires grad but \"5.embedding.weight\" "
      "does not");
  // The ties are fixed once the pipe is built.
  auto seq = make_model_with_its_own_head();
  Pipe pipe(seq, GPipeOptions(2).tie(kHeadTie));
  pipe->options.tie({"1.bias", "3.bias"});
  const auto message =
      error_of([&] { pipe->forward(torch::zeros({2}, torch::kLong)); });
  EXPECT_NE(
      message.find("gpipe: ties is fixed when the pipe is built"),
      std::string::npos)
      << message;
}

TEST(Gradients, AModuleSharedAcrossDevicesIsRefusedPointingAtTies_MultiCUDA) {
  if (torch::cuda::device_count() < 2) {
    GTEST_SKIP() << "fewer than two CUDA devices";
  }
  const auto message = error_of([&] {
    Pipe pipe(
        make_tied_model(),
        GPipeOptions(2).devices(
            {torch::Device(torch::kCUDA, 0), torch::Device(torch::kCUDA, 1)}));
  });
  EXPECT_NE(message.find("GPipeOptions::tie"), std::string::npos) << message;
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

} // namespace gradients_test
