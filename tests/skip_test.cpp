// Skip connections (gpipe::skip): a layer stashes a tensor, a later layer
// pops it, across any number of partition boundaries, and the pipe trains
// exactly like the plain Sequential (where stash and pop use a per-thread
// store) in every checkpoint mode, through forward()/backward() and every
// step() schedule. A bad layout is refused at construction.
#include "test_support.h"

#include <gpipe/skip.h>

#include <c10/core/Storage.h>
#include <c10/util/intrusive_ptr.h>

#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace skip_test {

using gpipe::Checkpoint;
using gpipe::GPipe;
using gpipe::GPipeOptions;
using gpipe::Schedule;
using gpipe_test::clone_of;
using gpipe_test::error_of;
using gpipe_test::grads_of;

namespace {

using Pipe = GPipe<torch::nn::Sequential>;

constexpr int64_t kWidth = 6;
constexpr int64_t kOut = 3;
constexpr int64_t kBatch = 7; // three uneven micro-batches: 3, 2 and 2 rows
constexpr int64_t kMicrobatches = 3;

/// The encoder half of a U-Net level: stashes its activation as "down".
/// Cloneable, so that clone_of copies it (and its namespace) for the plain
/// reference.
struct DownImpl : torch::nn::Cloneable<DownImpl>, gpipe::skip::Skippable {
  explicit DownImpl(int64_t width_)
      : Skippable(/*stashes=*/{"down"}, /*pops=*/{}), width(width_) {
    reset();
  }
  void reset() override {
    linear = register_module("linear", torch::nn::Linear(width, width));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto y = torch::tanh(linear(x));
    stash("down", y);
    return y;
  }
  int64_t width;
  torch::nn::Linear linear{nullptr};
};
TORCH_MODULE(Down);

/// The decoder half of a U-Net level: adds the "down" of its level.
struct UpImpl : torch::nn::Cloneable<UpImpl>, gpipe::skip::Skippable {
  explicit UpImpl(int64_t width_)
      : Skippable(/*stashes=*/{}, /*pops=*/{"down"}), width(width_) {
    reset();
  }
  void reset() override {
    linear = register_module("linear", torch::nn::Linear(width, width));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return torch::tanh(linear(x)) + pop("down");
  }
  int64_t width;
  torch::nn::Linear linear{nullptr};
};
TORCH_MODULE(Up);

/// Stashes its activation under every name of `names` (the same tensor),
/// after dropout with probability `p` when p > 0.
struct StashImpl : torch::nn::Cloneable<StashImpl>, gpipe::skip::Skippable {
  explicit StashImpl(std::vector<std::string> names_, double p_ = 0.0)
      : Skippable(names_, /*pops=*/{}), names(std::move(names_)), p(p_) {
    reset();
  }
  void reset() override {
    linear = register_module("linear", torch::nn::Linear(kWidth, kWidth));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto y = torch::tanh(linear(x));
    if (p > 0) {
      y = torch::dropout(y, p, is_training());
    }
    for (const auto& name : names) {
      stash(name, y);
    }
    return y;
  }
  std::vector<std::string> names;
  double p;
  torch::nn::Linear linear{nullptr};
};
TORCH_MODULE(Stash);

/// Adds the tensor stashed under `name` to its own activation.
struct PopImpl : torch::nn::Cloneable<PopImpl>, gpipe::skip::Skippable {
  explicit PopImpl(const std::string& name_)
      : Skippable(/*stashes=*/{}, /*pops=*/{name_}), name(name_) {
    reset();
  }
  void reset() override {
    linear = register_module("linear", torch::nn::Linear(kWidth, kWidth));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return torch::tanh(linear(x)) + pop(name);
  }
  std::string name;
  torch::nn::Linear linear{nullptr};
};
TORCH_MODULE(Pop);

/// A U-Net of three levels, each level's Down and Up in a namespace of its
/// own ("l1/down", "l2/down", "l3/down"):
///   layer  0 Down(l1)  1 Down(l2)  2 Down(l3)  3 Mid
///          4 Up(l3)    5 Up(l2)    6 Up(l1)    7 Head
torch::nn::Sequential make_unet(uint64_t seed = 0) {
  torch::manual_seed(seed);
  torch::nn::Sequential seq;
  for (const char* level : {"l1", "l2", "l3"}) {
    Down down(kWidth);
    gpipe::skip::isolate(down, level);
    seq->push_back(down);
  }
  seq->push_back(torch::nn::Linear(kWidth, kWidth)); // Mid
  for (const char* level : {"l3", "l2", "l1"}) {
    Up up(kWidth);
    gpipe::skip::isolate(up, level);
    seq->push_back(up);
  }
  seq->push_back(torch::nn::Linear(kWidth, kOut)); // Head
  return seq;
}

/// One layer stashes one tensor under "a", "b" and "c"; three later layers
/// pop one name each:
///   layer  0 Linear  1 Stash(a, b, c)  2 Linear  3 Pop(a)
///          4 Linear  5 Pop(b)          6 Pop(c)  7 Head
torch::nn::Sequential make_fan_out(uint64_t seed = 1) {
  torch::manual_seed(seed);
  return torch::nn::Sequential(
      torch::nn::Linear(kWidth, kWidth),
      Stash(std::vector<std::string>{"a", "b", "c"}),
      torch::nn::Linear(kWidth, kWidth),
      Pop("a"),
      torch::nn::Linear(kWidth, kWidth),
      Pop("b"),
      Pop("c"),
      torch::nn::Linear(kWidth, kOut));
}

torch::Tensor mse(const torch::Tensor& out, const torch::Tensor& target) {
  return torch::mse_loss(out, target);
}

std::string describe(Checkpoint mode, std::optional<Schedule> schedule) {
  return std::string(gpipe::to_string(mode)) + " " +
      (schedule ? gpipe::to_string(*schedule) : "forward/backward");
}

/// `balance` as the partitions, M micro-batches, `mode`; interleaved 1F1B on
/// an even partition count runs on two lanes (partition j on lane j mod 2),
/// so that each lane holds several partitions.
GPipeOptions pipe_options(
    const std::vector<int64_t>& balance,
    Checkpoint mode,
    std::optional<Schedule> schedule) {
  const auto partitions = static_cast<int64_t>(balance.size());
  auto options = GPipeOptions(partitions)
                     .balance(balance)
                     .microbatches(kMicrobatches)
                     .checkpoint(mode);
  return options.lanes(gpipe_test::lanes_for(schedule, partitions));
}

/// The parameters' gradients, then the input's, after one training step of
/// `seq`: through a pipe built with `options`, or plain without them.
/// Without `schedule`, forward() and backward() of <output, y>; with it,
/// step() with an mse loss against `y` on that schedule (plain: the same
/// loss on the whole batch).
std::vector<torch::Tensor> train_once(
    torch::nn::Sequential seq,
    const std::optional<GPipeOptions>& options,
    std::optional<Schedule> schedule,
    const torch::Tensor& x,
    const torch::Tensor& y) {
  auto input = x.clone().requires_grad_();
  if (!options) {
    const auto out = seq->forward(input);
    (schedule ? mse(out, y) : (out * y).sum()).backward();
  } else {
    Pipe pipe(seq, *options);
    if (schedule) {
      pipe->options.schedule(*schedule);
      pipe->step(input, y, mse);
    } else {
      const auto out = pipe->forward(input);
      (out * y.to(out.device())).sum().backward();
    }
  }
  auto grads = grads_of(seq->parameters());
  grads.push_back(input.grad());
  return grads;
}

/// A fresh model from `make` against plain training of its clone, with
/// `balance`, in every checkpoint mode, by forward()/backward() and every
/// step() schedule, on a batch of 7 in 3 micro-batches.
void expect_trains_like_plain(
    const std::function<torch::nn::Sequential()>& make,
    const std::vector<int64_t>& balance) {
  const auto x = torch::randn({kBatch, kWidth});
  const auto y = torch::randn({kBatch, kOut});
  for (const auto mode : gpipe_test::kCheckpointModes) {
    for (const auto schedule : gpipe_test::kForwardAndEverySchedule) {
      if (!gpipe_test::runs_on(
              schedule, static_cast<int64_t>(balance.size()))) {
        continue;
      }
      auto seq = make();
      const auto expected =
          train_once(clone_of(seq), std::nullopt, schedule, x, y);
      const auto actual = train_once(
          seq, pipe_options(balance, mode, schedule), schedule, x, y);
      gpipe_test::expect_close(
          actual, expected, 1e-6, describe(mode, schedule));
    }
  }
}

/// The message of building a pipe of `seq` on two partitions.
std::string layout_error(const torch::nn::Sequential& seq) {
  return error_of([&] { Pipe pipe(seq, GPipeOptions(2)); });
}

} // namespace

TEST(Skip, UNetSkipsCrossingOneTwoAndThreeBoundariesTrainLikePlain) {
  // Partition 0: Down(l1), Down(l2)   partition 1: Down(l3), Mid
  // partition 2: Up(l3), Up(l2)       partition 3: Up(l1), Head
  // so 'l3/down' crosses one boundary, 'l2/down' two and 'l1/down' three.
  expect_trains_like_plain([] { return make_unet(); }, {2, 2, 2, 2});
}

TEST(Skip, AStashPoppedInItsOwnPartitionTrainsLikePlain) {
  // Partition 0: Down(l1), Down(l2)
  // partition 1: Down(l3), Mid, Up(l3), Up(l2)
  // partition 2: Up(l1), Head
  // so 'l3/down' never leaves partition 1, 'l2/down' crosses one boundary
  // and 'l1/down' two.
  expect_trains_like_plain([] { return make_unet(); }, {2, 4, 2});
}

TEST(Skip, OneStashPoppedByThreeLaterLayersGetsEveryGradientTerm) {
  // Partition 0: Linear, Stash(a, b, c)   partition 1: Linear, Pop(a)
  // partition 2: Linear, Pop(b)           partition 3: Pop(c), Head
  // The stashed tensor's gradient is the sum of three pops' and its path.
  expect_trains_like_plain([] { return make_fan_out(); }, {2, 2, 2, 2});
}

TEST(Skip, NamespacesLetOneNameBeStashedAndPoppedTwice) {
  // Partition 0: Stash(first/a), Linear   partition 1: Stash(second/a), Linear
  // partition 2: Pop(second/a), Pop(first/a), Head
  // so 'first/a' crosses two boundaries and 'second/a' one.
  const auto make = [] {
    torch::manual_seed(2);
    Stash first_stash(std::vector<std::string>{"a"});
    Stash second_stash(std::vector<std::string>{"a"});
    Pop first_pop("a");
    Pop second_pop("a");
    gpipe::skip::isolate(first_stash, "first");
    gpipe::skip::isolate(first_pop, "first");
    gpipe::skip::isolate(second_stash, "second");
    gpipe::skip::isolate(second_pop, "second");
    return torch::nn::Sequential(
        first_stash,
        torch::nn::Linear(kWidth, kWidth),
        second_stash,
        torch::nn::Linear(kWidth, kWidth),
        second_pop,
        first_pop,
        torch::nn::Linear(kWidth, kOut));
  };
  auto seq = make();
  EXPECT_EQ(seq->at<StashImpl>(0).qualified("a"), "first/a");
  EXPECT_EQ(seq->at<PopImpl>(4).qualified("a"), "second/a");
  // A clone keeps the namespaces (the plain reference is a clone).
  auto clone = clone_of(seq);
  EXPECT_EQ(clone->at<StashImpl>(0).skip_namespace(), "first");
  EXPECT_EQ(clone->at<PopImpl>(4).skip_namespace(), "second");
  expect_trains_like_plain(make, {2, 2, 3});
}

TEST(Skip, RecomputeReplaysTheDropoutOfAStashedTensor) {
  // The skip is dropout's output: a recompute that drew another mask, or a
  // pop that read something else than its forward's skip, would change the
  // gradients between checkpoint modes.
  const auto make = [] {
    torch::manual_seed(3);
    return torch::nn::Sequential(
        Stash(std::vector<std::string>{"a"}, /*p=*/0.5),
        torch::nn::Linear(kWidth, kWidth),
        torch::nn::Linear(kWidth, kWidth),
        Pop("a"),
        torch::nn::Linear(kWidth, kOut));
  };
  const auto x = torch::randn({kBatch, kWidth});
  const auto y = torch::randn({kBatch, kOut});
  for (const auto schedule :
       {std::optional<Schedule>(),
        std::optional<Schedule>(Schedule::OneFOneB)}) {
    std::vector<torch::Tensor> never;
    for (const auto mode : gpipe_test::kCheckpointModes) {
      auto seq = make();
      torch::manual_seed(5);
      const auto grads = train_once(
          seq, pipe_options({2, 2, 1}, mode, schedule), schedule, x, y);
      if (mode == Checkpoint::Never) {
        never = grads;
      } else {
        gpipe_test::expect_close(grads, never, 1e-6, describe(mode, schedule));
      }
    }
  }
}

TEST(Skip, AnEvalForwardWithoutGradMatchesPlain) {
  auto seq = make_unet();
  auto plain = clone_of(seq);
  Pipe pipe(seq, pipe_options({2, 2, 2, 2}, Checkpoint::Always, {}));
  pipe->eval();
  plain->eval();
  const auto x = torch::randn({kBatch, kWidth});
  torch::NoGradGuard no_grad;
  gpipe_test::expect_close(
      {pipe->forward(x)}, {plain->forward(x)}, 1e-6, "eval output");
}

TEST(Skip, APopWithoutAnyStashIsRefusedAtConstruction) {
  const auto message = layout_error(
      torch::nn::Sequential(torch::nn::Linear(kWidth, kWidth), Pop("a")));
  EXPECT_EQ(message.rfind("gpipe: ", 0), 0u) << message;
  EXPECT_NE(message.find("'a'"), std::string::npos) << message;
  EXPECT_NE(message.find("never stashed"), std::string::npos) << message;
}

TEST(Skip, AStashNeverPoppedIsRefusedAtConstruction) {
  const auto message = layout_error(torch::nn::Sequential(
      Stash(std::vector<std::string>{"a"}), torch::nn::Linear(kWidth, kWidth)));
  EXPECT_EQ(message.rfind("gpipe: ", 0), 0u) << message;
  EXPECT_NE(message.find("'a'"), std::string::npos) << message;
  EXPECT_NE(message.find("never popped"), std::string::npos) << message;
}

TEST(Skip, ANameStashedByTwoLayersIsRefusedAtConstruction) {
  const auto message = layout_error(torch::nn::Sequential(
      Stash(std::vector<std::string>{"a"}),
      Stash(std::vector<std::string>{"a"}),
      Pop("a")));
  EXPECT_EQ(message.rfind("gpipe: ", 0), 0u) << message;
  EXPECT_NE(message.find("'a'"), std::string::npos) << message;
  EXPECT_NE(message.find("stashed by layers"), std::string::npos) << message;
}

TEST(Skip, ANamePoppedByTwoLayersIsRefusedAtConstruction) {
  const auto message = layout_error(torch::nn::Sequential(
      Stash(std::vector<std::string>{"a"}), Pop("a"), Pop("a")));
  EXPECT_EQ(message.rfind("gpipe: ", 0), 0u) << message;
  EXPECT_NE(message.find("'a'"), std::string::npos) << message;
  EXPECT_NE(message.find("popped by layers"), std::string::npos) << message;
}

TEST(Skip, APopInALayerBeforeItsStashIsRefusedAtConstruction) {
  const auto message = layout_error(
      torch::nn::Sequential(Pop("a"), Stash(std::vector<std::string>{"a"})));
  EXPECT_EQ(message.rfind("gpipe: ", 0), 0u) << message;
  EXPECT_NE(message.find("'a'"), std::string::npos) << message;
  EXPECT_NE(message.find("before"), std::string::npos) << message;
}

TEST(Skip, ALayoutWithSeveralErrorsReportsThemAllInOneMessage) {
  // torchgpipe's test_double_stash_pop: stashed twice and popped twice.
  const auto twice = layout_error(torch::nn::Sequential(
      Stash(std::vector<std::string>{"a"}),
      Stash(std::vector<std::string>{"a"}),
      Pop("a"),
      Pop("a")));
  EXPECT_EQ(twice.rfind("gpipe: the skip layout has 2 errors:", 0), 0u)
      << twice;
  EXPECT_NE(twice.find("'a' is stashed by layers 0, 1"), std::string::npos)
      << twice;
  EXPECT_NE(twice.find("'a' is popped by layers 2, 3"), std::string::npos)
      << twice;
  // Errors of different names, in the order of their layers.
  const auto names = layout_error(torch::nn::Sequential(
      Stash(std::vector<std::string>{"a"}), Pop("b"), Pop("c")));
  EXPECT_EQ(names.rfind("gpipe: the skip layout has 3 errors:", 0), 0u)
      << names;
  const auto a =
      names.find("(1) skip 'a' is stashed by layer 0 but never popped");
  const auto b =
      names.find("(2) skip 'b' is popped by layer 1 but never stashed");
  const auto c =
      names.find("(3) skip 'c' is popped by layer 2 but never stashed");
  EXPECT_NE(a, std::string::npos) << names;
  EXPECT_NE(b, std::string::npos) << names;
  EXPECT_NE(c, std::string::npos) << names;
}

namespace {

/// Declares its stashes and pops and does none of them.
struct IdleImpl : torch::nn::Module, gpipe::skip::Skippable {
  IdleImpl(std::vector<std::string> stashes, std::vector<std::string> pops)
      : Skippable(std::move(stashes), std::move(pops)) {}
  torch::Tensor forward(const torch::Tensor& x) {
    return x * 2;
  }
};
TORCH_MODULE(Idle);

} // namespace

TEST(Skip, OutsideAPipeAPopWhoseDeclaredStashDidNotHappenIsAnError) {
  // torchgpipe's test_declare_but_not_use, stash half: the plain Sequential
  // reports what the pipe does.
  const auto x = torch::randn({4, kWidth});
  torch::nn::Sequential seq(
      Idle(std::vector<std::string>{"a"}, std::vector<std::string>{}),
      Pop("a"));
  const auto plain = error_of([&] { seq->forward(x); });
  EXPECT_EQ(
      plain,
      "gpipe: skip 'a' was popped before it was stashed outside a pipe: the "
      "layer that declares its stash did not stash it, or it was popped twice");
  Pipe pipe(seq, GPipeOptions(1));
  const auto piped = error_of([&] { pipe->forward(x); });
  EXPECT_NE(
      piped.find("'a' was popped before it was stashed in partition 0"),
      std::string::npos)
      << piped;
}

TEST(
    Skip,
    OutsideAPipeAStashWhoseDeclaredPopDidNotHappenIsAnErrorAtTheNextForward) {
  // torchgpipe's test_declare_but_not_use, pop half. LibTorch has no hook
  // around a module's forward, so the store sees the missed pop when the
  // name is stashed again (Note [Skips outside a pipe]).
  const auto x = torch::randn({4, kWidth});
  torch::nn::Sequential seq(
      Stash(std::vector<std::string>{"a"}),
      Idle(std::vector<std::string>{}, std::vector<std::string>{"a"}));
  seq->forward(x);
  EXPECT_EQ(
      error_of([&] { seq->forward(x); }),
      "gpipe: skip 'a' was stashed again outside a pipe before its last stash "
      "was popped: the layer that declares its pop did not pop it, or a "
      "forward stopped between the stash and the pop (a skip is stashed once "
      "and popped once per forward, as in a pipe)");
  // The error released the stale tensor: the store is empty again, so a
  // model that pops trains on this thread as before.
  auto good = make_fan_out();
  EXPECT_NO_THROW(good->forward(x));
  Pipe pipe(seq, GPipeOptions(2));
  const auto piped = error_of([&] { pipe->forward(x); });
  EXPECT_NE(
      piped.find("skip 'a' was not popped in partition 1"), std::string::npos)
      << piped;
}

namespace {

/// Declares that it stashes "a", then stashes "b".
struct UndeclaredStashImpl : torch::nn::Module, gpipe::skip::Skippable {
  UndeclaredStashImpl() : Skippable(/*stashes=*/{"a"}, /*pops=*/{}) {}
  torch::Tensor forward(const torch::Tensor& x) {
    stash("b", x);
    stash("a", x);
    return x;
  }
};
TORCH_MODULE(UndeclaredStash);

/// Declares that it pops "a", then pops "c".
struct UndeclaredPopImpl : torch::nn::Module, gpipe::skip::Skippable {
  UndeclaredPopImpl() : Skippable(/*stashes=*/{}, /*pops=*/{"a"}) {}
  torch::Tensor forward(const torch::Tensor& x) {
    return x + pop("c");
  }
};
TORCH_MODULE(UndeclaredPop);

} // namespace

TEST(Skip, AStashOrPopOfAnUndeclaredNameIsAnError) {
  const auto x = torch::randn({4, kWidth});
  torch::nn::Sequential stashes(UndeclaredStash(), Pop("a"));
  const auto plain_message = error_of([&] { stashes->forward(x); });
  EXPECT_NE(plain_message.find("does not declare"), std::string::npos)
      << plain_message;
  Pipe stash_pipe(stashes, GPipeOptions(2).microbatches(2));
  const auto stash_message = error_of([&] { stash_pipe->forward(x); });
  EXPECT_NE(stash_message.find("does not declare"), std::string::npos)
      << stash_message;
  EXPECT_NE(stash_message.find("'b'"), std::string::npos) << stash_message;

  Pipe pop_pipe(
      torch::nn::Sequential(
          Stash(std::vector<std::string>{"a"}), UndeclaredPop()),
      GPipeOptions(2).microbatches(2));
  const auto pop_message = error_of([&] { pop_pipe->forward(x); });
  EXPECT_NE(pop_message.find("does not declare"), std::string::npos)
      << pop_message;
  EXPECT_NE(pop_message.find("'c'"), std::string::npos) << pop_message;
}

namespace {

/// Weak references to the storage of every tensor a RecordingStash stashed
/// (forwards of several lanes may record at once).
struct Recorded {
  std::mutex mutex;
  std::vector<c10::weak_intrusive_ptr<c10::StorageImpl>> storages;

  std::vector<c10::weak_intrusive_ptr<c10::StorageImpl>> snapshot() {
    std::lock_guard<std::mutex> lock(mutex);
    return storages;
  }
};

/// Stashes 2x its input under "a" (a tensor nothing else holds: the
/// multiplication by a constant saves nothing for backward) and returns
/// its input; records a weak reference to the stashed tensor's storage, so
/// that a view or a detached alias kept anywhere keeps it alive too.
struct RecordingStashImpl : torch::nn::Module, gpipe::skip::Skippable {
  explicit RecordingStashImpl(std::shared_ptr<Recorded> recorded_)
      : Skippable(/*stashes=*/{"a"}, /*pops=*/{}),
        recorded(std::move(recorded_)) {}
  torch::Tensor forward(const torch::Tensor& x) {
    auto skip = x * 2;
    if (!gpipe::is_recomputing()) { // a recompute's stash is never sent
      std::lock_guard<std::mutex> lock(recorded->mutex);
      recorded->storages.push_back(skip.storage().getWeakStorageImpl());
    }
    stash("a", skip);
    return x;
  }
  std::shared_ptr<Recorded> recorded;
};
TORCH_MODULE(RecordingStash);

} // namespace

TEST(Skip, NoSkipTensorOutlivesItsStepOrItsBackward) {
  const auto x = torch::randn({kBatch, kWidth});
  const auto y = torch::randn({kBatch, kWidth});
  for (const auto mode : gpipe_test::kCheckpointModes) {
    for (const auto schedule : gpipe_test::kForwardAndEverySchedule) {
      if (!gpipe_test::runs_on(schedule, 3)) {
        continue; // {2, 2, 2}
      }
      const auto what = describe(mode, schedule);
      auto recorded = std::make_shared<Recorded>();
      torch::nn::Sequential seq(
          torch::nn::Linear(kWidth, kWidth),
          RecordingStash(recorded),
          torch::nn::Linear(kWidth, kWidth),
          torch::nn::Linear(kWidth, kWidth),
          Pop("a"),
          torch::nn::Linear(kWidth, kWidth));
      Pipe pipe(seq, pipe_options({2, 2, 2}, mode, schedule));
      auto input = x.clone().requires_grad_();
      if (schedule) {
        pipe->options.schedule(*schedule);
        pipe->step(input, y, mse);
      } else {
        auto out = pipe->forward(input);
        (out * y).sum().backward();
        out.reset();
      }
      // The pipe is still alive: it must not hold any skip tensor.
      const auto storages = recorded->snapshot();
      ASSERT_GE(storages.size(), static_cast<size_t>(kMicrobatches)) << what;
      for (size_t k = 0; k < storages.size(); ++k) {
        EXPECT_TRUE(storages[k].expired()) << what << ", stash #" << k;
      }
    }
  }
}

namespace {

/// The identity, counting its backwards: at each, how many of the recorded
/// skip storages are already freed.
struct ProbeImpl : torch::nn::Module {
  explicit ProbeImpl(std::shared_ptr<Recorded> recorded_)
      : recorded(std::move(recorded_)) {}
  torch::Tensor forward(const torch::Tensor& x) {
    auto y = x.clone();
    if (y.requires_grad()) {
      auto seen = recorded;
      auto freed_counts = freed;
      y.register_hook([seen, freed_counts](const torch::Tensor& grad) {
        size_t expired = 0;
        for (const auto& storage : seen->snapshot()) {
          expired += storage.expired() ? 1 : 0;
        }
        std::lock_guard<std::mutex> lock(seen->mutex);
        freed_counts->push_back(expired);
        return grad;
      });
    }
    return y;
  }
  std::shared_ptr<Recorded> recorded;
  std::shared_ptr<std::vector<size_t>> freed =
      std::make_shared<std::vector<size_t>>();
};
TORCH_MODULE(Probe);

} // namespace

TEST(Skip, ASkipTensorIsFreedAsSoonAsItsPopsBackwardIsDone) {
  // Partition 0 stashes, partition 2 pops; partition 1's probe runs its
  // backward for a micro-batch after partition 2's backward of the same
  // micro-batch, so at its k-th backward at least k skips must be freed
  // (the pipe keeps none until the end of the step).
  const auto x = torch::randn({kBatch, kWidth});
  const auto y = torch::randn({kBatch, kWidth});
  for (const auto mode : gpipe_test::kCheckpointModes) {
    for (const auto schedule : gpipe_test::kForwardAndEverySchedule) {
      if (!gpipe_test::runs_on(schedule, 3)) {
        continue; // {2, 2, 2}
      }
      const auto what = describe(mode, schedule);
      auto recorded = std::make_shared<Recorded>();
      Probe probe(recorded);
      torch::nn::Sequential seq(
          torch::nn::Linear(kWidth, kWidth),
          RecordingStash(recorded),
          torch::nn::Linear(kWidth, kWidth),
          probe,
          Pop("a"),
          torch::nn::Linear(kWidth, kWidth));
      Pipe pipe(seq, pipe_options({2, 2, 2}, mode, schedule));
      auto input = x.clone().requires_grad_();
      if (schedule) {
        pipe->options.schedule(*schedule);
        pipe->step(input, y, mse);
      } else {
        (pipe->forward(input) * y).sum().backward();
      }
      const auto& freed = *probe->freed;
      ASSERT_EQ(freed.size(), static_cast<size_t>(kMicrobatches)) << what;
      for (size_t k = 0; k < freed.size(); ++k) {
        EXPECT_GE(freed[k], k + 1) << what << ", backward #" << k;
      }
    }
  }
}

namespace {

/// Stashes its Linear's output (which nothing saves) and hands it on.
struct StashLinearImpl : torch::nn::Cloneable<StashLinearImpl>,
                         gpipe::skip::Skippable {
  StashLinearImpl() : Skippable(/*stashes=*/{"a"}, /*pops=*/{}) {
    reset();
  }
  void reset() override {
    linear = register_module("linear", torch::nn::Linear(kWidth, kWidth));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto y = linear(x);
    stash("a", y);
    return y;
  }
  torch::nn::Linear linear{nullptr};
};
TORCH_MODULE(StashLinear);

/// Adds a learned position table, which it also stashes: a skip made from
/// a parameter alone, off the path from the partition's input.
struct StashPositionsImpl : torch::nn::Cloneable<StashPositionsImpl>,
                            gpipe::skip::Skippable {
  StashPositionsImpl() : Skippable(/*stashes=*/{"positions"}, /*pops=*/{}) {
    reset();
  }
  void reset() override {
    positions = register_parameter("positions", torch::randn({1, kWidth}));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto table = positions.expand_as(x);
    stash("positions", table);
    return x + table;
  }
  torch::Tensor positions;
};
TORCH_MODULE(StashPositions);

torch::nn::ReLU in_place_relu() {
  return torch::nn::ReLU(torch::nn::ReLUOptions().inplace(true));
}

} // namespace

TEST(Skip, AStashedTensorWrittenInPlaceBeforeItsPopIsAnError) {
  // Plain training would pop the written tensor with the ReLU in its
  // gradient path; a pipe sends the stash as it was, so it must refuse.
  const auto x = torch::randn({kBatch, kWidth});
  const auto y = torch::randn({kBatch, kOut});
  // Layers: Linear, StashLinear | ReLU_ ... Pop ... : with balance
  // {2, 2, 2} the in-place ReLU writes in a partition between the stash and
  // the pop; with {2, 3, 1} it writes in the popping partition, before the
  // pop.
  const std::vector<std::vector<int64_t>> balances = {{2, 2, 2}, {2, 3, 1}};
  for (const auto& balance : balances) {
    for (const auto mode : gpipe_test::kCheckpointModes) {
      for (const auto schedule : gpipe_test::kForwardAndEverySchedule) {
        if (!gpipe_test::runs_on(
                schedule, static_cast<int64_t>(balance.size()))) {
          continue;
        }
        const auto what = describe(mode, schedule);
        torch::nn::Sequential seq(
            torch::nn::Linear(kWidth, kWidth),
            StashLinear(),
            in_place_relu(),
            torch::nn::Linear(kWidth, kWidth),
            Pop("a"),
            torch::nn::Linear(kWidth, kOut));
        Pipe pipe(seq, pipe_options(balance, mode, schedule));
        const auto message = error_of([&] {
          auto input = x.clone().requires_grad_();
          if (schedule) {
            pipe->options.schedule(*schedule);
            pipe->step(input, y, mse);
          } else {
            (pipe->forward(input) * y).sum().backward();
          }
        });
        EXPECT_NE(message.find("'a' was written in place"), std::string::npos)
            << what << ": " << message;
      }
    }
  }
}

TEST(Skip, AWriteInPlaceAfterTheStashInItsOwnPartitionTrainsLikePlain) {
  // Stash, then an in-place ReLU in the same partition: the stash leaves
  // its partition written, with the ReLU in its path, as in plain training.
  expect_trains_like_plain(
      [] {
        torch::manual_seed(3);
        return torch::nn::Sequential(
            torch::nn::Linear(kWidth, kWidth),
            StashLinear(),
            in_place_relu(),
            torch::nn::Linear(kWidth, kWidth),
            Pop("a"),
            torch::nn::Linear(kWidth, kOut));
      },
      {3, 2, 1});
}

TEST(Skip, ASkipMadeFromParametersAloneKeepsItsGradientWhenIAndWSplit) {
  // Partition 1's input requires grad, so ZB-H1 splits its backward; the
  // stashed table's root does not lead to the input and must not be lost.
  expect_trains_like_plain(
      [] {
        torch::manual_seed(4);
        return torch::nn::Sequential(
            torch::nn::Linear(kWidth, kWidth),
            torch::nn::Linear(kWidth, kWidth),
            StashPositions(),
            torch::nn::Linear(kWidth, kWidth),
            Pop("positions"),
            torch::nn::Linear(kWidth, kOut));
      },
      {2, 2, 2});
}

TEST(Skip, SkipsBetweenAGpuAndTheCpuTrainLikePlainOnEverySchedule_CUDA) {
  if (!gpipe_test::cuda_available()) {
    GTEST_SKIP() << "no CUDA device is present";
  }
  // Partition 0 (cuda:0): Down(l1), Down(l2)   partition 1 (cpu): Down(l3), Mid
  // partition 2 (cuda:0): Up(l3), Up(l2)       partition 3 (cpu): Up(l1), Head
  // so 'l3/down' goes from the CPU to the GPU, 'l2/down' stays on the GPU
  // across a CPU partition, 'l1/down' goes from the GPU to the CPU. cuda:0
  // and the CPU are two lanes: interleaved 1F1B runs with V = 2.
  const std::vector<torch::Device> devices = {
      torch::Device("cuda:0"),
      torch::kCPU,
      torch::Device("cuda:0"),
      torch::kCPU};
  const auto x = torch::randn({kBatch, kWidth});
  const auto y = torch::randn({kBatch, kOut});
  for (const auto mode : gpipe_test::kCheckpointModes) {
    for (const auto schedule : gpipe_test::kForwardAndEverySchedule) {
      if (schedule && gpipe::places_stages_in_a_v(*schedule)) {
        continue; // a lane per device: partition j on lane j mod 2, no V
      }
      auto seq = make_unet();
      const auto expected =
          train_once(clone_of(seq), std::nullopt, schedule, x, y);
      const auto options = GPipeOptions(4)
                               .balance({2, 2, 2, 2})
                               .microbatches(kMicrobatches)
                               .checkpoint(mode)
                               .devices(devices);
      const auto actual = train_once(seq, options, schedule, x, y);
      gpipe_test::expect_close(
          actual, expected, 1e-5, describe(mode, schedule));
    }
  }
}

} // namespace skip_test
