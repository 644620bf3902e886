// BatchNorm under micro-batching and re-materialization: recompute never
// updates a buffer a second time, and Deferred BatchNorm commits the whole
// batch's statistics once per call, as plain training of that batch does.
#include "test_support.h"

namespace batch_norm_test {

using gpipe::Checkpoint;
using gpipe::GPipe;
using gpipe::GPipeOptions;
using gpipe::Schedule;

namespace {

using Pipe = GPipe<torch::nn::Sequential>;

/// A user's module with a BatchNorm inside and a buffer of its own that its
/// forward bumps: both must move once per real forward.
struct ConvBlockImpl : torch::nn::Module {
  explicit ConvBlockImpl(int64_t channels)
      : conv(register_module(
            "conv",
            torch::nn::Conv2d(
                torch::nn::Conv2dOptions(channels, channels, 3).padding(1)))),
        norm(register_module("norm", torch::nn::BatchNorm2d(channels))) {
    calls = register_buffer("calls", torch::zeros({1}));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    if (is_training()) {
      calls.add_(1);
    }
    return torch::relu(norm(conv(x)));
  }
  torch::nn::Conv2d conv;
  torch::nn::BatchNorm2d norm;
  torch::Tensor calls;
};
TORCH_MODULE(ConvBlock);

/// A small CNN: conv + BatchNorm first (its input is the same in plain and
/// pipe training), a user's block with a nested BatchNorm, a head.
torch::nn::Sequential make_cnn(
    std::optional<double> momentum = 0.1,
    uint64_t seed = 21) {
  torch::manual_seed(seed);
  return torch::nn::Sequential(
      torch::nn::Conv2d(torch::nn::Conv2dOptions(3, 4, 3).padding(1)),
      torch::nn::BatchNorm2d(torch::nn::BatchNormOptions(4).momentum(momentum)),
      torch::nn::ReLU(),
      ConvBlock(4),
      torch::nn::Flatten(),
      torch::nn::Linear(4 * 6 * 6, 5));
}

std::vector<torch::Tensor> buffers_of(const torch::nn::Sequential& seq) {
  std::vector<torch::Tensor> buffers;
  for (const auto& b : seq->buffers()) {
    buffers.push_back(b.clone());
  }
  return buffers;
}

std::shared_ptr<torch::nn::BatchNorm2dImpl> norm_at(
    const torch::nn::Sequential& seq,
    size_t index) {
  return std::dynamic_pointer_cast<torch::nn::BatchNorm2dImpl>(seq->ptr(index));
}

torch::Tensor mse(const torch::Tensor& out, const torch::Tensor& target) {
  return torch::mse_loss(out, target);
}

} // namespace

TEST(BatchNorm, RecomputeNeverUpdatesRunningStatisticsOrBuffersASecondTime) {
  const auto x = torch::randn({8, 3, 6, 6});
  const auto y = torch::randn({8, 5});
  // The reference: plain training of each micro-batch in turn, which is
  // what an undeferred BatchNorm in a pipe sees.
  auto plain = make_cnn();
  for (const auto& piece : torch::tensor_split(x, 4)) {
    plain->forward(piece);
  }
  const auto expected = buffers_of(plain);
  for (const auto mode : gpipe_test::kCheckpointModes) {
    for (const bool use_step : {false, true}) {
      auto seq = make_cnn();
      Pipe pipe(seq, GPipeOptions(2).microbatches(4).checkpoint(mode));
      if (use_step) {
        pipe->step(x, y, mse);
      } else {
        mse(pipe(x), y).backward();
      }
      gpipe_test::expect_close(
          buffers_of(seq),
          expected,
          1e-6,
          std::string(gpipe::to_string(mode)) + (use_step ? " step" : ""));
    }
  }
}

TEST(BatchNorm, DeferredRunningStatisticsEqualPlainTrainingOfTheWholeBatch) {
  const auto x = torch::randn({10, 3, 6, 6});
  const auto y = torch::randn({10, 5});
  for (const auto momentum :
       {std::optional<double>(0.1), std::optional<double>()}) {
    auto plain = make_cnn(momentum);
    mse(plain->forward(x), y).backward();
    const auto* plain_norm = norm_at(plain, 1).get();
    for (const auto mode : gpipe_test::kCheckpointModes) {
      for (const auto schedule : gpipe_test::kForwardAndEverySchedule) {
        if (!gpipe_test::runs_on(schedule, 3)) {
          continue;
        }
        auto seq = make_cnn(momentum);
        Pipe pipe(
            seq,
            GPipeOptions(3)
                .microbatches(4)
                .checkpoint(mode)
                .deferred_batch_norm(true));
        if (schedule) {
          pipe->options.schedule(*schedule);
          pipe->step(x, y, mse);
        } else {
          mse(pipe(x), y).backward();
        }
        const auto* norm = norm_at(seq, 1).get();
        const std::string what = std::string(gpipe::to_string(mode)) + " " +
            (schedule ? gpipe::to_string(*schedule) : "forward") +
            (momentum ? "" : " cumulative");
        gpipe_test::expect_close(
            std::vector<torch::Tensor>{norm->running_mean, norm->running_var},
            {plain_norm->running_mean, plain_norm->running_var},
            1e-6,
            what);
        EXPECT_EQ(norm->num_batches_tracked.item<int64_t>(), 1) << what;
        // The nested BatchNorm counts one step too; the user's own buffer
        // counts real forwards only (4 micro-batches), never recomputes.
        const auto block =
            std::dynamic_pointer_cast<ConvBlockImpl>(seq->ptr(3));
        EXPECT_EQ(block->norm->num_batches_tracked.item<int64_t>(), 1) << what;
        EXPECT_EQ(block->calls.item<float>(), 4.0f) << what;
      }
    }
  }
}

TEST(BatchNorm, DeferredStatisticsAdvanceOncePerStepOverSeveralSteps) {
  auto seq = make_cnn();
  Pipe pipe(
      seq,
      GPipeOptions(2).microbatches(3).deferred_batch_norm(true).schedule(
          Schedule::OneFOneB));
  for (int step = 0; step < 3; ++step) {
    pipe->step(torch::randn({7, 3, 6, 6}), torch::randn({7, 5}), mse);
  }
  EXPECT_EQ(norm_at(seq, 1).get()->num_batches_tracked.item<int64_t>(), 3);
}

TEST(BatchNorm, DeferredStatisticsAreUntouchedByACallThatFails) {
  auto seq = make_cnn();
  seq->push_back(torch::nn::Functional([](const torch::Tensor& h) {
    TORCH_CHECK(h.size(0) != 1, "no single rows");
    return h;
  }));
  Pipe pipe(seq, GPipeOptions(2).microbatches(4).deferred_batch_norm(true));
  const auto before = buffers_of(seq);
  EXPECT_THROW(pipe(torch::randn({7, 3, 6, 6})), c10::Error);
  // The user's own buffer counted the forwards that ran; BatchNorm's
  // statistics are exactly as before the call.
  const auto after = buffers_of(seq);
  const auto* norm = norm_at(seq, 1).get();
  EXPECT_TRUE(torch::equal(norm->running_mean, before[0]));
  EXPECT_TRUE(torch::equal(norm->running_var, before[1]));
  EXPECT_EQ(norm->num_batches_tracked.item<int64_t>(), 0);
  (void)after;
}

TEST(BatchNorm, EvalOutputAfterDeferredTrainingMatchesPlainForTheFirstNorm) {
  // One forward in training, then eval: the first BatchNorm's statistics
  // (and so the eval output up to it) equal plain training's.
  const auto x = torch::randn({12, 3, 6, 6});
  auto plain = make_cnn();
  plain->forward(x);
  plain->eval();
  auto seq = make_cnn();
  Pipe pipe(seq, GPipeOptions(2).microbatches(4).deferred_batch_norm(true));
  pipe(x);
  pipe->eval();
  torch::nn::Sequential head_plain(
      plain->ptr<torch::nn::Conv2dImpl>(0),
      torch::nn::BatchNorm2d(norm_at(plain, 1)));
  torch::nn::Sequential head_pipe(
      seq->ptr<torch::nn::Conv2dImpl>(0),
      torch::nn::BatchNorm2d(norm_at(seq, 1)));
  const auto probe = torch::randn({4, 3, 6, 6});
  gpipe_test::expect_close(
      {head_pipe->forward(probe)}, {head_plain->forward(probe)}, 1e-6, "eval");
}

} // namespace batch_norm_test
