// A pipe's life around its calls: what a second backward, a retry, a leak,
// a changed model or option, a batch-reducing layer and an error's type do;
// and checkpoints that do not depend on the partition count.
#include "test_support.h"

#include <cstdio>
#include <filesystem>

namespace lifecycle_test {

using gpipe::Checkpoint;
using gpipe::GPipe;
using gpipe::GPipeOptions;
using gpipe::Schedule;
using gpipe_test::error_of;
using gpipe_test::grads_of;
using gpipe_test::make_mlp;

namespace {

using Pipe = GPipe<torch::nn::Sequential>;

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

size_t count_of(const std::string& text, const std::string& part) {
  size_t count = 0;
  for (auto at = text.find(part); at != std::string::npos;
       at = text.find(part, at + 1)) {
    ++count;
  }
  return count;
}

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() /
          ("gpipe_" + name + "_" + std::to_string(::getpid()) + ".pt"))
      .string();
}

} // namespace

TEST(Lifecycle, ASecondBackwardWithoutRetainGraphFailsAsPlainTrainingDoes) {
  for (const auto mode : gpipe_test::kCheckpointModes) {
    Pipe pipe(make_mlp(2, 3), GPipeOptions(2).microbatches(2).checkpoint(mode));
    auto loss = pipe(torch::randn({4, 3})).sum();
    loss.backward();
    const auto message = error_of([&] { loss.backward(); });
    EXPECT_TRUE(contains(message, "second time")) << message;
  }
}

TEST(Lifecycle, ARetryAfterAFailedRetainedBackwardSucceeds) {
  for (const auto mode : gpipe_test::kCheckpointModes) {
    std::atomic<int> failures{1};
    auto seq = make_mlp(2, 3, 4);
    auto plain = gpipe_test::clone_of(seq);
    seq->ptr(0)->parameters()[0].register_hook([&](torch::Tensor g) {
      TORCH_CHECK(failures-- <= 0, "flaky hook");
      return g;
    });
    Pipe pipe(seq, GPipeOptions(2).microbatches(2).checkpoint(mode));
    const auto x = torch::randn({4, 3});
    auto loss = pipe(x).sum();
    EXPECT_TRUE(contains(
        error_of([&] { loss.backward({}, /*retain_graph=*/true); }),
        "flaky hook"));
    for (auto& p : seq->parameters()) {
      p.mutable_grad().reset();
    }
    loss.backward();
    plain->forward(x).sum().backward();
    gpipe_test::expect_close(
        grads_of(seq->parameters()),
        grads_of(plain->parameters()),
        1e-6,
        gpipe::to_string(mode));
  }
}

TEST(Lifecycle, ACheckpointedPartitionReturningItsInputDoesNotLeak) {
  for (const auto mode : gpipe_test::kCheckpointModes) {
    torch::nn::Sequential seq(torch::nn::Identity(), torch::nn::Dropout(0.0));
    Pipe pipe(seq, GPipeOptions(1).checkpoint(mode));
    const auto x = torch::randn({4, 3}).requires_grad_();
    auto out = pipe(x);
    const std::weak_ptr<torch::autograd::Node> node = out.grad_fn();
    ASSERT_FALSE(node.expired());
    out.reset();
    EXPECT_TRUE(node.expired()) << gpipe::to_string(mode);
  }
}

TEST(Lifecycle, ALayerThatReducesOverTheBatchIsExplained) {
  auto seq = make_mlp(1, 3);
  seq->push_back(torch::nn::Functional(
      [](const torch::Tensor& h) { return h.sum(0, /*keepdim=*/true); }));
  Pipe pipe(seq, GPipeOptions(2).microbatches(2));
  const auto message = error_of([&] { pipe(torch::randn({4, 3})); });
  EXPECT_EQ(
      message.rfind(
          "gpipe: partition 1 changed the batch dimension on micro-batch 0 "
          "(input shape: [2, 3], output shape: [1, 3])",
          0),
      0u)
      << message;

  auto seq2 = make_mlp(1, 3);
  seq2->push_back(
      torch::nn::Functional([](const torch::Tensor& h) { return h.mean(); }));
  Pipe pipe2(seq2, GPipeOptions(2).microbatches(2));
  EXPECT_TRUE(contains(
      error_of([&] {
        pipe2(torch::randn({4, 3}));
      }),
      "changed the batch dimension"));
  // One micro-batch is plain training: nothing to split, nothing to refuse.
  pipe2->options.microbatches(1);
  EXPECT_EQ(pipe2(torch::randn({4, 3})).dim(), 0);
}

TEST(Lifecycle, AnErrorKeepsItsTypeAndNamesItsCellOnce) {
  auto oom_layer = [](torch::Tensor h) {
    TORCH_CHECK_WITH(OutOfMemoryError, h.size(0) != 1, "pretend OOM");
    return h;
  };
  auto seq = make_mlp(2, 3);
  seq->push_back(torch::nn::Functional(oom_layer));
  Pipe pipe(seq, GPipeOptions(2).microbatches(4));
  try {
    pipe(torch::randn({7, 3}));
    FAIL() << "no error";
  } catch (const c10::OutOfMemoryError& e) {
    const std::string message = e.what_without_backtrace();
    EXPECT_TRUE(contains(message, "pretend OOM")) << message;
    EXPECT_EQ(
        count_of(
            message, "gpipe: partition 1 failed on micro-batch 3 in forward"),
        1u)
        << message;
  }
  // Backward under step(): the cell and the step each see the error; the
  // context appears once.
  auto seq2 = make_mlp(2, 3);
  seq2->push_back(torch::nn::Functional([](torch::Tensor h) {
    if (h.requires_grad() && h.size(0) == 1) {
      h = h.clone();
      h.register_hook([](torch::Tensor) -> torch::Tensor {
        TORCH_CHECK_WITH(OutOfMemoryError, false, "pretend OOM in backward");
      });
    }
    return h;
  }));
  for (const auto mode : gpipe_test::kCheckpointModes) {
    Pipe pipe2(seq2, GPipeOptions(2).microbatches(4).checkpoint(mode));
    try {
      pipe2->step(
          torch::randn({7, 3}),
          torch::randn({7, 3}),
          [](const torch::Tensor& o, const torch::Tensor& t) {
            return torch::mse_loss(o, t);
          });
      FAIL() << "no error";
    } catch (const c10::OutOfMemoryError& e) {
      const std::string message = e.what_without_backtrace();
      EXPECT_EQ(count_of(message, "gpipe: partition"), 1u) << message;
      EXPECT_TRUE(contains(message, "micro-batch 3 in backward")) << message;
    }
    // The pipe stays usable: a batch of 8 has no single-row micro-batch.
    EXPECT_EQ(
        error_of([&] {
          pipe2(torch::randn({8, 3})).sum().backward();
        }),
        "(no error)");
  }
}

TEST(Lifecycle, AChangedSequentialIsReportedAtTheNextCall) {
  auto seq = make_mlp(2, 3);
  Pipe pipe(seq, GPipeOptions(2));
  seq->push_back(torch::nn::Linear(3, 3));
  EXPECT_EQ(
      error_of([&] {
        pipe(torch::randn({2, 3}));
      }),
      "gpipe: the Sequential changed after the pipe was built (layers: 4 "
      "then, 5 now); a pipe splits the layers it was given: build a new "
      "GPipe around the changed Sequential");
}

TEST(Lifecycle, StructuralOptionsAreFixedAndPerCallKnobsAreNot) {
  Pipe pipe(make_mlp(3, 3), GPipeOptions(2));
  const auto x = torch::randn({4, 3});
  pipe->options.partitions(3);
  EXPECT_TRUE(contains(
      error_of([&] { pipe(x); }),
      "gpipe: partitions is fixed when the pipe is built (partitions: 2 then, 3 now)"));
  pipe->options.partitions(2).balance({4, 2});
  EXPECT_TRUE(contains(
      error_of([&] { pipe(x); }),
      "gpipe: balance is fixed when the pipe is built (balance: 3, 3 then, 4, 2 now)"));
  pipe->options.balance({3, 3}).concurrent_cpu_partitions(true);
  EXPECT_TRUE(contains(
      error_of([&] { pipe(x); }), "concurrent_cpu_partitions is fixed"));
  pipe->options.concurrent_cpu_partitions(false).devices(
      {torch::kCPU, torch::kCPU, torch::kCPU});
  EXPECT_TRUE(contains(error_of([&] { pipe(x); }), "devices is fixed"));
  pipe->options.devices({torch::kCPU, torch::kCPU});
  pipe->options.microbatches(4)
      .checkpoint(Checkpoint::Always)
      .schedule(Schedule::OneFOneB);
  EXPECT_EQ(pipe(x).size(0), 4);
  std::ostringstream printed;
  pipe->pretty_print(printed);
  EXPECT_EQ(
      printed.str(),
      "gpipe::GPipe(partitions=2, microbatches=4, checkpoint=always, balance=[3, 3], devices=[cpu, cpu])");
}

TEST(Lifecycle, NamesAreTheSequentialsWhateverThePartitionCount) {
  auto seq = make_mlp(4, 3);
  std::vector<std::string> expected;
  for (const auto& item : seq->named_parameters()) {
    expected.push_back(item.key());
  }
  for (const int64_t k : {1, 2, 4}) {
    Pipe pipe(seq, GPipeOptions(k));
    std::vector<std::string> names;
    for (const auto& item : pipe->named_parameters()) {
      names.push_back(item.key());
    }
    EXPECT_EQ(names, expected) << "K=" << k;
  }
}

TEST(Lifecycle, CheckpointsMoveBetweenThePlainSequentialAndPipesOfAnyShape) {
  const auto path = temp_path("portable");
  auto source = make_mlp(4, 3, /*seed=*/1);
  torch::save(source, path);
  const auto x = torch::randn({6, 3});
  const auto reference = source->forward(x).detach();

  // Plain -> pipes of every shape.
  const std::vector<GPipeOptions> shapes{
      GPipeOptions(1),
      GPipeOptions(2),
      GPipeOptions(2).balance({1, 7}),
      GPipeOptions(4).microbatches(3)};
  for (const auto& shape : shapes) {
    auto seq = make_mlp(4, 3, /*seed=*/2); // other weights
    Pipe pipe(seq, shape);
    torch::load(pipe, path);
    EXPECT_TRUE(torch::equal(pipe(x), reference)) << "K=" << shape.partitions();
  }
  // A pipe's checkpoint -> the plain Sequential and a pipe of another K.
  const auto pipe_path = temp_path("from_pipe");
  {
    auto seq = make_mlp(4, 3, /*seed=*/1);
    Pipe pipe(seq, GPipeOptions(2));
    torch::save(pipe, pipe_path);
  }
  auto plain = make_mlp(4, 3, /*seed=*/3);
  torch::load(plain, pipe_path);
  EXPECT_TRUE(torch::equal(plain->forward(x), reference));
  auto seq4 = make_mlp(4, 3, /*seed=*/3);
  Pipe pipe4(seq4, GPipeOptions(4));
  torch::load(pipe4, pipe_path);
  EXPECT_TRUE(torch::equal(pipe4(x), reference));
  // ... and they train identically from there.
  torch::optim::SGD plain_sgd(plain->parameters(), 0.1);
  torch::optim::SGD pipe_sgd(pipe4->parameters(), 0.1);
  for (int step = 0; step < 3; ++step) {
    const auto xs = torch::randn({8, 3});
    plain_sgd.zero_grad();
    plain->forward(xs).pow(2).sum().backward();
    plain_sgd.step();
    pipe_sgd.zero_grad();
    pipe4(xs).pow(2).sum().backward();
    pipe_sgd.step();
  }
  gpipe_test::expect_close(
      pipe4->parameters(), plain->parameters(), 1e-6, "after training");
  std::remove(path.c_str());
  std::remove(pipe_path.c_str());
}

TEST(Lifecycle, ToAnotherDeviceIsRefused_CUDA) {
  if (!gpipe_test::cuda_available()) {
    GTEST_SKIP() << "no CUDA device";
  }
  Pipe pipe(
      make_mlp(2, 3), GPipeOptions(2).devices({torch::kCPU, torch::kCPU}));
  EXPECT_TRUE(contains(
      error_of([&] { pipe->to(torch::Device(torch::kCUDA, 0)); }),
      "would move every partition of the pipe to one device"));
}

TEST(Lifecycle, AModuleSharedByPartitionsOnDifferentDevicesIsRejected_CUDA) {
  if (!gpipe_test::cuda_available()) {
    GTEST_SKIP() << "no CUDA device";
  }
  torch::nn::Linear shared(3, 3);
  torch::nn::Sequential seq(shared, torch::nn::Tanh(), shared);
  EXPECT_TRUE(contains(
      error_of([&] {
        Pipe pipe(
            seq,
            GPipeOptions(2).balance({2, 1}).devices(
                {torch::Device(torch::kCUDA, 0), torch::kCPU}));
      }),
      "gpipe: a module is used by partitions 0 and 1, which are on different devices"));
}

} // namespace lifecycle_test
