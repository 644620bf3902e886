// Every bad input gets a clear error; a failing stage never hangs the pipe.
#include "test_support.h"

#include <atomic>

namespace errors_test {

using gpipe::Checkpoint;
using gpipe::GPipe;
using gpipe::GPipeOptions;
using gpipe_test::error_of;
using gpipe_test::make_mlp;
using Pipe = GPipe<torch::nn::Sequential>;

TEST(BadInput, ZeroPartitionsIsRejected) {
  EXPECT_EQ(
      error_of([] { Pipe(make_mlp(2, 2), GPipeOptions(0)); }),
      "gpipe: partitions must be at least 1 (partitions: 0)");
}

TEST(BadInput, MorePartitionsThanLayersIsRejected) {
  EXPECT_EQ(
      error_of([] { Pipe(make_mlp(2, 2), GPipeOptions(5)); }),
      "gpipe: more partitions than layers (partitions: 5, layers: 4)");
}

TEST(BadInput, ZeroMicrobatchesIsRejected) {
  EXPECT_EQ(
      error_of([] { Pipe(make_mlp(2, 2), GPipeOptions(2).microbatches(0)); }),
      "gpipe: microbatches must be at least 1 (microbatches: 0)");
}

TEST(BadInput, BalanceOfTheWrongLengthIsRejected) {
  EXPECT_EQ(
      error_of([] {
        Pipe(make_mlp(2, 2), GPipeOptions(2).balance({1, 1, 2}));
      }),
      "gpipe: balance and partitions have different lengths (balance: 3, partitions: 2)\nchoose a balance from measured costs with <gpipe/balance.h> (gpipe::balance_by_time, gpipe::balance_by_memory)");
}

TEST(BadInput, BalanceWithAnEmptyPartitionIsRejected) {
  EXPECT_EQ(
      error_of([] {
        Pipe(make_mlp(2, 2), GPipeOptions(2).balance({4, 0}));
      }),
      "gpipe: every partition needs at least one layer (balance[1]: 0)\nchoose a balance from measured costs with <gpipe/balance.h> (gpipe::balance_by_time, gpipe::balance_by_memory)");
}

TEST(BadInput, BalanceThatDoesNotSumToTheLayersIsRejected) {
  EXPECT_EQ(
      error_of([] {
        Pipe(make_mlp(2, 2), GPipeOptions(2).balance({1, 2}));
      }),
      "gpipe: balance does not sum to the number of layers (sum of balance: 3, layers: 4)\nchoose a balance from measured costs with <gpipe/balance.h> (gpipe::balance_by_time, gpipe::balance_by_memory)");
}

TEST(BadInput, FewerDevicesThanPartitionsIsRejected) {
  EXPECT_EQ(
      error_of([] {
        Pipe(
            make_mlp(2, 2),
            GPipeOptions(3).devices({torch::kCPU, torch::kCPU}));
      }),
      "gpipe: fewer devices than partitions (devices: 2, partitions: 3)");
}

TEST(BadInput, AnEmptySequentialIsRejected) {
  EXPECT_EQ(
      error_of([] { Pipe(torch::nn::Sequential(), GPipeOptions(1)); }),
      "gpipe: cannot pipeline an empty Sequential (layers: 0)");
}

TEST(BadInput, AnUnavailableCudaDeviceIsRejected) {
  if (gpipe_test::cuda_available()) {
    GTEST_SKIP() << "a GPU is present";
  }
  EXPECT_EQ(
      error_of([] {
        Pipe(
            make_mlp(2, 2),
            GPipeOptions(2).devices({torch::kCPU, torch::Device("cuda:0")}));
      }),
      "gpipe: device cuda:0 asked for, but no CUDA device is available");
}

TEST(BadInput, AnInputWithoutBatchDimensionIsRejected) {
  Pipe pipe(make_mlp(2, 2), GPipeOptions(2));
  EXPECT_EQ(
      error_of([&] { pipe(torch::tensor(1.0)); }),
      "gpipe: input has no batch dimension (input shape: [])");
}

TEST(BadInput, AnEmptyBatchIsRejected) {
  Pipe pipe(make_mlp(2, 2), GPipeOptions(2));
  EXPECT_EQ(
      error_of([&] {
        pipe(torch::randn({0, 2}));
      }),
      "gpipe: input has an empty batch (input shape: [0, 2])");
}

TEST(BadInput, AShapeErrorInsideAStageNamesThePartition) {
  // A c10::Error keeps its own message first and gets the cell as context.
  torch::nn::Sequential seq(torch::nn::Linear(4, 3), torch::nn::Linear(4, 2));
  Pipe pipe(seq, GPipeOptions(2).microbatches(2));
  const auto message = error_of([&] { pipe(torch::randn({4, 4})); });
  EXPECT_NE(
      message.find("(gpipe: partition 1 failed on micro-batch 0 in forward)"),
      std::string::npos)
      << message;
  EXPECT_NE(
      message.find("mat1 and mat2 shapes cannot be multiplied"),
      std::string::npos)
      << message;
}

namespace {

/// A layer that throws in forward on its n-th call, or in backward on the
/// micro-batch with a given number of rows, once armed.
struct Saboteur {
  std::atomic<int> fail_forward_on{-1};
  std::atomic<int> fail_backward_rows{-1};
  std::atomic<int> seen{0};

  torch::nn::Functional layer() {
    return gpipe_test::layer([this](torch::Tensor x) {
      const int index = seen++;
      if (index == fail_forward_on) {
        throw std::runtime_error("saboteur struck in forward");
      }
      if (x.requires_grad() && x.size(0) == fail_backward_rows) {
        x = x.clone();
        x.register_hook([](torch::Tensor g) -> torch::Tensor {
          throw std::runtime_error("saboteur struck in backward");
        });
      }
      return x;
    });
  }
};

} // namespace

TEST(
    Faults,
    AnExceptionInForwardReachesTheCallerWithItsCellAndThePipeStaysUsable) {
  Saboteur saboteur;
  torch::nn::Sequential seq(
      torch::nn::Linear(3, 3), saboteur.layer(), torch::nn::Linear(3, 3));
  Pipe pipe(seq, GPipeOptions(2).microbatches(4));
  saboteur.fail_forward_on = 2;
  // The user's exception reaches the caller as itself, its cell recorded
  // beside it (Note [Exceptions keep their type]).
  const auto failure = gpipe_test::failure_of([&] {
    pipe(torch::randn({8, 3}));
  });
  EXPECT_EQ(failure.type, "std::runtime_error");
  EXPECT_EQ(failure.message, "saboteur struck in forward");
  EXPECT_EQ(failure.cell, "partition 0, micro-batch 2, forward");
  saboteur.fail_forward_on = -1;
  pipe(torch::randn({8, 3})).sum().backward();
  EXPECT_TRUE(seq->parameters()[0].grad().defined());
}

namespace {

/// A partition that throws in backward on micro-batch 3 reaches the caller
/// with its cell, and the pipe works on the next call.
void expect_backward_failure_reported_and_recovered(Checkpoint mode) {
  Saboteur saboteur;
  torch::nn::Sequential seq(
      torch::nn::Linear(3, 3), torch::nn::Linear(3, 3), saboteur.layer());
  Pipe pipe(seq, GPipeOptions(2).microbatches(4).checkpoint(mode));
  // A batch of 7 in 4 micro-batches has rows 2, 2, 2, 1: only #3 has one.
  saboteur.fail_backward_rows = 1;
  const auto failure = gpipe_test::failure_of([&] {
    pipe(torch::randn({7, 3})).sum().backward();
  });
  EXPECT_EQ(failure.type, "std::runtime_error");
  EXPECT_EQ(failure.message, "saboteur struck in backward");
  EXPECT_EQ(failure.cell, "partition 1, micro-batch 3, backward");
  saboteur.fail_backward_rows = -1;
  pipe(torch::randn({8, 3})).sum().backward();
}

} // namespace

TEST(
    Faults,
    AnExceptionInBackwardReachesTheCallerWithItsCellAndThePipeStaysUsable) {
  expect_backward_failure_reported_and_recovered(Checkpoint::Never);
}

// Known issue: LeakSanitizer sees the step's graph (about 54 KB) never freed
// when a hook throws inside a recomputed graph; the ASan preset leaves this
// test out until it is fixed (see README, Development).
TEST(
    Faults,
    AnExceptionInACheckpointedBackwardReachesTheCallerAndThePipeStaysUsable) {
  expect_backward_failure_reported_and_recovered(Checkpoint::Always);
}

TEST(Faults, DoubleBackwardIsRejectedClearly) {
  Pipe pipe(make_mlp(2, 3), GPipeOptions(2));
  const auto x = torch::randn({2, 3}, torch::requires_grad());
  const auto out = pipe(x).pow(2).sum();
  EXPECT_EQ(
      error_of([&] {
        torch::autograd::grad(
            {out}, {x}, {}, /*retain_graph=*/true, /*create_graph=*/true);
      }),
      "gpipe: double backward through a pipe is not supported (call backward without create_graph=true)");
}

} // namespace errors_test
