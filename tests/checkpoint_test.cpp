// Re-materialization replays randomness exactly, and results never depend on
// the checkpoint mode or on thread timing.
#include "test_support.h"

namespace checkpoint_test {

using gpipe::Checkpoint;
using gpipe::GPipe;
using gpipe::GPipeOptions;
using gpipe_test::clone_of;
using gpipe_test::grads_of;

namespace {

torch::nn::Sequential make_dropout_mlp(uint64_t seed) {
  torch::manual_seed(seed);
  return torch::nn::Sequential(
      torch::nn::Linear(8, 8),
      torch::nn::Dropout(0.5),
      torch::nn::Tanh(),
      torch::nn::Linear(8, 8),
      torch::nn::Dropout(0.3),
      torch::nn::Linear(8, 8));
}

struct StepResult {
  torch::Tensor output;
  std::vector<torch::Tensor> grads;
  torch::Tensor next_random; // what the CPU generator draws after the step
};

StepResult train_step(
    Checkpoint mode,
    int64_t partitions,
    int64_t microbatches) {
  auto seq = make_dropout_mlp(3);
  GPipe<torch::nn::Sequential> pipe(
      seq,
      GPipeOptions(partitions).microbatches(microbatches).checkpoint(mode));
  torch::manual_seed(42);
  const auto x = torch::randn({12, 8});
  auto output = pipe(x);
  output.pow(2).sum().backward();
  return {output.detach(), grads_of(seq->parameters()), torch::rand({4})};
}

} // namespace

TEST(Checkpointing, RecomputeReplaysTheDropoutMaskOfForward) {
  // With one micro-batch the pipe draws the masks exactly as plain training
  // does, so a recompute with a fresh mask would show up as a gradient error.
  auto seq = make_dropout_mlp(5);
  auto plain = clone_of(seq);
  GPipe<torch::nn::Sequential> pipe(
      seq, GPipeOptions(3).microbatches(1).checkpoint(Checkpoint::Always));
  const auto x = torch::randn({6, 8});
  torch::manual_seed(11);
  pipe(x).pow(2).sum().backward();
  torch::manual_seed(11);
  plain->forward(x).pow(2).sum().backward();
  gpipe_test::expect_close(
      grads_of(seq->parameters()), grads_of(plain->parameters()), 1e-6, "grad");
}

TEST(Checkpointing, CheckpointModeNeverChangesResultsWithDropout) {
  const auto never = train_step(Checkpoint::Never, 3, 4);
  for (const auto mode : {Checkpoint::ExceptLast, Checkpoint::Always}) {
    const auto other = train_step(mode, 3, 4);
    EXPECT_TRUE(torch::equal(other.output, never.output))
        << gpipe::to_string(mode);
    gpipe_test::expect_identical(
        other.grads, never.grads, gpipe::to_string(mode));
    EXPECT_TRUE(torch::equal(other.next_random, never.next_random))
        << "recompute must leave the generator where forward left it";
  }
}

TEST(Checkpointing, RepeatedStepsAfterTheSameSeedAreBitIdentical) {
  for (const auto mode :
       {Checkpoint::Never, Checkpoint::ExceptLast, Checkpoint::Always}) {
    const auto first = train_step(mode, 3, 5);
    const auto second = train_step(mode, 3, 5);
    EXPECT_TRUE(torch::equal(first.output, second.output));
    gpipe_test::expect_identical(
        first.grads, second.grads, gpipe::to_string(mode));
  }
}

TEST(Checkpointing, RecomputeRunsUnderGradModeEvenThoughForwardDidNot) {
  // Micro-batch 0's forward keeps a graph just long enough to learn whether
  // the partition's output requires grad; later checkpointed forwards run
  // without one, and every recompute (in reverse order) with one.
  std::vector<bool> grad_mode_seen;
  torch::nn::Sequential seq(
      torch::nn::Linear(3, 3), gpipe_test::layer([&](torch::Tensor x) {
        grad_mode_seen.push_back(torch::GradMode::is_enabled());
        return x * 2;
      }));
  GPipe<torch::nn::Sequential> pipe(
      seq, GPipeOptions(2).microbatches(3).checkpoint(Checkpoint::Always));
  pipe(torch::randn({3, 3})).sum().backward();
  EXPECT_EQ(
      grad_mode_seen,
      (std::vector<bool>{true, false, false, true, true, true}));
}

} // namespace checkpoint_test
