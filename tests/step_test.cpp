// step(): forward and backward of a whole batch on a schedule, with exact
// loss scaling, equal to plain training.
#include "test_support.h"

#include <gpipe/memory.h>

namespace step_test {

using gpipe::Checkpoint;
using gpipe::GPipe;
using gpipe::GPipeOptions;
using gpipe::Reduction;
using gpipe::Schedule;
using gpipe_test::clone_of;
using gpipe_test::error_of;
using gpipe_test::grads_of;
using gpipe_test::make_mlp;
using gpipe_test::max_abs_diff;
using Pipe = GPipe<torch::nn::Sequential>;

namespace {

torch::Tensor mse(
    const torch::Tensor& output,
    const torch::Tensor& target,
    Reduction reduction) {
  return torch::mse_loss(
      output,
      target,
      reduction == Reduction::Mean ? torch::Reduction::Mean
                                   : torch::Reduction::Sum);
}

void expect_step_trains_like_plain(
    Schedule schedule,
    int64_t partitions,
    int64_t microbatches,
    int64_t batch,
    Reduction reduction,
    Checkpoint mode) {
  SCOPED_TRACE(
      std::string(gpipe::to_string(schedule)) + ", partitions " +
      std::to_string(partitions) + ", microbatches " +
      std::to_string(microbatches) + ", batch " + std::to_string(batch) + ", " +
      gpipe::to_string(reduction) + ", checkpoint " + gpipe::to_string(mode));
  auto seq =
      make_mlp(4, 5, static_cast<uint64_t>(partitions * 10 + microbatches));
  auto plain = clone_of(seq);
  Pipe pipe(
      seq,
      GPipeOptions(partitions)
          .microbatches(microbatches)
          .checkpoint(mode)
          .schedule(schedule)
          .loss_reduction(reduction));
  const auto x = torch::randn({batch, 5});
  const auto target = torch::randn({batch, 5});
  auto x_pipe = x.clone().requires_grad_();
  auto x_plain = x.clone().requires_grad_();

  const auto loss = pipe->step(
      x_pipe,
      target,
      [reduction](const torch::Tensor& out, const torch::Tensor& y) {
        return mse(out, y, reduction);
      });
  const auto plain_loss = mse(plain->forward(x_plain), target, reduction);
  plain_loss.backward();

  EXPECT_FALSE(loss.requires_grad());
  EXPECT_NEAR(
      loss.item<double>(),
      plain_loss.item<double>(),
      1e-6 * std::max(1.0, std::abs(plain_loss.item<double>())));
  gpipe_test::expect_close(
      grads_of(seq->parameters()),
      grads_of(plain->parameters()),
      1e-6,
      "parameter grad");
  gpipe_test::expect_close(
      {x_pipe.grad()}, {x_plain.grad()}, 1e-6, "input grad");
}

} // namespace

TEST(Step, FillDrainMatchesPlainTrainingForEveryShapeReductionAndMode) {
  for (const int64_t partitions : {1, 2, 3, 4}) {
    for (const int64_t microbatches : {1, 3, 4, 8}) {
      for (const int64_t batch : {16, 7}) {
        for (const auto reduction : {Reduction::Mean, Reduction::Sum}) {
          for (const auto mode :
               {Checkpoint::Never,
                Checkpoint::ExceptLast,
                Checkpoint::Always}) {
            expect_step_trains_like_plain(
                Schedule::FillDrain,
                partitions,
                microbatches,
                batch,
                reduction,
                mode);
          }
        }
      }
    }
  }
}

TEST(Step, OneFOneBMatchesPlainTrainingForEveryShapeReductionAndMode) {
  for (const int64_t partitions : {1, 2, 3, 4}) {
    for (const int64_t microbatches : {1, 3, 4, 8}) {
      for (const int64_t batch : {16, 7}) {
        for (const auto reduction : {Reduction::Mean, Reduction::Sum}) {
          for (const auto mode :
               {Checkpoint::Never,
                Checkpoint::ExceptLast,
                Checkpoint::Always}) {
            expect_step_trains_like_plain(
                Schedule::OneFOneB,
                partitions,
                microbatches,
                batch,
                reduction,
                mode);
          }
        }
      }
    }
  }
}

TEST(Step, MeanOverUnevenMicrobatchesWeighsEachByItsShare) {
  // Micro-batches of 3, 2 and 2 rows: dividing by the number of micro-batches
  // (as torch.distributed.pipelining does) would be off here.
  auto seq = make_mlp(2, 3, 1);
  auto plain = clone_of(seq);
  Pipe pipe(seq, GPipeOptions(2).microbatches(3));
  const auto x = torch::randn({7, 3});
  const auto y = torch::randn({7, 3});
  const auto loss = pipe->step(x, y, [](const auto& out, const auto& t) {
    return torch::mse_loss(out, t);
  });
  EXPECT_NEAR(
      loss.item<double>(),
      torch::mse_loss(plain->forward(x), y).item<double>(),
      1e-6);
}

TEST(Step, GradientsAccumulateAcrossStepsLikeBackward) {
  auto seq = make_mlp(2, 3, 2);
  auto plain = clone_of(seq);
  Pipe pipe(seq, GPipeOptions(2).microbatches(2).schedule(Schedule::OneFOneB));
  auto loss_fn = [](const torch::Tensor& out, const torch::Tensor& y) {
    return torch::mse_loss(out, y);
  };
  for (int k = 0; k < 2; ++k) {
    const auto x = torch::randn({4, 3});
    const auto y = torch::randn({4, 3});
    pipe->step(x, y, loss_fn);
    loss_fn(plain->forward(x), y).backward();
  }
  gpipe_test::expect_close(
      grads_of(seq->parameters()), grads_of(plain->parameters()), 1e-6, "grad");
}

TEST(Step, DropoutStepsAreBitIdenticalOnRepeatAndAcrossCheckpointModes) {
  auto run = [](Schedule schedule, Checkpoint mode) {
    torch::manual_seed(1);
    torch::nn::Sequential seq(
        torch::nn::Linear(6, 6),
        torch::nn::Dropout(0.5),
        torch::nn::Linear(6, 6),
        torch::nn::Dropout(0.5));
    Pipe pipe(
        seq,
        GPipeOptions(2).microbatches(3).schedule(schedule).checkpoint(mode));
    torch::manual_seed(2);
    const auto x = torch::randn({9, 6});
    const auto loss =
        pipe->step(x, torch::zeros({9, 6}), [](const auto& out, const auto& y) {
          return torch::mse_loss(out, y);
        });
    auto grads = grads_of(seq->parameters());
    grads.push_back(loss);
    return grads;
  };
  // The schedules differ from each other (on one CPU generator the forwards
  // of different partitions draw in another order), but never from
  // themselves, and recompute replays the masks exactly.
  for (const auto schedule : {Schedule::FillDrain, Schedule::OneFOneB}) {
    const auto reference = run(schedule, Checkpoint::Never);
    gpipe_test::expect_identical(
        run(schedule, Checkpoint::Never), reference, "repeat");
    gpipe_test::expect_identical(
        run(schedule, Checkpoint::ExceptLast), reference, "except_last");
    gpipe_test::expect_identical(
        run(schedule, Checkpoint::Always), reference, "always");
  }
}

TEST(Step, TimelineSeesEveryForwardAndBackward) {
  auto timeline = std::make_shared<gpipe::Timeline>();
  Pipe pipe(
      make_mlp(3, 4),
      GPipeOptions(3)
          .microbatches(4)
          .schedule(Schedule::OneFOneB)
          .checkpoint(Checkpoint::Never));
  pipe->set_timeline(timeline);
  pipe->step(
      torch::randn({8, 4}),
      torch::randn({8, 4}),
      [](const auto& out, const auto& y) { return torch::mse_loss(out, y); });
  std::map<gpipe::Phase, int> count;
  for (const auto& event : timeline->events()) {
    ++count[event.phase];
  }
  EXPECT_EQ(count[gpipe::Phase::Forward], 12);
  EXPECT_EQ(count[gpipe::Phase::Backward], 12);
  EXPECT_EQ(count[gpipe::Phase::Recompute], 0);
}

TEST(Step, ATargetOfAnotherBatchSizeIsRejected) {
  Pipe pipe(make_mlp(2, 3), GPipeOptions(2));
  EXPECT_EQ(
      error_of([&] {
        pipe->step(
            torch::randn({8, 3}),
            torch::randn({7, 3}),
            [](const auto& out, const auto& y) {
              return torch::mse_loss(out, y);
            });
      }),
      "gpipe: target and input have different batch sizes (input: 8, target: 7)");
}

TEST(Step, ALossThatIsNotAScalarIsRejected) {
  Pipe pipe(make_mlp(2, 3), GPipeOptions(2).microbatches(2));
  EXPECT_EQ(
      error_of([&] {
        pipe->step(
            torch::randn({4, 3}),
            torch::randn({4, 3}),
            [](const auto& out, const auto& y) { return out - y; });
      }),
      "gpipe: loss_fn must return a scalar (micro-batch 0, loss shape: [2, 3])");
}

TEST(Step, StepUnderNoGradGuardIsRejected) {
  Pipe pipe(make_mlp(2, 3), GPipeOptions(2));
  torch::NoGradGuard no_grad;
  EXPECT_EQ(
      error_of([&] {
        pipe->step(
            torch::randn({4, 3}),
            torch::randn({4, 3}),
            [](const auto& out, const auto& y) {
              return torch::mse_loss(out, y);
            });
      }),
      "gpipe: step runs backward and cannot run with grad mode disabled (use forward under NoGradGuard)");
}

TEST(Step, AFailingLossLeavesThePipeUsable) {
  auto seq = make_mlp(2, 3);
  Pipe pipe(seq, GPipeOptions(2).microbatches(2).schedule(Schedule::OneFOneB));
  bool fail = true;
  auto loss_fn = [&fail](const torch::Tensor& out, const torch::Tensor& y) {
    if (fail) {
      throw std::runtime_error("bad loss");
    }
    return torch::mse_loss(out, y);
  };
  const auto failure = gpipe_test::failure_of([&] {
    pipe->step(torch::randn({4, 3}), torch::randn({4, 3}), loss_fn);
  });
  EXPECT_EQ(failure.type, "std::runtime_error");
  EXPECT_EQ(failure.message, "bad loss");
  EXPECT_EQ(failure.cell, "partition 1, micro-batch 0, loss_fn");
  fail = false;
  EXPECT_TRUE(pipe->step(torch::randn({4, 3}), torch::randn({4, 3}), loss_fn)
                  .defined());
}

TEST(Step, OneFOneBKeepsAThirdOfFillDrainsActivationsAtSixteenMicrobatches) {
  // The configuration: 32 x (Linear(256, 256), Tanh), batch 1024,
  // K=4, M=16, no checkpointing, measured exactly by the counting allocator.
  // The ideal ratio is K/M = 0.25; the bound leaves room for what is not
  // per micro-batch (the input, the target, the gradient buffers in flight).
  gpipe::track_cpu_memory();
  auto activation_peak = [](Schedule schedule) {
    torch::manual_seed(0);
    torch::nn::Sequential seq;
    for (int l = 0; l < 32; ++l) {
      seq->push_back(torch::nn::Linear(256, 256));
      seq->push_back(torch::nn::Tanh());
    }
    Pipe pipe(
        seq,
        GPipeOptions(4)
            .microbatches(16)
            .checkpoint(Checkpoint::Never)
            .schedule(schedule));
    for (auto& p : seq->parameters()) {
      p.mutable_grad() = torch::zeros_like(p);
    }
    const auto x = torch::randn({1024, 256});
    const auto y = torch::randn({1024, 256});
    gpipe::MemoryMeter meter({torch::kCPU});
    pipe->step(x, y, [](const auto& out, const auto& t) {
      return torch::mse_loss(out, t);
    });
    return meter.peak_increase_bytes(torch::kCPU);
  };
  const auto fill_drain = activation_peak(Schedule::FillDrain);
  const auto one_f_one_b = activation_peak(Schedule::OneFOneB);
  std::cout << "activation peak: fill_drain " << fill_drain << " B, 1f1b "
            << one_f_one_b << " B, ratio "
            << static_cast<double>(one_f_one_b) /
          static_cast<double>(fill_drain)
            << std::endl;
  // Fill-drain keeps every micro-batch's saved tensors: at least one 1 MiB
  // tensor per layer pair (each Tanh output, which is also the next Linear's
  // saved input).
  EXPECT_GT(fill_drain, 32 * (1 << 20));
  EXPECT_LE(
      static_cast<double>(one_f_one_b), 0.35 * static_cast<double>(fill_drain))
      << "fill_drain " << fill_drain << " B, 1f1b " << one_f_one_b << " B";
}

} // namespace step_test
