// Balancing every model a pipe accepts: layers that pass several tensors (a
// transformer's hidden state, attention mask and position ids; a layer that
// returns two tensors and one that adds them) and layers with skips (a
// U-Net). Both balancers profile each layer through the pipe's own path
// (detail/bundle.h, a SkipFrame), so their balances build pipes that run
// like the plain Sequential, and what a skip costs is counted at the layer
// that stashes it.
#include "test_support.h"

#include <gpipe/balance.h>
#include <gpipe/skip.h>

#include <chrono>
#include <string>
#include <thread>
#include <vector>

namespace balance_models_test {

using gpipe::Checkpoint;
using gpipe::GPipe;
using gpipe::GPipeOptions;
using gpipe::TimeOptions;
using gpipe_test::error_of;

namespace {

using Pipe = GPipe<torch::nn::Sequential>;
using Tensors = std::vector<torch::Tensor>;

constexpr int64_t kBatch = 4;
constexpr int64_t kTokens = 4; // T
constexpr int64_t kWidth = 8; // D
constexpr int64_t kOut = 3;

/// Identity that sleeps `ms` in forward and again in backward.
struct Sleep : torch::autograd::Function<Sleep> {
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx,
      const torch::Tensor& x,
      double ms) {
    ctx->saved_data["ms"] = ms;
    std::this_thread::sleep_for(std::chrono::duration<double, std::milli>(ms));
    return {x.clone()};
  }
  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx,
      torch::autograd::variable_list grads) {
    std::this_thread::sleep_for(std::chrono::duration<double, std::milli>(
        ctx->saved_data["ms"].toDouble()));
    return {grads[0], torch::Tensor()};
  }
};

torch::Tensor sleep(const torch::Tensor& x, double ms) {
  return Sleep::apply(x, ms)[0];
}

/// {hidden, mask, ids} -> {hidden + embedding(ids), mask, ids}.
struct EmbedImpl : torch::nn::Module {
  explicit EmbedImpl(double ms_) : ms(ms_) {
    embedding =
        register_module("embedding", torch::nn::Embedding(kTokens, kWidth));
  }
  Tensors forward(const Tensors& in) {
    return {sleep(in[0] + embedding(in[2]), ms), in[1], in[2]};
  }
  double ms;
  torch::nn::Embedding embedding{nullptr};
};
TORCH_MODULE(Embed);

/// {hidden, mask, ids} -> {hidden + tanh(linear(hidden)) * mask, mask, ids}.
struct BlockImpl : torch::nn::Module {
  explicit BlockImpl(double ms_) : ms(ms_) {
    linear = register_module("linear", torch::nn::Linear(kWidth, kWidth));
  }
  Tensors forward(const Tensors& in) {
    const auto hidden =
        in[0] + torch::tanh(linear(in[0])) * in[1].unsqueeze(-1);
    return {sleep(hidden, ms), in[1], in[2]};
  }
  double ms;
  torch::nn::Linear linear{nullptr};
};
TORCH_MODULE(Block);

/// {hidden, mask, ids} -> the mean over the tokens of linear(hidden).
struct HeadImpl : torch::nn::Module {
  explicit HeadImpl(double ms_) : ms(ms_) {
    linear = register_module("linear", torch::nn::Linear(kWidth, kOut));
  }
  torch::Tensor forward(const Tensors& in) {
    return sleep(linear(in[0]).mean(/*dim=*/1), ms);
  }
  double ms;
  torch::nn::Linear linear{nullptr};
};
TORCH_MODULE(Head);

/// Embed, a Block per middle entry of `ms`, Head; each sleeping its `ms`.
torch::nn::Sequential make_transformer(const std::vector<double>& ms) {
  torch::manual_seed(0);
  torch::nn::Sequential seq;
  seq->push_back(Embed(ms.front()));
  for (size_t l = 1; l + 1 < ms.size(); ++l) {
    seq->push_back(Block(ms[l]));
  }
  seq->push_back(Head(ms.back()));
  return seq;
}

Tensors make_tokens() {
  torch::manual_seed(1);
  return {
      torch::randn({kBatch, kTokens, kWidth}),
      (torch::rand({kBatch, kTokens}) > 0.3).to(torch::kFloat),
      torch::randint(0, kTokens, {kBatch, kTokens}, torch::kLong)};
}

/// The encoder half of a U-Net level: stashes its activation as "down",
/// through a Sleep of `ms`, whose backward runs only if the skip's gradient
/// reaches the stash.
struct DownImpl : torch::nn::Module, gpipe::skip::Skippable {
  explicit DownImpl(double ms_)
      : Skippable(/*stashes=*/{"down"}, /*pops=*/{}), ms(ms_) {
    linear = register_module("linear", torch::nn::Linear(kWidth, kWidth));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto y = torch::tanh(linear(x));
    stash("down", sleep(y, ms));
    return y;
  }
  double ms;
  torch::nn::Linear linear{nullptr};
};
TORCH_MODULE(Down);

/// The decoder half: adds the "down" of its level.
struct UpImpl : torch::nn::Module, gpipe::skip::Skippable {
  UpImpl() : Skippable(/*stashes=*/{}, /*pops=*/{"down"}) {
    linear = register_module("linear", torch::nn::Linear(kWidth, kWidth));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return torch::tanh(linear(x)) + pop("down");
  }
  torch::nn::Linear linear{nullptr};
};
TORCH_MODULE(Up);

/// layer 0 Down(l1, `ms`)  1 Down(l2)  2 Mid  3 Up(l2)  4 Up(l1)  5 Head
torch::nn::Sequential make_unet(double ms) {
  torch::manual_seed(2);
  Down outer(ms);
  Down inner(0.0);
  Up inner_up;
  Up outer_up;
  gpipe::skip::isolate(outer, "l1");
  gpipe::skip::isolate(outer_up, "l1");
  gpipe::skip::isolate(inner, "l2");
  gpipe::skip::isolate(inner_up, "l2");
  return torch::nn::Sequential(
      outer,
      inner,
      torch::nn::Linear(kWidth, kWidth),
      inner_up,
      outer_up,
      torch::nn::Linear(kWidth, kOut));
}

/// The balance is a split of the layers into `partitions`, and a pipe built
/// with it gives the plain Sequential's output.
template <typename Input>
void expect_pipe_runs_like_plain(
    torch::nn::Sequential seq,
    const std::vector<int64_t>& balance,
    int64_t partitions,
    const Input& input,
    const std::string& what) {
  ASSERT_EQ(static_cast<int64_t>(balance.size()), partitions) << what;
  int64_t layers = 0;
  for (const int64_t size : balance) {
    EXPECT_GE(size, 1) << what;
    layers += size;
  }
  ASSERT_EQ(layers, static_cast<int64_t>(seq->size())) << what;
  torch::NoGradGuard no_grad;
  const torch::Tensor plain = seq->forward(input);
  Pipe pipe(seq, GPipeOptions(partitions).balance(balance).microbatches(2));
  gpipe_test::expect_close({pipe->forward(input)}, {plain}, 1e-6, what);
}

} // namespace

TEST(BalanceModels, BothBalancersBalanceATransformerStackOfHiddenMaskAndIds) {
  // Units of 2 ms (forward and backward each): costs 1 4 1 1 1 4 1, whose
  // best split into 3 is [2, 3, 2] (bottleneck 5; every other split >= 6).
  auto seq = make_transformer({2, 8, 2, 2, 2, 8, 2});
  const Tensors tokens = make_tokens();
  const auto by_time = gpipe::balance_by_time(
      seq, tokens, 3, TimeOptions().warmup(1).repeats(3));
  EXPECT_EQ(by_time, (std::vector<int64_t>{2, 3, 2}));
  expect_pipe_runs_like_plain(seq, by_time, 3, tokens, "by time");

  const auto memory = gpipe::profile_memory(seq, tokens);
  ASSERT_EQ(memory.size(), 7u);
  const int64_t f = 4; // bytes per float
  // The first layer's input is all three tensors; the head's output one.
  EXPECT_EQ(
      memory[0].input_bytes,
      kBatch * kTokens * kWidth * f + kBatch * kTokens * f +
          kBatch * kTokens * 8);
  EXPECT_EQ(memory[0].parameter_bytes, kTokens * kWidth * f);
  EXPECT_EQ(memory[6].output_bytes, kBatch * kOut * f);
  const auto by_memory =
      gpipe::balance_by_memory(seq, tokens, 3, Checkpoint::Always, 2);
  expect_pipe_runs_like_plain(seq, by_memory, 3, tokens, "by memory");
}

namespace {

/// x -> {first(x), second(x)}: two tensors, as torchgpipe's tuple test.
struct TwoImpl : torch::nn::Module {
  TwoImpl() {
    first = register_module("first", torch::nn::Linear(kWidth, kWidth));
    second = register_module("second", torch::nn::Linear(kWidth, kWidth));
  }
  Tensors forward(const torch::Tensor& x) {
    return {first(x), second(x)};
  }
  torch::nn::Linear first{nullptr};
  torch::nn::Linear second{nullptr};
};
TORCH_MODULE(Two);

/// {a, b} -> a + b.
struct AddImpl : torch::nn::Module {
  torch::Tensor forward(const Tensors& in) {
    return in[0] + in[1];
  }
};
TORCH_MODULE(Add);

} // namespace

TEST(BalanceModels, ALayerReturningTwoTensorsAndOneAddingThemAreBalanced) {
  // torchgpipe's test_balance_by_time_tuple: profiling used to call every
  // layer for one tensor and failed with "you asked for type at::Tensor".
  torch::manual_seed(3);
  torch::nn::Sequential seq(
      torch::nn::Linear(kWidth, kWidth),
      Two(),
      Add(),
      torch::nn::Linear(kWidth, kOut));
  const auto x = torch::randn({kBatch, kWidth});
  const auto by_time =
      gpipe::balance_by_time(seq, x, 2, TimeOptions().warmup(0).repeats(1));
  expect_pipe_runs_like_plain(seq, by_time, 2, x, "by time");
  const auto memory = gpipe::profile_memory(seq, x);
  EXPECT_EQ(memory[1].output_bytes, 2 * kBatch * kWidth * 4);
  EXPECT_EQ(memory[2].input_bytes, 2 * kBatch * kWidth * 4);
  const auto by_memory =
      gpipe::balance_by_memory(seq, x, 2, Checkpoint::Never, 2);
  expect_pipe_runs_like_plain(seq, by_memory, 2, x, "by memory");
}

TEST(BalanceModels, BothBalancersBalanceAUNetAndCountItsSkipsAtTheirStash) {
  const double ms = 10;
  auto seq = make_unet(ms);
  const auto x = torch::randn({kBatch, kWidth});
  const auto times =
      gpipe::profile_times(seq, x, TimeOptions().warmup(1).repeats(3));
  ASSERT_EQ(times.size(), 6u);
  // The stash sleeps 10 ms forward and, when the skip's gradient reaches
  // it, 10 ms backward: the layer alone is differentiated from its skip too.
  EXPECT_GE(times[0], 2 * ms / 1000);
  for (size_t l = 1; l < times.size(); ++l) {
    EXPECT_LT(times[l], ms / 1000) << "layer " << l;
  }
  const auto by_time =
      gpipe::balance_by_time(seq, x, 3, TimeOptions().warmup(1).repeats(3));
  expect_pipe_runs_like_plain(seq, by_time, 3, x, "by time");

  const auto memory = gpipe::profile_memory(seq, x);
  // Down keeps its output (tanh saves it) and its stashed copy.
  EXPECT_GE(memory[0].activation_bytes, 2 * kBatch * kWidth * 4);
  const auto by_memory =
      gpipe::balance_by_memory(seq, x, 3, Checkpoint::Always, 2);
  expect_pipe_runs_like_plain(seq, by_memory, 3, x, "by memory");
}

namespace {

/// Declares its stashes and pops; does them only when `acts`.
struct SkipperImpl : torch::nn::Module, gpipe::skip::Skippable {
  SkipperImpl(
      std::vector<std::string> stashes_,
      std::vector<std::string> pops_,
      bool acts_)
      : Skippable(stashes_, pops_), acts(acts_) {}
  torch::Tensor forward(const torch::Tensor& x) {
    auto y = x * 2;
    if (acts) {
      for (const auto& name : stashes()) {
        stash(name, y);
      }
      for (const auto& name : pops()) {
        y = y + pop(name);
      }
    }
    return y;
  }
  bool acts;
};
TORCH_MODULE(Skipper);

using Names = std::vector<std::string>;

} // namespace

TEST(BalanceModels, ProfilingFailsAsAPipeDoesOnADeclaredStashOrPopNotDone) {
  const auto x = torch::randn({kBatch, kWidth});
  torch::nn::Sequential no_stash(
      Skipper(Names{"a"}, Names{}, false), Skipper(Names{}, Names{"a"}, true));
  const auto stash_error =
      error_of([&] { gpipe::balance_by_time(no_stash, x, 2); });
  EXPECT_EQ(
      stash_error,
      "gpipe: skip 'a' was not stashed by layer 0 while profiling, although "
      "the layer declares it (a declared stash must happen on every forward)");
  EXPECT_EQ(
      error_of([&] {
        gpipe::balance_by_memory(no_stash, x, 2, Checkpoint::Always, 2);
      }),
      stash_error);
  torch::nn::Sequential no_pop(
      Skipper(Names{"a"}, Names{}, true), Skipper(Names{}, Names{"a"}, false));
  EXPECT_EQ(
      error_of([&] { gpipe::profile_times(no_pop, x); }),
      "gpipe: skip 'a' was not popped by layer 1 while profiling, although "
      "the layer declares it (a declared pop must happen on every forward)");
  // A skip stashed and popped in one layer that does neither leaves
  // nothing behind: no error, as in a pipe.
  torch::nn::Sequential itself(Skipper(Names{"a"}, Names{"a"}, false));
  EXPECT_EQ(error_of([&] { gpipe::profile_memory(itself, x); }), "(no error)");
}

TEST(BalanceModels, ProfilingRefusesABadSkipLayoutWithThePipesMessage) {
  const auto x = torch::randn({kBatch, kWidth});
  torch::nn::Sequential seq(
      torch::nn::Linear(kWidth, kWidth), Skipper(Names{}, Names{"a"}, true));
  const auto pipe_error = error_of([&] { Pipe pipe(seq, GPipeOptions(2)); });
  EXPECT_EQ(
      pipe_error,
      "gpipe: skip 'a' is popped by layer 1 but never stashed (check the "
      "names and namespaces: gpipe::skip::isolate)");
  EXPECT_EQ(error_of([&] { gpipe::profile_times(seq, x); }), pipe_error);
  EXPECT_EQ(error_of([&] { gpipe::profile_memory(seq, x); }), pipe_error);
}

namespace {

/// {x} -> linear(x): a layer that takes a list of one tensor.
struct ListOfOneImpl : torch::nn::Module {
  ListOfOneImpl() {
    linear = register_module("linear", torch::nn::Linear(kWidth, kWidth));
  }
  torch::Tensor forward(const Tensors& in) {
    return linear(in.at(0));
  }
  torch::nn::Linear linear{nullptr};
};
TORCH_MODULE(ListOfOne);

} // namespace

TEST(BalanceModels, ABracedSampleIsAListEvenOfOneTensorAsThePipesInput) {
  torch::nn::Sequential seq(ListOfOne(), torch::nn::Linear(kWidth, kOut));
  const auto x = torch::randn({kBatch, kWidth});
  EXPECT_EQ(
      gpipe::balance_by_time(seq, {x}, 2, TimeOptions().warmup(0).repeats(1)),
      (std::vector<int64_t>{1, 1}));
  EXPECT_EQ(gpipe::profile_memory(seq, {x}).size(), 2u);
  const auto tensor_error = error_of([&] { gpipe::profile_times(seq, x); });
  EXPECT_NE(tensor_error.find("std::vector"), std::string::npos)
      << tensor_error;
}

TEST(BalanceModels, SampleTensorsOnDifferentDevicesOrBatchSizesAreRejected) {
  auto seq = make_transformer({0, 0, 0});
  Tensors tokens = make_tokens();
  tokens[1] = tokens[1].slice(0, 0, kBatch - 1);
  const auto batch_error =
      error_of([&] { gpipe::balance_by_time(seq, tokens, 2); });
  EXPECT_EQ(batch_error.rfind("gpipe: every tensor of the sample", 0), 0u)
      << batch_error;
  EXPECT_NE(batch_error.find("tensor 1 shape: [3, 4]"), std::string::npos)
      << batch_error;
}

} // namespace balance_models_test
