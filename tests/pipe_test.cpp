// Transparency: a pipe trains exactly like the Sequential it wraps.
#include "test_support.h"

namespace pipe_test {

using gpipe::Checkpoint;
using gpipe::GPipe;
using gpipe::GPipeOptions;
using gpipe_test::clone_of;
using gpipe_test::grads_of;
using gpipe_test::make_mlp;
using gpipe_test::max_abs_diff;

namespace {

/// One forward and backward through a pipe and through a plain clone of the
/// same Sequential; outputs, parameter gradients and input gradients agree.
void expect_pipe_trains_like_plain(
    int64_t partitions,
    int64_t microbatches,
    int64_t batch,
    Checkpoint mode) {
  SCOPED_TRACE(
      "partitions " + std::to_string(partitions) + ", microbatches " +
      std::to_string(microbatches) + ", batch " + std::to_string(batch) +
      ", checkpoint " + gpipe::to_string(mode));
  auto seq = make_mlp(
      /*layers=*/5, /*width=*/6, /*seed=*/partitions * 100 + microbatches);
  auto plain = clone_of(seq);
  GPipe<torch::nn::Sequential> pipe(
      seq,
      GPipeOptions(partitions).microbatches(microbatches).checkpoint(mode));

  const auto x = torch::randn({batch, 6});
  const auto target = torch::randn({batch, 6});
  auto x_pipe = x.clone().requires_grad_();
  auto x_plain = x.clone().requires_grad_();

  const auto out_pipe = pipe(x_pipe);
  torch::mse_loss(out_pipe, target).backward();
  const auto out_plain = plain->forward(x_plain);
  torch::mse_loss(out_plain, target).backward();

  EXPECT_LE(max_abs_diff(out_pipe, out_plain), 1e-6);
  gpipe_test::expect_close(
      grads_of(seq->parameters()),
      grads_of(plain->parameters()),
      1e-6,
      "parameter grad");
  EXPECT_LE(max_abs_diff(x_pipe.grad(), x_plain.grad()), 1e-6);
}

void sweep(Checkpoint mode) {
  for (const int64_t partitions : {1, 2, 3, 5}) {
    for (const int64_t microbatches : {1, 2, 4, 5, 8}) {
      // 40 divides by every M here, 7 by none but 1, 3 is smaller than most M.
      for (const int64_t batch : {40, 7, 3}) {
        expect_pipe_trains_like_plain(partitions, microbatches, batch, mode);
      }
    }
  }
}

} // namespace

TEST(GradientEquivalence, NeverCheckpointingMatchesPlainTrainingForEveryShape) {
  sweep(Checkpoint::Never);
}

TEST(
    GradientEquivalence,
    ExceptLastCheckpointingMatchesPlainTrainingForEveryShape) {
  sweep(Checkpoint::ExceptLast);
}

TEST(
    GradientEquivalence,
    AlwaysCheckpointingMatchesPlainTrainingForEveryShape) {
  sweep(Checkpoint::Always);
}

TEST(
    GradientEquivalence,
    SeedNotebookTwoLinearsSplitInTwoMatchWithinOneInHundredThousand) {
  torch::manual_seed(0);
  torch::nn::Sequential seq(
      torch::nn::Linear(10, 10), torch::nn::ReLU(), torch::nn::Linear(10, 10));
  auto plain = clone_of(seq);
  GPipe<torch::nn::Sequential> pipe(seq, GPipeOptions(2).microbatches(4));
  const auto x = torch::randn({16, 10});
  const auto y = torch::randn({16, 10});
  torch::mse_loss(pipe(x), y).backward();
  torch::mse_loss(plain->forward(x), y).backward();
  double difference = 0;
  const auto pipe_parameters = seq->parameters();
  const auto plain_parameters = plain->parameters();
  for (size_t k = 0; k < pipe_parameters.size(); ++k) {
    difference += (pipe_parameters[k].grad() - plain_parameters[k].grad())
                      .norm()
                      .item<double>();
  }
  EXPECT_LT(difference, 1e-5);
}

TEST(GradientEquivalence, SeveralSgdStepsGiveThePlainWeights) {
  auto seq = make_mlp(4, 8, 7);
  auto plain = clone_of(seq);
  GPipe<torch::nn::Sequential> pipe(
      seq, GPipeOptions(3).microbatches(4).checkpoint(Checkpoint::Always));
  torch::optim::SGD pipe_optimizer(
      pipe->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  torch::optim::SGD plain_optimizer(
      plain->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  for (int step = 0; step < 5; ++step) {
    const auto x = torch::randn({10, 8});
    const auto y = torch::randn({10, 8});
    pipe_optimizer.zero_grad();
    torch::mse_loss(pipe(x), y).backward();
    pipe_optimizer.step();
    plain_optimizer.zero_grad();
    torch::mse_loss(plain->forward(x), y).backward();
    plain_optimizer.step();
  }
  gpipe_test::expect_close(
      seq->parameters(), plain->parameters(), 1e-5, "weight");
}

TEST(GradientEquivalence, AutogradGradOnParametersWorksWithCheckpointing) {
  auto seq = make_mlp(3, 5, 3);
  auto plain = clone_of(seq);
  GPipe<torch::nn::Sequential> pipe(
      seq, GPipeOptions(3).microbatches(2).checkpoint(Checkpoint::Always));
  const auto x = torch::randn({6, 5});
  const auto grads =
      torch::autograd::grad({pipe(x).pow(2).sum()}, pipe->parameters());
  const auto expected = torch::autograd::grad(
      {plain->forward(x).pow(2).sum()}, plain->parameters());
  gpipe_test::expect_close(grads, expected, 1e-6, "grad");
  for (const auto& p : seq->parameters()) {
    EXPECT_FALSE(p.grad().defined())
        << "autograd::grad must not accumulate into .grad";
  }
}

TEST(GradientEquivalence, RetainedGraphCanBeBackwardedTwice) {
  for (const auto mode : {Checkpoint::Never, Checkpoint::Always}) {
    auto seq = make_mlp(2, 4, 5);
    auto plain = clone_of(seq);
    GPipe<torch::nn::Sequential> pipe(
        seq, GPipeOptions(2).microbatches(2).checkpoint(mode));
    const auto x = torch::randn({4, 4});
    auto loss = pipe(x).sum();
    loss.backward({}, /*retain_graph=*/true);
    loss.backward();
    auto plain_loss = plain->forward(x).sum();
    plain_loss.backward({}, /*retain_graph=*/true);
    plain_loss.backward();
    gpipe_test::expect_close(
        grads_of(seq->parameters()),
        grads_of(plain->parameters()),
        1e-6,
        "grad");
  }
}

TEST(Pipe, ParametersAreTheSequentialsOwnTensorsInOrder) {
  auto seq = make_mlp(4, 3);
  GPipe<torch::nn::Sequential> pipe(seq, GPipeOptions(3));
  const auto mine = pipe->parameters();
  const auto theirs = seq->parameters();
  ASSERT_EQ(mine.size(), theirs.size());
  for (size_t k = 0; k < mine.size(); ++k) {
    EXPECT_TRUE(mine[k].is_same(theirs[k]));
  }
  EXPECT_TRUE(pipe->named_parameters().contains("4.weight"));
}

TEST(Pipe, LayersAreSplitEvenlyByCountWithoutBalance) {
  auto seq = make_mlp(5, 2); // 10 layers
  GPipe<torch::nn::Sequential> pipe(seq, GPipeOptions(4));
  EXPECT_EQ(pipe->options.balance(), (std::vector<int64_t>{3, 3, 2, 2}));
  ASSERT_EQ(pipe->partitions().size(), 4u);
  EXPECT_EQ(pipe->partitions()[0]->size(), 3u);
  EXPECT_EQ(pipe->partitions()[3]->size(), 2u);
}

TEST(Pipe, BalanceDecidesLayersPerPartition) {
  auto seq = make_mlp(3, 2); // 6 layers
  GPipe<torch::nn::Sequential> pipe(seq, GPipeOptions(3).balance({1, 4, 1}));
  EXPECT_EQ(pipe->partitions()[1]->size(), 4u);
  EXPECT_TRUE(pipe->partitions()[1]->ptr(0).get() == seq->ptr(1).get());
}

TEST(Pipe, PartitionsGoOnTheCpuWhenThereIsNoGpu) {
  if (gpipe_test::cuda_available()) {
    GTEST_SKIP() << "a GPU is present";
  }
  GPipe<torch::nn::Sequential> pipe(make_mlp(2, 2), GPipeOptions(2));
  EXPECT_EQ(
      pipe->options.devices(),
      (std::vector<torch::Device>{torch::kCPU, torch::kCPU}));
}

TEST(Pipe, OutputIsGatheredInOrderForABatchSmallerThanMicrobatches) {
  auto seq = make_mlp(2, 3);
  GPipe<torch::nn::Sequential> pipe(seq, GPipeOptions(2).microbatches(8));
  const auto x = torch::randn({3, 3});
  torch::NoGradGuard no_grad;
  EXPECT_LE(max_abs_diff(pipe(x), seq->forward(x)), 1e-6);
}

TEST(Pipe, ForwardAcceptsExtraDimensionsAfterTheBatch) {
  torch::manual_seed(0);
  torch::nn::Sequential seq(
      torch::nn::Conv1d(2, 3, 3), torch::nn::ReLU(), torch::nn::Flatten());
  auto plain = clone_of(seq);
  GPipe<torch::nn::Sequential> pipe(seq, GPipeOptions(2).microbatches(3));
  const auto x = torch::randn({5, 2, 7});
  EXPECT_LE(max_abs_diff(pipe(x), plain->forward(x)), 1e-6);
}

TEST(Pipe, EvalRunsWithoutDropoutAndWithoutRecompute) {
  int calls = 0;
  torch::manual_seed(0);
  torch::nn::Sequential seq(
      torch::nn::Linear(4, 4),
      torch::nn::Dropout(0.5),
      gpipe_test::layer([&calls](torch::Tensor x) {
        ++calls;
        return x;
      }),
      torch::nn::Linear(4, 4));
  auto plain = clone_of(seq);
  GPipe<torch::nn::Sequential> pipe(
      seq, GPipeOptions(2).microbatches(4).checkpoint(Checkpoint::Always));
  pipe->eval();
  plain->eval();
  EXPECT_FALSE(seq->ptr(1)->is_training());
  const auto x = torch::randn({8, 4});
  const auto out = pipe(x);
  EXPECT_LE(max_abs_diff(out, plain->forward(x)), 1e-6);
  out.sum().backward();
  EXPECT_EQ(calls, 4 + 1)
      << "four micro-batches, then one plain call, no recompute";
  pipe->train();
  EXPECT_TRUE(seq->ptr(1)->is_training());
}

TEST(Pipe, NoGradGuardBuildsNoGraphAndDoesNotRecompute) {
  int calls = 0;
  torch::nn::Sequential seq(
      torch::nn::Linear(4, 4), gpipe_test::layer([&calls](torch::Tensor x) {
        ++calls;
        return x;
      }));
  GPipe<torch::nn::Sequential> pipe(
      seq, GPipeOptions(2).microbatches(4).checkpoint(Checkpoint::Always));
  torch::NoGradGuard no_grad;
  const auto out = pipe(torch::randn({8, 4}));
  EXPECT_FALSE(out.requires_grad());
  EXPECT_EQ(calls, 4);
}

TEST(Pipe, CheckpointModeDecidesWhichMicrobatchesRecompute) {
  const std::vector<std::pair<Checkpoint, int>> expected = {
      {Checkpoint::Never, 5},
      {Checkpoint::ExceptLast, 5 + 4},
      {Checkpoint::Always, 5 + 5}};
  for (const auto& [mode, calls_expected] : expected) {
    int calls = 0;
    torch::nn::Sequential seq(
        torch::nn::Linear(4, 4), gpipe_test::layer([&calls](torch::Tensor x) {
          ++calls;
          return x;
        }));
    GPipe<torch::nn::Sequential> pipe(
        seq, GPipeOptions(2).microbatches(8).checkpoint(mode));
    // A batch of 5 in 8 micro-batches makes 5: the actual last one is #4.
    pipe(torch::randn({5, 4})).sum().backward();
    EXPECT_EQ(calls, calls_expected) << gpipe::to_string(mode);
  }
}

TEST(Pipe, CheckpointingWorksWhenTheInputDoesNotRequireGrad) {
  auto seq = make_mlp(2, 4, 9);
  auto plain = clone_of(seq);
  GPipe<torch::nn::Sequential> pipe(
      seq, GPipeOptions(2).microbatches(2).checkpoint(Checkpoint::Always));
  const auto x = torch::randn({4, 4});
  ASSERT_FALSE(x.requires_grad());
  pipe(x).sum().backward();
  plain->forward(x).sum().backward();
  gpipe_test::expect_close(
      grads_of(seq->parameters()), grads_of(plain->parameters()), 1e-6, "grad");
}

TEST(Pipe, FrozenParametersGetNoGradient) {
  auto seq = make_mlp(2, 4, 9);
  seq->ptr(0)->parameters()[0].requires_grad_(false);
  GPipe<torch::nn::Sequential> pipe(
      seq, GPipeOptions(2).microbatches(2).checkpoint(Checkpoint::Always));
  pipe(torch::randn({4, 4})).sum().backward();
  EXPECT_FALSE(seq->ptr(0)->parameters()[0].grad().defined());
  EXPECT_TRUE(seq->ptr(0)->parameters()[1].grad().defined());
}

TEST(Pipe, ToTheDeviceItIsOnIsANoOpAndToADtypeConvertsInPlace) {
  GPipe<torch::nn::Sequential> pipe(
      make_mlp(2, 2), GPipeOptions(2).devices({torch::kCPU, torch::kCPU}));
  pipe->to(torch::kCPU);
  EXPECT_EQ(
      pipe->options.devices(),
      (std::vector<torch::Device>{torch::kCPU, torch::kCPU}));
  pipe->to(torch::kFloat64);
  EXPECT_EQ(pipe->parameters()[0].scalar_type(), torch::kFloat64);
  EXPECT_EQ(
      pipe(torch::randn({2, 2}, torch::kFloat64)).scalar_type(),
      torch::kFloat64);
}

TEST(Pipe, PrettyPrintShowsTheResolvedOptions) {
  GPipe<torch::nn::Sequential> pipe(
      make_mlp(2, 2),
      GPipeOptions(2).microbatches(4).devices({torch::kCPU, torch::kCPU}));
  std::ostringstream stream;
  pipe->pretty_print(stream);
  EXPECT_EQ(
      stream.str(),
      "gpipe::GPipe(partitions=2, microbatches=4, checkpoint=except_last, balance=[2, 2], devices=[cpu, cpu])");
}

} // namespace pipe_test
