// The memory meter: exact bytes on the CPU, the caching allocator on GPUs.
#include "test_support.h"

#include <gpipe/memory.h>

#include <thread>

namespace memory_test {

namespace {

constexpr int64_t kFourMegabytes = 4 * 1024 * 1024;

} // namespace

TEST(Memory, CpuMeterSeesAFourMegabyteTensorExactly) {
  gpipe::track_cpu_memory();
  const torch::Device cpu(torch::kCPU);
  gpipe::MemoryMeter meter({cpu});
  {
    auto t = torch::empty({kFourMegabytes / 4}, torch::kFloat);
    EXPECT_EQ(
        gpipe::memory_stats(cpu).current_bytes - meter.start_bytes(cpu),
        kFourMegabytes);
  }
  EXPECT_EQ(meter.peak_increase_bytes(cpu), kFourMegabytes);
  // Freed: back where it started, the peak stays.
  EXPECT_EQ(gpipe::memory_stats(cpu).current_bytes, meter.start_bytes(cpu));
  EXPECT_EQ(meter.peak_bytes(cpu), meter.start_bytes(cpu) + kFourMegabytes);
}

TEST(Memory, PeakMemoryOfARegionIsItsLargestMomentNotItsSum) {
  gpipe::track_cpu_memory();
  const torch::Device cpu(torch::kCPU);
  const int64_t before = gpipe::memory_stats(cpu).current_bytes;
  const int64_t peak = gpipe::peak_bytes_during(cpu, [] {
    { auto a = torch::empty({kFourMegabytes}, torch::kUInt8); }
    { auto b = torch::empty({2 * kFourMegabytes}, torch::kUInt8); }
  });
  EXPECT_EQ(peak - before, 2 * kFourMegabytes);
}

TEST(Memory, PeakBytesDuringIsAbsoluteAndPeakIncreaseBytesDuringIsTheRise) {
  gpipe::track_cpu_memory();
  const torch::Device cpu(torch::kCPU);
  const auto kept = torch::empty({kFourMegabytes}, torch::kUInt8);
  const int64_t before = gpipe::memory_stats(cpu).current_bytes;
  auto region = [] { auto a = torch::empty({kFourMegabytes}, torch::kUInt8); };
  EXPECT_EQ(gpipe::peak_bytes_during(cpu, region), before + kFourMegabytes);
  EXPECT_EQ(gpipe::peak_increase_bytes_during(cpu, region), kFourMegabytes);
}

TEST(Memory, TheDeprecatedPeakMemoryStillGivesTheAbsolutePeak) {
  gpipe::track_cpu_memory();
  const torch::Device cpu(torch::kCPU);
  const int64_t before = gpipe::memory_stats(cpu).current_bytes;
  auto region = [] { auto a = torch::empty({kFourMegabytes}, torch::kUInt8); };
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
  EXPECT_EQ(gpipe::peak_memory(cpu, region), before + kFourMegabytes);
#pragma GCC diagnostic pop
}

TEST(Memory, CpuMeterCountsAllocationsOfOtherThreads) {
  gpipe::track_cpu_memory();
  const torch::Device cpu(torch::kCPU);
  gpipe::MemoryMeter meter({cpu});
  torch::Tensor kept;
  std::thread worker(
      [&] { kept = torch::empty({kFourMegabytes}, torch::kUInt8); });
  worker.join();
  EXPECT_EQ(meter.peak_increase_bytes(cpu), kFourMegabytes);
  kept.reset();
  EXPECT_EQ(gpipe::memory_stats(cpu).current_bytes, meter.start_bytes(cpu));
}

TEST(Memory, TensorsOfTheCountingAllocatorComputeAndCopyNormally) {
  gpipe::track_cpu_memory();
  auto a = torch::arange(12, torch::kFloat).reshape({3, 4});
  auto b = a.clone();
  b.resize_({6, 4});
  EXPECT_TRUE(torch::equal(b.slice(0, 0, 3), a));
  EXPECT_FLOAT_EQ(a.sum().item<float>(), 66.0f);
}

TEST(Memory, MeterRejectsADeviceItDoesNotMeasure) {
  gpipe::MemoryMeter meter({torch::Device(torch::kCPU)});
  const auto message =
      gpipe_test::error_of([&] { meter.peak_bytes(torch::Device("cuda:3")); });
  EXPECT_NE(message.find("(device: cuda:3)"), std::string::npos) << message;
}

TEST(Memory, CudaMeterSeesAFourMegabyteTensor_CUDA) {
  if (!gpipe_test::cuda_available()) {
    GTEST_SKIP() << "no CUDA device is present";
  }
  const torch::Device gpu("cuda:0");
  gpipe::MemoryMeter meter({gpu});
  {
    auto t = torch::empty(
        {kFourMegabytes / 4},
        torch::TensorOptions().dtype(torch::kFloat).device(gpu));
    EXPECT_EQ(
        gpipe::memory_stats(gpu).current_bytes - meter.start_bytes(gpu),
        kFourMegabytes);
  }
  EXPECT_EQ(meter.peak_increase_bytes(gpu), kFourMegabytes);
}

TEST(Memory, RawAllocationsThroughTheCountingAllocatorAreCountedAndFreed) {
  // Some CPU kernels allocate through raw_allocate, which needs a block's
  // context to be its data pointer.
  gpipe::track_cpu_memory();
  const torch::Device cpu(torch::kCPU);
  gpipe::MemoryMeter meter({cpu});
  auto* allocator = c10::GetCPUAllocator();
  void* raw = allocator->raw_allocate(kFourMegabytes);
  ASSERT_NE(raw, nullptr);
  EXPECT_EQ(
      gpipe::memory_stats(cpu).current_bytes - meter.start_bytes(cpu),
      kFourMegabytes);
  allocator->raw_deallocate(raw);
  EXPECT_EQ(gpipe::memory_stats(cpu).current_bytes, meter.start_bytes(cpu));
}

} // namespace memory_test
