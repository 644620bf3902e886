// Models that people really write train exactly like their Sequential: tied
// weights, a module used twice, hooks on parameters, autocast, in-place
// first layers, dropout on concurrent lanes, outputs that do not require
// grad. Each compares with plain training of the same model built again
// from the same seed (a clone would untie captured weights), in every
// checkpoint mode, through forward()/backward() and through step().
#include "test_support.h"

#include <ATen/autocast_mode.h>

#include <atomic>
#include <functional>

namespace real_models_test {

using gpipe::Checkpoint;
using gpipe::GPipe;
using gpipe::GPipeOptions;
using gpipe::Schedule;
using gpipe_test::error_of;
using gpipe_test::grads_of;

namespace {

using Pipe = GPipe<torch::nn::Sequential>;
using Factory = std::function<torch::nn::Sequential()>;

torch::Tensor mse(const torch::Tensor& out, const torch::Tensor& target) {
  return torch::mse_loss(out, target);
}

struct Run {
  torch::Tensor output;
  std::vector<torch::Tensor> grads;
};

Run train_plain(
    const Factory& make,
    const torch::Tensor& x,
    const torch::Tensor& y) {
  auto seq = make();
  auto out = seq->forward(x);
  mse(out, y).backward();
  return {out.detach(), grads_of(seq->parameters())};
}

/// forward() + backward(), or step() on `schedule` when given.
Run train_pipe(
    const Factory& make,
    const GPipeOptions& options,
    const torch::Tensor& x,
    const torch::Tensor& y,
    std::optional<Schedule> schedule) {
  auto seq = make();
  Pipe pipe(seq, options);
  if (schedule) {
    pipe->options.schedule(*schedule);
    pipe->step(x, y, mse);
    return {torch::Tensor(), grads_of(seq->parameters())};
  }
  auto out = pipe(x);
  mse(out, y).backward();
  return {out.detach(), grads_of(seq->parameters())};
}

std::string describe(Checkpoint mode, std::optional<Schedule> schedule) {
  return std::string(gpipe::to_string(mode)) + " " +
      (schedule ? gpipe::to_string(*schedule) : "forward/backward");
}

/// Gradients (and outputs) equal plain training to 1e-6 relative, in every
/// checkpoint mode, via forward()/backward() and step() on both schedules.
void expect_trains_like_plain(
    const Factory& make,
    const GPipeOptions& base,
    const torch::Tensor& x,
    const torch::Tensor& y) {
  const auto plain = train_plain(make, x, y);
  for (const auto mode : gpipe_test::kCheckpointModes) {
    for (const auto schedule : gpipe_test::kForwardAndEverySchedule) {
      if (!gpipe_test::runs_on(schedule, base.partitions())) {
        continue;
      }
      auto options = base;
      options.checkpoint(mode);
      const auto pipe = train_pipe(make, options, x, y, schedule);
      const auto what = describe(mode, schedule);
      gpipe_test::expect_close(pipe.grads, plain.grads, 1e-6, what);
      if (pipe.output.defined()) {
        gpipe_test::expect_close({pipe.output}, {plain.output}, 1e-6, what);
      }
    }
  }
}

/// Token model with an output projection tied to the embedding: the
/// embedding sits in partition 0, the projection borrows its weight in the
/// last partition. It trains in double: the Linear bias gradient comes out
/// of LayerNorm's backward, whose terms cancel, so in float the order in
/// which micro-batches sum moves it by ~10 ulps on AVX2 kernels
/// (ATEN_CPU_CAPABILITY=avx2 showed 1.4e-6 against 1.2e-6 allowed); in
/// double that order costs ~1e-15 while a missing term costs ~1e-1.
torch::nn::Sequential make_tied_model() {
  torch::manual_seed(7);
  torch::nn::Embedding embedding(10, 6);
  torch::nn::Sequential seq;
  seq->push_back(embedding);
  seq->push_back(torch::nn::Linear(6, 6));
  seq->push_back(torch::nn::LayerNorm(torch::nn::LayerNormOptions({6})));
  seq->push_back(torch::nn::Tanh());
  seq->push_back(torch::nn::Functional(
      [weight = embedding->weight](const torch::Tensor& h) {
        return torch::matmul(h, weight.t());
      }));
  seq->to(torch::kDouble);
  return seq;
}

} // namespace

TEST(RealModels, AWeightTiedAcrossPartitionsGetsEveryTermOfItsGradient) {
  const auto ids = torch::randint(0, 10, {7}, torch::kLong);
  const auto target = torch::randn({7, 10}, torch::kDouble);
  expect_trains_like_plain(
      make_tied_model, GPipeOptions(2).microbatches(3), ids, target);
  expect_trains_like_plain(
      make_tied_model,
      GPipeOptions(3).microbatches(4).concurrent_cpu_partitions(true),
      ids,
      target);
}

TEST(RealModels, AutogradGradFindsEveryTermOfATiedWeight) {
  const auto ids = torch::randint(0, 10, {6}, torch::kLong);
  const auto target = torch::randn({6, 10}, torch::kDouble);
  auto plain = make_tied_model();
  const auto expected = torch::autograd::grad(
      {mse(plain->forward(ids), target)}, plain->parameters());
  for (const auto mode : gpipe_test::kCheckpointModes) {
    auto seq = make_tied_model();
    Pipe pipe(seq, GPipeOptions(2).microbatches(3).checkpoint(mode));
    const auto got =
        torch::autograd::grad({mse(pipe(ids), target)}, seq->parameters());
    gpipe_test::expect_close(got, expected, 1e-6, gpipe::to_string(mode));
    for (const auto& p : seq->parameters()) {
      EXPECT_FALSE(p.grad().defined()) << "grad() must leave .grad alone";
    }
  }
}

TEST(RealModels, TiedWeightsOnConcurrentLanesAreBitIdenticalAcrossSteps) {
  const auto ids = torch::randint(0, 10, {16}, torch::kLong);
  const auto target = torch::randn({16, 10}, torch::kDouble);
  for (const auto schedule : {Schedule::FillDrain, Schedule::OneFOneB}) {
    std::vector<torch::Tensor> first;
    for (int run = 0; run < 12; ++run) {
      auto seq = make_tied_model();
      Pipe pipe(
          seq,
          GPipeOptions(3)
              .microbatches(8)
              .concurrent_cpu_partitions(true)
              .schedule(schedule));
      pipe->step(ids, target, mse);
      const auto grads = grads_of(seq->parameters());
      if (run == 0) {
        first = grads;
      } else {
        gpipe_test::expect_identical(grads, first, gpipe::to_string(schedule));
      }
    }
  }
}

TEST(RealModels, AModuleUsedTwiceInOnePartitionGetsItsGradientOnce) {
  const Factory make = [] {
    torch::manual_seed(3);
    torch::nn::Linear shared(4, 4);
    return torch::nn::Sequential(
        shared, torch::nn::Tanh(), shared, torch::nn::Tanh());
  };
  const auto x = torch::randn({6, 4});
  const auto y = torch::randn({6, 4});
  expect_trains_like_plain(make, GPipeOptions(1).microbatches(3), x, y);
  expect_trains_like_plain(make, GPipeOptions(2).microbatches(3), x, y);

  auto plain = make();
  const auto expected = torch::autograd::grad(
      {mse(plain->forward(x), y)}, plain->ptr(0)->parameters());
  for (const auto mode : gpipe_test::kCheckpointModes) {
    for (const int64_t partitions : {1, 2}) {
      auto seq = make();
      Pipe pipe(seq, GPipeOptions(partitions).microbatches(3).checkpoint(mode));
      const auto got =
          torch::autograd::grad({mse(pipe(x), y)}, seq->ptr(0)->parameters());
      gpipe_test::expect_close(got, expected, 1e-6, gpipe::to_string(mode));

      auto seq2 = make();
      Pipe pipe2(
          seq2, GPipeOptions(partitions).microbatches(3).checkpoint(mode));
      const auto weight = seq2->ptr(0)->parameters()[0];
      mse(pipe2(x), y).backward({}, false, false, {weight});
      gpipe_test::expect_close(
          {weight.grad()}, {expected[0]}, 1e-6, "backward(inputs=...)");
    }
  }
}

TEST(RealModels, AParameterHookRunsOnceWithTheWholeGradient) {
  const auto x = torch::randn({8, 4});
  const auto y = torch::randn({8, 4});
  auto make_hooked = [](std::vector<torch::Tensor>* seen) {
    return [seen] {
      auto seq = gpipe_test::make_mlp(2, 4, 11);
      auto weight = seq->ptr(0)->parameters()[0];
      weight.register_hook([seen](torch::Tensor grad) {
        seen->push_back(grad.clone()); // reads its argument
        return grad.clamp(-0.01, 0.01);
      });
      return seq;
    };
  };
  std::vector<torch::Tensor> plain_seen;
  const auto plain = train_plain(make_hooked(&plain_seen), x, y);
  ASSERT_EQ(plain_seen.size(), 1u);
  for (const auto mode : gpipe_test::kCheckpointModes) {
    for (const auto schedule : gpipe_test::kForwardAndEverySchedule) {
      std::vector<torch::Tensor> seen;
      const auto pipe = train_pipe(
          make_hooked(&seen),
          GPipeOptions(2).microbatches(4).checkpoint(mode),
          x,
          y,
          schedule);
      const auto what = describe(mode, schedule);
      ASSERT_EQ(seen.size(), 1u) << what;
      gpipe_test::expect_close(seen, plain_seen, 1e-6, what);
      gpipe_test::expect_close(pipe.grads, plain.grads, 1e-6, what);
    }
  }
}

TEST(RealModels, RecomputeRunsUnderTheAutocastStateOfItsForward) {
  const auto x = torch::randn({8, 16});
  const auto y = torch::randn({8, 16});
  const Factory make = [] { return gpipe_test::make_mlp(3, 16, 5); };
  auto autocast = [](bool on) {
    at::autocast::set_autocast_enabled(at::kCPU, on);
    at::autocast::set_autocast_dtype(at::kCPU, at::kBFloat16);
  };
  auto seq_plain = make();
  autocast(true);
  auto out_plain = seq_plain->forward(x);
  autocast(false);
  mse(out_plain.to(torch::kFloat), y).backward();
  const auto expected = grads_of(seq_plain->parameters());
  for (const auto mode : gpipe_test::kCheckpointModes) {
    auto seq = make();
    Pipe pipe(seq, GPipeOptions(3).microbatches(1).checkpoint(mode));
    autocast(true);
    auto out = pipe(x);
    autocast(false);
    EXPECT_EQ(out.scalar_type(), out_plain.scalar_type());
    mse(out.to(torch::kFloat), y).backward(); // outside autocast
    gpipe_test::expect_close(
        grads_of(seq->parameters()), expected, 1e-6, gpipe::to_string(mode));

    // step() under autocast: its backward (and every recompute) too.
    auto seq_step = make();
    Pipe pipe_step(seq_step, GPipeOptions(3).microbatches(1).checkpoint(mode));
    autocast(true);
    pipe_step->step(x, y, [](const torch::Tensor& o, const torch::Tensor& t) {
      return mse(o.to(torch::kFloat), t);
    });
    autocast(false);
    gpipe_test::expect_close(
        grads_of(seq_step->parameters()),
        expected,
        1e-6,
        std::string(gpipe::to_string(mode)) + " step");
  }
}

TEST(RealModels, RandomOperatorsBesidesDropoutAreReplayedByRecompute) {
  // Noise from randn_like and a random permutation: a recompute that drew
  // fresh numbers would change the gradients between modes.
  const Factory make = [] {
    torch::manual_seed(17);
    return torch::nn::Sequential(
        torch::nn::Linear(8, 8),
        torch::nn::Functional([](const torch::Tensor& h) {
          return h + 0.5 * torch::randn_like(h);
        }),
        torch::nn::Tanh(),
        torch::nn::Linear(8, 8),
        torch::nn::Functional([](const torch::Tensor& h) {
          return h.index_select(1, torch::randperm(h.size(1)));
        }),
        torch::nn::Tanh());
  };
  const auto x = torch::randn({12, 8});
  std::vector<torch::Tensor> never;
  for (const auto mode : gpipe_test::kCheckpointModes) {
    auto seq = make();
    Pipe pipe(seq, GPipeOptions(3).microbatches(4).checkpoint(mode));
    torch::manual_seed(5);
    pipe(x).pow(2).sum().backward();
    const auto grads = grads_of(seq->parameters());
    if (mode == Checkpoint::Never) {
      never = grads;
    } else {
      gpipe_test::expect_identical(grads, never, gpipe::to_string(mode));
    }
  }
}

TEST(RealModels, AnInPlaceFirstLayerInALaterPartitionTrainsLikePlain) {
  const Factory make = [] {
    torch::manual_seed(2);
    return torch::nn::Sequential(
        torch::nn::Linear(4, 4),
        torch::nn::Linear(4, 4),
        torch::nn::ReLU(torch::nn::ReLUOptions().inplace(true)),
        torch::nn::Linear(4, 4));
  };
  const auto x = torch::randn({6, 4});
  const auto y = torch::randn({6, 4});
  expect_trains_like_plain(
      make, GPipeOptions(2).microbatches(3).balance({2, 2}), x, y);
}

TEST(RealModels, AnInPlaceFirstLayerWritesIntoTheCallersInputOnceAsPlainDoes) {
  const Factory make = [] {
    torch::manual_seed(4);
    return torch::nn::Sequential(
        torch::nn::Functional([](torch::Tensor h) { return h.mul_(2); }),
        torch::nn::Linear(4, 4),
        torch::nn::Tanh(),
        torch::nn::Linear(4, 4));
  };
  const auto original = torch::randn({6, 4});
  const auto y = torch::randn({6, 4});
  auto plain_x = original.clone();
  const auto plain = train_plain(make, plain_x, y);
  EXPECT_TRUE(torch::equal(plain_x, original * 2));
  for (const auto mode : gpipe_test::kCheckpointModes) {
    for (const auto schedule :
         {std::optional<Schedule>(),
          std::optional<Schedule>(Schedule::OneFOneB)}) {
      auto x = original.clone();
      const auto pipe = train_pipe(
          make,
          GPipeOptions(2).microbatches(3).checkpoint(mode),
          x,
          y,
          schedule);
      const auto what = describe(mode, schedule);
      EXPECT_TRUE(torch::equal(x, original * 2)) << what;
      gpipe_test::expect_close(pipe.grads, plain.grads, 1e-6, what);
    }
  }
}

namespace {

/// 4 x (Linear without bias, Dropout(0.5)): linear in x for fixed masks, so
/// ⟨x.grad, x⟩ = ⟨g, y⟩ exactly when backward replays forward's masks.
torch::nn::Sequential make_dropout_stack() {
  torch::manual_seed(13);
  torch::nn::Sequential seq;
  for (int l = 0; l < 4; ++l) {
    seq->push_back(
        torch::nn::Linear(torch::nn::LinearOptions(16, 16).bias(false)));
    seq->push_back(torch::nn::Dropout(0.5));
  }
  // Double precision: the adjoint identity below divides by <g, y>, which
  // cancellation can make small; float32 rounding then looks like a wrong
  // mask. In double a replay error is still O(1), rounding is not.
  seq->to(torch::kDouble);
  return seq;
}

double relative_adjoint_error(
    const torch::Tensor& x,
    const torch::Tensor& y,
    const torch::Tensor& g) {
  const double lhs = (x.grad() * x).sum().item<double>();
  const double rhs = (g * y).sum().item<double>();
  return std::abs(lhs - rhs) / std::max(1e-12, std::abs(rhs));
}

} // namespace

TEST(RealModels, DropoutOnConcurrentLanesIsReplayedExactlyByRecompute) {
  for (int run = 0; run < 6; ++run) {
    for (const auto mode : {Checkpoint::Always, Checkpoint::ExceptLast}) {
      auto seq = make_dropout_stack();
      Pipe pipe(
          seq,
          GPipeOptions(4)
              .microbatches(8)
              .checkpoint(mode)
              .concurrent_cpu_partitions(true));
      const auto x = torch::randn({32, 16}, torch::kDouble).requires_grad_();
      const auto g = torch::randn({32, 16}, torch::kDouble);
      const auto y = pipe(x);
      (y * g).sum().backward();
      EXPECT_LT(relative_adjoint_error(x, y.detach(), g), 1e-4)
          << "forward/backward, run " << run;
    }
  }
}

TEST(RealModels, StepWithDropoutOnConcurrentLanesSatisfiesTheAdjointIdentity) {
  for (int run = 0; run < 6; ++run) {
    for (const auto schedule : {Schedule::FillDrain, Schedule::OneFOneB}) {
      auto seq = make_dropout_stack();
      Pipe pipe(
          seq,
          GPipeOptions(4)
              .microbatches(8)
              .checkpoint(Checkpoint::Always)
              .concurrent_cpu_partitions(true)
              .schedule(schedule)
              .loss_reduction(gpipe::Reduction::Sum));
      const auto x = torch::randn({32, 16}, torch::kDouble).requires_grad_();
      const auto g = torch::randn({32, 16}, torch::kDouble);
      // Linear in x for the drawn masks: loss = ⟨g, y⟩ = ⟨x.grad, x⟩.
      const auto loss = pipe->step(
          x, g, [](const torch::Tensor& out, const torch::Tensor& t) {
            return (out * t).sum();
          });
      const double lhs = (x.grad() * x).sum().item<double>();
      const double rhs = loss.item<double>();
      EXPECT_LT(std::abs(lhs - rhs) / std::abs(rhs), 1e-4)
          << gpipe::to_string(schedule) << ", run " << run;
    }
  }
}

TEST(RealModels, RecomputeLeavesTheGeneratorWherePlainTrainingLeavesIt) {
  const auto x = torch::randn({32, 16}, torch::kDouble);
  torch::manual_seed(99);
  auto plain = make_dropout_stack();
  torch::manual_seed(99);
  plain->forward(x).sum().backward();
  const auto expected = torch::rand({8});
  for (const bool concurrent : {false, true}) {
    for (const auto mode : gpipe_test::kCheckpointModes) {
      auto seq = make_dropout_stack();
      Pipe pipe(
          seq,
          GPipeOptions(4)
              .microbatches(8)
              .checkpoint(mode)
              .concurrent_cpu_partitions(concurrent));
      torch::manual_seed(99);
      pipe(x).sum().backward();
      EXPECT_TRUE(torch::equal(torch::rand({8}), expected))
          << gpipe::to_string(mode) << (concurrent ? " concurrent" : "");
    }
  }
}

TEST(RealModels, AnOutputThatDoesNotRequireGradIsReportedAsPlainTrainingDoes) {
  auto seq = gpipe_test::make_mlp(2, 4, 1);
  seq->push_back(
      torch::nn::Functional([](const torch::Tensor& h) { return h.detach(); }));
  for (const auto mode : gpipe_test::kCheckpointModes) {
    Pipe pipe(seq, GPipeOptions(2).microbatches(3).checkpoint(mode));
    const auto out = pipe(torch::randn({6, 4}));
    EXPECT_FALSE(out.requires_grad()) << gpipe::to_string(mode);
    EXPECT_NE(
        error_of([&] { out.sum().backward(); }).find("does not require grad"),
        std::string::npos);
    const auto message = error_of([&] {
      pipe->step(torch::randn({6, 4}), torch::randn({6, 4}), mse);
    });
    EXPECT_EQ(
        message.rfind(
            "gpipe: the loss of micro-batch 0 does not require grad", 0),
        0u)
        << message;
  }
}

TEST(RealModels, AFrozenParameterAfterForwardIsSkippedAsPlainTrainingDoes) {
  for (const auto mode : gpipe_test::kCheckpointModes) {
    auto seq = gpipe_test::make_mlp(2, 4, 9);
    Pipe pipe(seq, GPipeOptions(2).microbatches(2).checkpoint(mode));
    auto out = pipe(torch::randn({4, 4}));
    seq->ptr(0)->parameters()[0].requires_grad_(false);
    out.sum().backward();
    EXPECT_FALSE(seq->ptr(0)->parameters()[0].grad().defined());
    EXPECT_TRUE(seq->ptr(0)->parameters()[1].grad().defined());
    EXPECT_TRUE(seq->ptr(2)->parameters()[0].grad().defined());
  }
}

} // namespace real_models_test
