// The same promises on GPUs. Skipped where there is none.
#include "test_support.h"

#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>

namespace cuda_test {

using gpipe::Checkpoint;
using gpipe::GPipe;
using gpipe::GPipeOptions;
using gpipe_test::clone_of;
using gpipe_test::grads_of;
using gpipe_test::make_mlp;

namespace {

void expect_trains_like_plain_on(
    const std::vector<torch::Device>& devices,
    Checkpoint mode) {
  auto seq = make_mlp(4, 16, 1);
  auto plain = clone_of(seq);
  plain->to(torch::kCPU);
  GPipe<torch::nn::Sequential> pipe(
      seq,
      GPipeOptions(static_cast<int64_t>(devices.size()))
          .microbatches(4)
          .devices(devices)
          .checkpoint(mode));
  const auto x = torch::randn({10, 16});
  const auto y = torch::randn({10, 16});
  auto x_pipe = x.clone().requires_grad_();
  auto x_plain = x.clone().requires_grad_();
  const auto out = pipe(x_pipe);
  EXPECT_EQ(out.device(), devices.back());
  torch::mse_loss(out, y.to(out.device())).backward();
  torch::mse_loss(plain->forward(x_plain), y).backward();
  gpipe_test::expect_close(
      grads_of(seq->parameters()), grads_of(plain->parameters()), 1e-5, "grad");
  EXPECT_LE(gpipe_test::max_abs_diff(x_pipe.grad(), x_plain.grad()), 1e-5);
}

} // namespace

TEST(Cuda, PartitionsSharingOneGpuTrainLikePlain_CUDA) {
  SKIP_WITHOUT_CUDA();
  const torch::Device gpu("cuda:0");
  for (const auto mode :
       {Checkpoint::Never, Checkpoint::ExceptLast, Checkpoint::Always}) {
    expect_trains_like_plain_on({gpu, gpu, gpu, gpu}, mode);
  }
}

TEST(Cuda, PartitionsMixingGpuAndCpuTrainLikePlain_CUDA) {
  SKIP_WITHOUT_CUDA();
  const torch::Device gpu("cuda:0");
  for (const auto mode : {Checkpoint::Never, Checkpoint::Always}) {
    expect_trains_like_plain_on({gpu, torch::kCPU, gpu, torch::kCPU}, mode);
  }
}

TEST(Cuda, PartitionsOnEveryGpuTrainLikePlain_MultiCUDA) {
  if (torch::cuda::device_count() < 2) {
    GTEST_SKIP() << "fewer than two CUDA devices";
  }
  std::vector<torch::Device> devices;
  for (size_t d = 0; d < torch::cuda::device_count(); ++d) {
    devices.emplace_back(torch::kCUDA, static_cast<c10::DeviceIndex>(d));
  }
  expect_trains_like_plain_on(devices, Checkpoint::ExceptLast);
}

TEST(Cuda, DefaultDevicesAreTheGpusRoundRobin_CUDA) {
  SKIP_WITHOUT_CUDA();
  GPipe<torch::nn::Sequential> pipe(make_mlp(2, 2), GPipeOptions(3));
  const auto count = static_cast<c10::DeviceIndex>(torch::cuda::device_count());
  for (c10::DeviceIndex j = 0; j < 3; ++j) {
    EXPECT_EQ(
        pipe->options.devices()[static_cast<size_t>(j)],
        torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(j % count)));
  }
}

TEST(Cuda, DropoutOnGpuIsReplayedAndDeterministic_CUDA) {
  SKIP_WITHOUT_CUDA();
  auto run = [](Checkpoint mode) {
    torch::manual_seed(3);
    torch::nn::Sequential seq(
        torch::nn::Linear(8, 8),
        torch::nn::Dropout(0.5),
        torch::nn::Linear(8, 8),
        torch::nn::Dropout(0.5));
    const torch::Device gpu("cuda:0");
    GPipe<torch::nn::Sequential> pipe(
        seq,
        GPipeOptions(2).microbatches(3).checkpoint(mode).devices({gpu, gpu}));
    torch::manual_seed(5);
    const auto x = torch::randn({9, 8});
    pipe(x).pow(2).sum().backward();
    return grads_of(seq->parameters());
  };
  const auto never = run(Checkpoint::Never);
  gpipe_test::expect_identical(
      run(Checkpoint::Always), never, "always vs never");
  gpipe_test::expect_identical(run(Checkpoint::Never), never, "repeat");
}

TEST(Cuda, GradientsCrossingGpusUnderAUsersStreamEqualPlain_MultiCUDA) {
  // Note [Gradient copies and the engine's streams]: with the user's own
  // stream current on every device, a gradient copied between GPUs in
  // backward must land before the next partition's backward reads it.
  if (torch::cuda::device_count() < 2) {
    GTEST_SKIP() << "fewer than two CUDA devices";
  }
  const torch::Device gpu0("cuda:0");
  const torch::Device gpu1("cuda:1");
  c10::impl::VirtualGuardImpl impl(torch::kCUDA);
  c10::MultiStreamGuard users_streams(std::vector<c10::Stream>{
      impl.getStreamFromGlobalPool(gpu0), impl.getStreamFromGlobalPool(gpu1)});
  for (const auto mode : gpipe_test::kCheckpointModes) {
    expect_trains_like_plain_on({gpu0, gpu1, gpu0, gpu1}, mode);
  }
}

TEST(Cuda, APinnedInputMayBeReusedAsSoonAsForwardReturns_CUDA) {
  SKIP_WITHOUT_CUDA();
  auto seq = make_mlp(2, 256, 1);
  auto plain = clone_of(seq);
  GPipe<torch::nn::Sequential> pipe(
      seq, GPipeOptions(2).devices({torch::Device("cuda:0"), torch::kCPU}));
  plain->to(torch::kCPU);
  auto pinned = torch::randn({512, 256}).pin_memory();
  const auto expected = plain->forward(pinned.clone());
  const auto out = pipe(pinned);
  pinned.zero_(); // the caller reuses its buffer at once
  EXPECT_LE(gpipe_test::max_abs_diff(out, expected), 1e-4);
}

TEST(Cuda, DropoutOnCudaPartitionsWithCpuLanesIsReplayedExactly_CUDA) {
  // CUDA cells used to snapshot and restore the one CPU generator while CPU
  // lanes drew from it; each now records its own draws per operator.
  SKIP_WITHOUT_CUDA();
  const torch::Device gpu("cuda:0");
  torch::manual_seed(3);
  torch::nn::Sequential seq;
  for (int l = 0; l < 4; ++l) {
    seq->push_back(
        torch::nn::Linear(torch::nn::LinearOptions(16, 16).bias(false)));
    seq->push_back(torch::nn::Dropout(0.5));
  }
  GPipe<torch::nn::Sequential> pipe(
      seq,
      GPipeOptions(4)
          .microbatches(8)
          .checkpoint(Checkpoint::Always)
          .concurrent_cpu_partitions(true)
          .devices({gpu, torch::kCPU, gpu, torch::kCPU}));
  const auto x = torch::randn({32, 16}).requires_grad_();
  const auto g = torch::randn({32, 16});
  const auto y = pipe(x);
  (y * g.to(y.device())).sum().backward();
  const double lhs = (x.grad() * x).sum().item<double>();
  const double rhs = (g.to(y.device()) * y).sum().item<double>();
  EXPECT_LT(std::abs(lhs - rhs) / std::abs(rhs), 1e-4);
}

TEST(
    Cuda,
    EveryScheduleTrainsLikePlainWithPartitionsAlternatingGpuAndCpu_CUDA) {
  SKIP_WITHOUT_CUDA();
  // cuda:0 and the CPU are two lanes, so partitions alternate lanes 0, 1, 0,
  // 1: interleaved 1F1B runs with V = 2, and every boundary copies.
  const std::vector<torch::Device> devices = {
      torch::Device("cuda:0"),
      torch::kCPU,
      torch::Device("cuda:0"),
      torch::kCPU};
  const int64_t m = 4;
  const auto x = torch::randn({10, 16});
  const auto y = torch::randn({10, 16});
  auto plain = make_mlp(4, 16, 1);
  torch::mse_loss(plain->forward(x), y).backward();
  for (const auto schedule :
       {gpipe::Schedule::FillDrain,
        gpipe::Schedule::OneFOneB,
        gpipe::Schedule::Interleaved1F1B,
        gpipe::Schedule::ZeroBubbleH1,
        gpipe::Schedule::LoopedBFS}) {
    for (const auto mode : gpipe_test::kCheckpointModes) {
      auto seq = make_mlp(4, 16, 1);
      GPipe<torch::nn::Sequential> pipe(
          seq,
          GPipeOptions(4)
              .microbatches(m)
              .devices(devices)
              .checkpoint(mode)
              .schedule(schedule));
      auto timeline = std::make_shared<gpipe::Timeline>();
      pipe->set_timeline(timeline);
      pipe->step(x, y, [](const torch::Tensor& out, const torch::Tensor& t) {
        return torch::mse_loss(out, t);
      });
      const std::string what = std::string(gpipe::to_string(schedule)) + " " +
          gpipe::to_string(mode);
      auto grads = grads_of(seq->parameters());
      for (auto& g : grads) {
        g = g.to(torch::kCPU);
      }
      gpipe_test::expect_close(
          grads, grads_of(plain->parameters()), 1e-5, what);
      // Activations forward and gradients backward at each of the three
      // boundaries, per micro-batch: gradient copies are recorded too.
      int64_t copies = 0;
      for (const auto& event : timeline->events()) {
        copies += event.phase == gpipe::Phase::Copy ? 1 : 0;
      }
      EXPECT_GE(copies, 2 * 3 * m) << what;
    }
  }
}

} // namespace cuda_test
