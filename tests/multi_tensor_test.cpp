// Several tensors between stages: layers that take and return a
// std::vector<torch::Tensor> (a transformer's hidden state, its attention
// mask and its position ids) train through a pipe exactly like the plain
// Sequential, in every checkpoint mode, by forward()/backward() and by
// every step() schedule; every tensor is split into the same micro-batches.
#include "test_support.h"

#include <string>
#include <tuple>
#include <vector>

namespace multi_tensor_test {

using gpipe::Checkpoint;
using gpipe::GPipe;
using gpipe::GPipeOptions;
using gpipe::Schedule;
using gpipe_test::clone_of;
using gpipe_test::error_of;
using gpipe_test::grads_of;

namespace {

using Pipe = GPipe<torch::nn::Sequential>;
using Tensors = std::vector<torch::Tensor>;

constexpr int64_t kBatch = 7; // three uneven micro-batches: 3, 2 and 2 rows
constexpr int64_t kMicrobatches = 3;
constexpr int64_t kTokens = 4; // T
constexpr int64_t kWidth = 8; // D
constexpr int64_t kOut = 3;

/// {hidden, mask, ids} -> {hidden + embedding(ids), mask, ids}.
struct EmbedImpl : torch::nn::Cloneable<EmbedImpl> {
  EmbedImpl() {
    reset();
  }
  void reset() override {
    embedding =
        register_module("embedding", torch::nn::Embedding(kTokens, kWidth));
  }
  Tensors forward(const Tensors& inputs) {
    return {inputs[0] + embedding(inputs[2]), inputs[1], inputs[2]};
  }
  torch::nn::Embedding embedding{nullptr};
};
TORCH_MODULE(Embed);

/// {hidden, mask, ids} -> {hidden + tanh(linear(hidden)) * mask, mask, ids}:
/// masked positions pass through.
struct BlockImpl : torch::nn::Cloneable<BlockImpl> {
  BlockImpl() {
    reset();
  }
  void reset() override {
    linear = register_module("linear", torch::nn::Linear(kWidth, kWidth));
  }
  Tensors forward(const Tensors& inputs) {
    const auto& hidden = inputs[0];
    const auto& mask = inputs[1];
    return {
        hidden + torch::tanh(linear(hidden)) * mask.unsqueeze(-1),
        mask,
        inputs[2]};
  }
  torch::nn::Linear linear{nullptr};
};
TORCH_MODULE(Block);

/// {hidden, mask, ids} -> the mean over the tokens of linear(hidden): one
/// tensor [B, kOut], so that step() has an output for its loss.
struct HeadImpl : torch::nn::Cloneable<HeadImpl> {
  HeadImpl() {
    reset();
  }
  void reset() override {
    linear = register_module("linear", torch::nn::Linear(kWidth, kOut));
  }
  torch::Tensor forward(const Tensors& inputs) {
    return linear(inputs[0]).mean(/*dim=*/1);
  }
  torch::nn::Linear linear{nullptr};
};
TORCH_MODULE(Head);

/// Embed, then `blocks` Blocks, then a Head when `head`.
torch::nn::Sequential make_transformer(int64_t blocks, bool head) {
  torch::manual_seed(0);
  torch::nn::Sequential seq;
  seq->push_back(Embed());
  for (int64_t b = 0; b < blocks; ++b) {
    seq->push_back(Block());
  }
  if (head) {
    seq->push_back(Head());
  }
  return seq;
}

/// A batch: hidden [B, T, D], a float 0/1 mask [B, T] and int64 position
/// ids [B, T] (neither requires grad), and the target of the Head.
struct Batch {
  torch::Tensor hidden;
  torch::Tensor mask;
  torch::Tensor ids;
  torch::Tensor target;
};

Batch make_batch() {
  torch::manual_seed(1);
  return {
      torch::randn({kBatch, kTokens, kWidth}),
      (torch::rand({kBatch, kTokens}) > 0.3).to(torch::kFloat),
      torch::randint(0, kTokens, {kBatch, kTokens}, torch::kLong),
      torch::randn({kBatch, kOut})};
}

torch::Tensor mse(const torch::Tensor& out, const torch::Tensor& target) {
  return torch::mse_loss(out, target);
}

std::string describe(
    int64_t partitions,
    Checkpoint mode,
    std::optional<Schedule> schedule) {
  return std::to_string(partitions) + " partitions, " + gpipe::to_string(mode) +
      ", " + (schedule ? gpipe::to_string(*schedule) : "forward/backward");
}

/// K partitions, M micro-batches, `mode`; the schedules over several
/// stages per lane run two partitions per lane on an even K.
GPipeOptions pipe_options(
    int64_t partitions,
    Checkpoint mode,
    std::optional<Schedule> schedule) {
  auto options =
      GPipeOptions(partitions).microbatches(kMicrobatches).checkpoint(mode);
  return options.lanes(gpipe_test::lanes_for(schedule, partitions));
}

/// The parameters' gradients, then the hidden input's, after one training
/// step of `seq` on `batch`: through a pipe built with `options`, or plain
/// without them. Without `schedule`, forward() and backward() of <output,
/// target>; with it, step() with an mse loss on that schedule (plain: the
/// same loss on the whole batch).
std::vector<torch::Tensor> train_once(
    torch::nn::Sequential seq,
    const std::optional<GPipeOptions>& options,
    std::optional<Schedule> schedule,
    const Batch& batch) {
  auto hidden = batch.hidden.clone().requires_grad_();
  const Tensors inputs = {hidden, batch.mask, batch.ids};
  if (!options) {
    const auto out = seq->forward(inputs);
    (schedule ? mse(out, batch.target) : (out * batch.target).sum()).backward();
  } else {
    Pipe pipe(seq, *options);
    if (schedule) {
      pipe->options.schedule(*schedule);
      pipe->step(inputs, batch.target, mse);
    } else {
      const auto out = pipe->forward(inputs);
      (out * batch.target).sum().backward();
    }
  }
  EXPECT_FALSE(batch.mask.grad().defined());
  EXPECT_FALSE(batch.ids.grad().defined());
  auto grads = grads_of(seq->parameters());
  grads.push_back(hidden.grad());
  return grads;
}

} // namespace

TEST(MultiTensor, ATransformerStackTrainsLikePlainInEveryModeAndSchedule) {
  // Embed, four Blocks and a Head: six layers. K=3 puts two layers in each
  // partition; K=4 also runs interleaved 1F1B on two lanes. Every boundary
  // carries the hidden state, the mask and the ids.
  const auto batch = make_batch();
  for (const int64_t partitions : {3, 4}) {
    for (const auto mode : gpipe_test::kCheckpointModes) {
      for (const auto schedule : gpipe_test::kForwardAndEverySchedule) {
        if (!gpipe_test::runs_on(schedule, partitions)) {
          continue;
        }
        auto seq = make_transformer(/*blocks=*/4, /*head=*/true);
        const auto expected =
            train_once(clone_of(seq), std::nullopt, schedule, batch);
        const auto actual = train_once(
            seq, pipe_options(partitions, mode, schedule), schedule, batch);
        gpipe_test::expect_close(
            actual, expected, 1e-6, describe(partitions, mode, schedule));
      }
    }
  }
}

TEST(MultiTensor, StepReturnsTheLossOfTheWholeBatchOverUnevenMicrobatches) {
  const auto batch = make_batch();
  auto seq = make_transformer(/*blocks=*/2, /*head=*/true);
  auto plain = clone_of(seq);
  Pipe pipe(seq, GPipeOptions(2).microbatches(kMicrobatches));
  const Tensors inputs = {batch.hidden, batch.mask, batch.ids};
  const auto loss = pipe->step(inputs, batch.target, mse);
  const auto plain_loss = mse(plain->forward(inputs), batch.target);
  EXPECT_NEAR(loss.item<double>(), plain_loss.item<double>(), 1e-6);
}

TEST(MultiTensor, AForwardReturningTheListGivesBackTheMaskAndIdsUnchanged) {
  // No Head: the last layer returns {hidden, mask, ids}.
  const auto batch = make_batch();
  const auto g = torch::randn({kBatch, kTokens, kWidth});
  for (const auto mode : gpipe_test::kCheckpointModes) {
    const std::string what = gpipe::to_string(mode);
    auto seq = make_transformer(/*blocks=*/3, /*head=*/false);
    auto plain = clone_of(seq);
    auto hidden = batch.hidden.clone().requires_grad_();
    auto plain_hidden = batch.hidden.clone().requires_grad_();
    Pipe pipe(
        seq, GPipeOptions(3).microbatches(kMicrobatches).checkpoint(mode));

    const auto outs =
        pipe->forward<Tensors>(Tensors{hidden, batch.mask, batch.ids});
    const auto plain_outs =
        plain->forward<Tensors>(Tensors{plain_hidden, batch.mask, batch.ids});
    ASSERT_EQ(outs.size(), 3u) << what;
    EXPECT_TRUE(torch::equal(outs[1], batch.mask)) << what;
    EXPECT_TRUE(torch::equal(outs[2], batch.ids)) << what;
    EXPECT_EQ(outs[2].scalar_type(), torch::kLong) << what;
    EXPECT_FALSE(outs[1].requires_grad()) << what;
    EXPECT_FALSE(outs[2].requires_grad()) << what;
    gpipe_test::expect_close({outs[0]}, {plain_outs[0]}, 1e-6, what);

    (outs[0] * g).sum().backward();
    (plain_outs[0] * g).sum().backward();
    auto grads = grads_of(seq->parameters());
    grads.push_back(hidden.grad());
    auto plain_grads = grads_of(plain->parameters());
    plain_grads.push_back(plain_hidden.grad());
    gpipe_test::expect_close(grads, plain_grads, 1e-6, what);
  }
}

namespace {

/// x -> {tanh(x), sigmoid(x)}: a tensor becomes a list inside the pipe.
struct SplitImpl : torch::nn::Cloneable<SplitImpl> {
  void reset() override {}
  Tensors forward(const torch::Tensor& x) {
    return {torch::tanh(x), torch::sigmoid(x)};
  }
};
TORCH_MODULE(Split);

/// {a, b} -> {a + linear(b), b}.
struct MixImpl : torch::nn::Cloneable<MixImpl> {
  MixImpl() {
    reset();
  }
  void reset() override {
    linear = register_module("linear", torch::nn::Linear(kWidth, kWidth));
  }
  Tensors forward(const Tensors& inputs) {
    return {inputs[0] + linear(inputs[1]), inputs[1]};
  }
  torch::nn::Linear linear{nullptr};
};
TORCH_MODULE(Mix);

/// {a, b} -> a * b: the list becomes one tensor again.
struct JoinImpl : torch::nn::Cloneable<JoinImpl> {
  void reset() override {}
  torch::Tensor forward(const Tensors& inputs) {
    return inputs[0] * inputs[1];
  }
};
TORCH_MODULE(Join);

} // namespace

TEST(MultiTensor, ALayerMaySplitATensorIntoAListAndALaterOneJoinIt) {
  // Linear, Split | Mix | Mix, Join | Linear: a tensor goes in, lists cross
  // the first two boundaries, a tensor crosses the last one.
  const auto make = [] {
    torch::manual_seed(4);
    return torch::nn::Sequential(
        torch::nn::Linear(kWidth, kWidth),
        Split(),
        Mix(),
        Mix(),
        Join(),
        torch::nn::Linear(kWidth, kWidth));
  };
  const auto x = torch::randn({kBatch, kWidth});
  const auto y = torch::randn({kBatch, kWidth});
  for (const auto mode : gpipe_test::kCheckpointModes) {
    for (const auto schedule : gpipe_test::kForwardAndEverySchedule) {
      auto seq = make();
      auto plain = clone_of(seq);
      auto input = x.clone().requires_grad_();
      auto plain_input = x.clone().requires_grad_();
      auto options = pipe_options(4, mode, schedule).balance({2, 1, 2, 1});
      Pipe pipe(seq, options);
      if (schedule) {
        pipe->options.schedule(*schedule);
        pipe->step(input, y, mse);
        mse(plain->forward(plain_input), y).backward();
      } else {
        (pipe->forward(input) * y).sum().backward();
        (plain->forward(plain_input) * y).sum().backward();
      }
      auto grads = grads_of(seq->parameters());
      grads.push_back(input.grad());
      auto plain_grads = grads_of(plain->parameters());
      plain_grads.push_back(plain_input.grad());
      gpipe_test::expect_close(
          grads, plain_grads, 1e-6, describe(4, mode, schedule));
    }
  }
}

TEST(MultiTensor, AnInputTensorOfAnotherBatchSizeIsAnErrorNamingBothShapes) {
  const auto batch = make_batch();
  Pipe pipe(
      make_transformer(/*blocks=*/1, /*head=*/true),
      GPipeOptions(2).microbatches(kMicrobatches));
  // A mask of 6 rows for a batch of 7.
  const Tensors inputs = {
      batch.hidden, torch::ones({kBatch - 1, kTokens}), batch.ids};
  const auto message = error_of([&] { pipe->forward(inputs); });
  EXPECT_EQ(message.rfind("gpipe: ", 0), 0u) << message;
  EXPECT_NE(message.find("[7, 4, 8]"), std::string::npos) << message;
  EXPECT_NE(message.find("[6, 4]"), std::string::npos) << message;
  const auto step_message =
      error_of([&] { pipe->step(inputs, batch.target, mse); });
  EXPECT_EQ(step_message.rfind("gpipe: ", 0), 0u) << step_message;
  EXPECT_NE(step_message.find("[6, 4]"), std::string::npos) << step_message;

  // A mask shared by the whole batch is expanded to [B, T] (a view).
  const Tensors expanded = {
      batch.hidden,
      torch::ones({1, kTokens}).expand({kBatch, kTokens}),
      batch.ids};
  EXPECT_EQ(pipe->forward(expanded).size(0), kBatch);
}

TEST(MultiTensor, AnEmptyListUndefinedOrUnbatchedInputTensorIsAnError) {
  const auto batch = make_batch();
  Pipe pipe(
      make_transformer(/*blocks=*/1, /*head=*/true),
      GPipeOptions(2).microbatches(kMicrobatches));
  for (const auto& inputs :
       {Tensors{},
        Tensors{batch.hidden, torch::Tensor(), batch.ids},
        Tensors{batch.hidden, torch::tensor(1.0), batch.ids}}) {
    const auto message = error_of([&] { pipe->forward(inputs); });
    EXPECT_EQ(message.rfind("gpipe: ", 0), 0u)
        << inputs.size() << " tensors: " << message;
  }
}

namespace {

/// x -> (x, 2x) as a std::tuple: not a value a pipe can carry.
struct PairImpl : torch::nn::Module {
  std::tuple<torch::Tensor, torch::Tensor> forward(const torch::Tensor& x) {
    return {x, x * 2};
  }
};
TORCH_MODULE(Pair);

} // namespace

TEST(MultiTensor, ALayerReturningATupleIsAnErrorAskingForAVector) {
  // Pair ends partition 0, so its tuple would have to cross a boundary.
  Pipe pipe(
      torch::nn::Sequential(
          torch::nn::Linear(kWidth, kWidth), Pair(), torch::nn::Linear(2, 2)),
      GPipeOptions(2).microbatches(2).balance({2, 1}));
  const auto message = error_of([&] {
    pipe->forward(torch::randn({4, kWidth}));
  });
  EXPECT_NE(message.find("gpipe: "), std::string::npos) << message;
  EXPECT_NE(message.find("std::vector<torch::Tensor>"), std::string::npos)
      << message;
  EXPECT_NE(message.find("partition 0"), std::string::npos) << message;
}

namespace {

/// Returns {x} on micro-batches of 3 rows and {x, x} otherwise: a list
/// whose length depends on the data.
struct RaggedImpl : torch::nn::Module {
  Tensors forward(const torch::Tensor& x) {
    if (x.size(0) == 3) {
      return {x * 2};
    }
    return {x * 2, x * 3};
  }
};
TORCH_MODULE(Ragged);

/// Sums its list: a layer that takes a list of any length.
struct SumListImpl : torch::nn::Cloneable<SumListImpl> {
  void reset() override {}
  torch::Tensor forward(const Tensors& inputs) {
    auto total = inputs[0];
    for (size_t k = 1; k < inputs.size(); ++k) {
      total = total + inputs[k];
    }
    return total;
  }
};
TORCH_MODULE(SumList);

} // namespace

TEST(MultiTensor, MicrobatchesReturningListsOfDifferentLengthsAreAnError) {
  for (const auto mode : gpipe_test::kCheckpointModes) {
    Pipe gathered(
        torch::nn::Sequential(torch::nn::Linear(4, 4), Ragged()),
        GPipeOptions(2).microbatches(kMicrobatches).checkpoint(mode));
    const auto x = torch::randn({kBatch, 4}, torch::requires_grad());
    const auto message = error_of([&] { gathered->forward<Tensors>(x); });
    EXPECT_NE(message.find("tensors, but"), std::string::npos)
        << gpipe::to_string(mode) << ": " << message;
  }
}

TEST(MultiTensor, ABracedListIsAListEvenOfOneTensor) {
  torch::manual_seed(0);
  auto seq = torch::nn::Sequential(SumList(), torch::nn::Linear(4, 2));
  auto plain = clone_of(seq);
  Pipe pipe(seq, GPipeOptions(2).microbatches(kMicrobatches));
  const auto x = torch::randn({kBatch, 4});
  const auto target = torch::randn({kBatch, 2});
  const auto loss = pipe->step({x}, target, mse);
  const auto expected = mse(plain->forward(Tensors{x}), target);
  expected.backward();
  EXPECT_NEAR(loss.item<double>(), expected.item<double>(), 1e-6);
  gpipe_test::expect_close(
      grads_of(seq->parameters()), grads_of(plain->parameters()), 1e-6, "step");
  EXPECT_TRUE(torch::allclose(pipe->forward({x}), plain->forward(Tensors{x})));
  EXPECT_TRUE(torch::allclose(pipe({x, x}), plain->forward(Tensors{x, x})));
}

} // namespace multi_tensor_test
