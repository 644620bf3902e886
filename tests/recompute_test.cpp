// A module can tell a checkpointed forward and its recompute apart, so side
// effects happen once; and a pipe answers size(), [] and iteration like the
// Sequential it wraps.
#include "test_support.h"

#include <atomic>

namespace recompute_test {

using gpipe::Checkpoint;
using gpipe::GPipe;
using gpipe::GPipeOptions;
using gpipe_test::error_of;

namespace {

using Pipe = GPipe<torch::nn::Sequential>;

/// Identity that counts its real forwards, its checkpointing forwards and
/// its recomputes (cells of several lanes may call it at once).
struct CountingImpl : torch::nn::Module {
  torch::Tensor forward(const torch::Tensor& x) {
    if (!gpipe::is_recomputing()) {
      ++seen;
    } else {
      ++recomputes;
    }
    if (gpipe::is_checkpointing()) {
      ++checkpointing;
    }
    EXPECT_FALSE(gpipe::is_checkpointing() && gpipe::is_recomputing());
    return x;
  }
  std::atomic<int> seen{0};
  std::atomic<int> checkpointing{0};
  std::atomic<int> recomputes{0};
};
TORCH_MODULE(Counting);

struct Counted {
  torch::nn::Sequential seq;
  Counting first;
  Counting last;
};

/// Counting, then Linear/Tanh twice, then Counting: K=2 puts one counter in
/// each partition.
Counted counted_mlp() {
  torch::manual_seed(0);
  Counted model{torch::nn::Sequential(), Counting(), Counting()};
  model.seq->push_back(model.first);
  for (int l = 0; l < 2; ++l) {
    model.seq->push_back(torch::nn::Linear(4, 4));
    model.seq->push_back(torch::nn::Tanh());
  }
  model.seq->push_back(model.last);
  return model;
}

int expected_checkpointing(Checkpoint mode, int m) {
  switch (mode) {
    case Checkpoint::Never:
      return 0;
    case Checkpoint::ExceptLast:
      return m - 1;
    case Checkpoint::Always:
      return m;
  }
  return -1;
}

} // namespace

TEST(Recompute, ACounterThatSkipsRecomputesCountsOncePerMicrobatchInEveryMode) {
  const int m = 4;
  const auto x = torch::randn({8, 4});
  for (const auto mode : gpipe_test::kCheckpointModes) {
    for (const auto schedule : gpipe_test::kForwardAndEverySchedule) {
      auto model = counted_mlp();
      // A lane each; the V schedules fold both partitions onto one.
      const bool v = schedule && gpipe::places_stages_in_a_v(*schedule);
      Pipe pipe(
          model.seq,
          GPipeOptions(2).microbatches(m).checkpoint(mode).lanes(
              v ? std::vector<int64_t>{0, 0} : std::vector<int64_t>{0, 1}));
      if (schedule) {
        pipe->options.schedule(*schedule);
        pipe->step(x, x, [](const torch::Tensor& out, const torch::Tensor& y) {
          return torch::mse_loss(out, y);
        });
      } else {
        torch::mse_loss(pipe(x), x).backward();
      }
      const std::string what = std::string(gpipe::to_string(mode)) + " " +
          (schedule ? gpipe::to_string(*schedule) : "forward/backward");
      for (const auto* counting : {&model.first, &model.last}) {
        EXPECT_EQ((*counting)->seen.load(), m) << what;
        EXPECT_EQ(
            (*counting)->checkpointing.load(), expected_checkpointing(mode, m))
            << what;
        EXPECT_EQ(
            (*counting)->recomputes.load(), expected_checkpointing(mode, m))
            << what;
      }
    }
  }
}

TEST(Recompute, NothingIsCheckpointingOrRecomputingOutsideACheckpointedCell) {
  EXPECT_FALSE(gpipe::is_checkpointing());
  EXPECT_FALSE(gpipe::is_recomputing());
  auto model = counted_mlp();
  Pipe pipe(
      model.seq,
      GPipeOptions(2).microbatches(4).checkpoint(Checkpoint::Always));
  pipe->eval(); // no recompute in eval
  pipe(torch::randn({8, 4}));
  EXPECT_EQ(model.first->checkpointing.load(), 0);
  EXPECT_EQ(model.first->seen.load(), 4);
  EXPECT_FALSE(gpipe::is_checkpointing());
  EXPECT_FALSE(gpipe::is_recomputing());
}

TEST(SequentialAccess, APipeAnswersSizeIndexAndIterationLikeItsSequential) {
  auto seq = gpipe_test::make_mlp(3, 4);
  Pipe pipe(seq, GPipeOptions(3));
  ASSERT_EQ(pipe->size(), seq->size());
  for (size_t k = 0; k < seq->size(); ++k) {
    EXPECT_EQ(pipe[k].get(), seq->ptr(k).get());
    EXPECT_EQ(pipe->ptr(k).get(), seq->ptr(k).get());
  }
  EXPECT_EQ(
      &pipe->at<torch::nn::LinearImpl>(2), &seq->at<torch::nn::LinearImpl>(2));
  size_t visited = 0;
  for (const auto& layer : *pipe) {
    EXPECT_EQ(layer.ptr().get(), seq->ptr(visited).get());
    ++visited;
  }
  EXPECT_EQ(visited, seq->size());
  EXPECT_EQ(
      error_of([&] { pipe[6]; }),
      "gpipe: index 6 is out of range for a pipe of 6 layers");
}

} // namespace recompute_test
