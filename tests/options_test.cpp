// Options arrive from config files and casts: a value outside an enum is a
// `gpipe:` error naming the valid values, at construction and at every call
// (options may change between calls), never a silent default.
#include "test_support.h"

namespace options_test {

using gpipe::Checkpoint;
using gpipe::GPipe;
using gpipe::GPipeOptions;
using gpipe::Reduction;
using gpipe::Schedule;
using gpipe_test::error_of;
using gpipe_test::make_mlp;
using Pipe = GPipe<torch::nn::Sequential>;

namespace {

const char* kCheckpointError =
    "gpipe: checkpoint is not a Checkpoint (value: 42); use "
    "Checkpoint::Always, Checkpoint::ExceptLast or Checkpoint::Never";

torch::Tensor mse(const torch::Tensor& y, const torch::Tensor& t) {
  return torch::mse_loss(y, t);
}

} // namespace

TEST(Options, AForgedCheckpointModeIsRejectedAtConstructionNamingTheModes) {
  EXPECT_EQ(
      error_of([] {
        Pipe(
            make_mlp(2, 2),
            GPipeOptions(2).checkpoint(static_cast<Checkpoint>(42)));
      }),
      kCheckpointError);
}

TEST(Options, AForgedCheckpointModeSetBetweenCallsIsRejectedByTheNextCall) {
  Pipe pipe(make_mlp(2, 2), GPipeOptions(2).microbatches(2));
  const auto x = torch::randn({4, 2});
  pipe(x); // fine before
  pipe->options.checkpoint(static_cast<Checkpoint>(42));
  EXPECT_EQ(error_of([&] { pipe(x); }), kCheckpointError);
  EXPECT_EQ(
      error_of([&] {
        pipe->step(x, torch::randn({4, 2}), mse);
      }),
      kCheckpointError);
  // The pipe stays usable once the option is valid again.
  pipe->options.checkpoint(Checkpoint::Always);
  EXPECT_NO_THROW(pipe->step(x, torch::randn({4, 2}), mse));
}

TEST(Options, AForgedScheduleIsRejectedNamingTheSchedules) {
  Pipe pipe(make_mlp(2, 2), GPipeOptions(2).microbatches(2));
  pipe->options.schedule(static_cast<Schedule>(-1));
  EXPECT_EQ(
      error_of([&] {
        pipe->step(torch::randn({4, 2}), torch::randn({4, 2}), mse);
      }),
      "gpipe: schedule is not a Schedule (value: -1); use "
      "Schedule::FillDrain, Schedule::OneFOneB, Schedule::Interleaved1F1B, "
      "Schedule::ZeroBubbleH1, Schedule::LoopedBFS, "
      "Schedule::InterleavedZeroBubble, Schedule::ZeroBubbleV, "
      "Schedule::DualPipeV or Schedule::Auto");
}

TEST(Options, AForgedLossReductionIsRejectedNamingTheReductions) {
  EXPECT_EQ(
      error_of([] {
        Pipe(
            make_mlp(2, 2),
            GPipeOptions(2).loss_reduction(static_cast<Reduction>(7)));
      }),
      "gpipe: loss_reduction is not a Reduction (value: 7); use "
      "Reduction::Mean or Reduction::Sum");
}

} // namespace options_test
