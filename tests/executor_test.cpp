// One executor runs every program: each schedule trains exactly like plain
// training (every checkpoint mode, K and M, uneven batches, stages sharing
// lanes, interleaved placements); its overlap is what `simulate` predicts,
// measured with stages that sleep in F, I and W; W never redoes I; and a
// failure on one lane stops every lane with the error's type and context.
#include "test_support.h"

#include <atomic>
#include <chrono>
#include <iostream>
#include <map>
#include <thread>

namespace executor_test {

using gpipe::Checkpoint;
using gpipe::GPipe;
using gpipe::GPipeOptions;
using gpipe::Schedule;
using gpipe_test::error_of;
using gpipe_test::grads_of;
using Clock = std::chrono::steady_clock;

namespace {

using Pipe = GPipe<torch::nn::Sequential>;

const auto& kSchedules = gpipe::kEverySchedule;

/// One lane per partition; for the V schedules, k partitions folded on
/// k / 2 lanes.
std::vector<int64_t> lanes_of(Schedule schedule, int64_t k) {
  if (gpipe::places_stages_in_a_v(schedule)) {
    return gpipe::schedule_placement(schedule, k, k / 2);
  }
  std::vector<int64_t> lanes;
  for (int64_t j = 0; j < k; ++j) {
    lanes.push_back(j);
  }
  return lanes;
}

torch::Tensor mse(const torch::Tensor& out, const torch::Tensor& target) {
  return torch::mse_loss(out, target);
}

/// Loss and gradients of one step of `options` against plain training of
/// the same model, to 1e-6 relative.
void expect_step_trains_like_plain(
    int64_t layers,
    const GPipeOptions& options,
    int64_t batch,
    const std::string& what) {
  const auto x = torch::randn({batch, 6});
  const auto y = torch::randn({batch, 6});
  auto plain = gpipe_test::make_mlp(layers, 6, 3);
  const auto expected_loss = mse(plain->forward(x), y);
  expected_loss.backward();
  auto seq = gpipe_test::make_mlp(layers, 6, 3);
  Pipe pipe(seq, options);
  const auto loss = pipe->step(x, y, mse);
  EXPECT_NEAR(loss.item<double>(), expected_loss.item<double>(), 1e-6) << what;
  gpipe_test::expect_close(
      grads_of(seq->parameters()), grads_of(plain->parameters()), 1e-6, what);
}

std::string describe(
    Schedule schedule,
    Checkpoint mode,
    int64_t k,
    int64_t m,
    int64_t batch,
    const std::vector<int64_t>& lanes) {
  std::ostringstream out;
  out << schedule << " " << mode << " K=" << k << " M=" << m
      << " batch=" << batch << " lanes=[" << c10::Join(",", lanes) << "]";
  return out.str();
}

} // namespace

TEST(Executor, EveryScheduleTrainsLikePlainTrainingForEveryKAndM) {
  for (const auto schedule : kSchedules) {
    for (const auto mode : gpipe_test::kCheckpointModes) {
      for (const int64_t k : {1, 2, 3, 4, 8}) {
        for (const int64_t m : {1, 3, 4, 8}) {
          const int64_t batch = m == 1 ? 5 : 2 * m + 1; // uneven micro-batches
          const auto options =
              GPipeOptions(k).microbatches(m).checkpoint(mode).schedule(
                  schedule);
          if (gpipe::places_stages_in_a_v(schedule) && k % 2 == 1) {
            continue; // no V of an odd K
          }
          expect_step_trains_like_plain(
              8,
              options,
              batch,
              describe(schedule, mode, k, m, batch, options.lanes()));
        }
      }
    }
  }
}

TEST(Executor, EveryScheduleTrainsLikePlainTrainingWithALanePerPartition) {
  for (const auto schedule : kSchedules) {
    for (const auto mode : gpipe_test::kCheckpointModes) {
      for (const int64_t k : {2, 4}) {
        for (const int64_t m : {1, 3, 8}) {
          const int64_t batch = 2 * m + 1;
          const auto lanes = lanes_of(schedule, k);
          const auto options = GPipeOptions(k)
                                   .microbatches(m)
                                   .checkpoint(mode)
                                   .schedule(schedule)
                                   .lanes(lanes);
          expect_step_trains_like_plain(
              8, options, batch, describe(schedule, mode, k, m, batch, lanes));
        }
      }
    }
  }
}

TEST(
    Executor,
    InterleavedOneFOneBTrainsLikePlainTrainingWithTwoAndThreeStagesPerLane) {
  for (const auto mode : gpipe_test::kCheckpointModes) {
    for (const int64_t lanes_count : {2, 3}) {
      for (const int64_t v : {2, 3}) {
        for (const int64_t m : {1, 3, 4, 8}) {
          const int64_t k = lanes_count * v;
          std::vector<int64_t> lanes;
          for (int64_t j = 0; j < k; ++j) {
            lanes.push_back(j % lanes_count);
          }
          const int64_t batch = 2 * m + 1;
          const auto options = GPipeOptions(k)
                                   .microbatches(m)
                                   .checkpoint(mode)
                                   .schedule(Schedule::Interleaved1F1B)
                                   .lanes(lanes);
          expect_step_trains_like_plain(
              k,
              options,
              batch,
              describe(Schedule::Interleaved1F1B, mode, k, m, batch, lanes));
        }
      }
    }
  }
}

TEST(Executor, EveryScheduleIsBitIdenticalFromRunToRunOnConcurrentLanes) {
  for (const auto schedule : kSchedules) {
    std::vector<torch::Tensor> first;
    for (int run = 0; run < 3; ++run) {
      const auto x = torch::ones({9, 6});
      auto seq = gpipe_test::make_mlp(8, 6, 11);
      Pipe pipe(
          seq,
          GPipeOptions(4).microbatches(4).schedule(schedule).lanes(
              lanes_of(schedule, 4)));
      pipe->step(x, x, mse);
      const auto grads = grads_of(seq->parameters());
      if (run == 0) {
        first = grads;
      } else {
        gpipe_test::expect_identical(grads, first, gpipe::to_string(schedule));
      }
    }
  }
}

TEST(Executor, ForwardThenTheUsersBackwardStillCrossesLanes) {
  const auto x = torch::randn({7, 6});
  auto plain = gpipe_test::make_mlp(4, 6, 2);
  mse(plain->forward(x), x).backward();
  auto seq = gpipe_test::make_mlp(4, 6, 2);
  Pipe pipe(seq, GPipeOptions(4).microbatches(3).lanes({0, 1, 0, 1}));
  mse(pipe(x), x).backward();
  gpipe_test::expect_close(
      grads_of(seq->parameters()), grads_of(plain->parameters()), 1e-6, "");
}

TEST(Executor, AUsersProgramRunsInsteadOfTheSchedule) {
  // 1F1B on two stages written by hand, on two lanes, without communication
  // (the pipe lowers it).
  const auto program = gpipe::parse_program(
      "lane 0: 0F0 0F1 0B0 0F2 0B1 0B2\n"
      "lane 1: 1F0 1B0 1F1 1B1 1F2 1B2\n");
  const auto options =
      GPipeOptions(2).microbatches(3).lanes({0, 1}).program(program);
  expect_step_trains_like_plain(4, options, 7, "user program");
}

TEST(Executor, AUsersProgramIsValidatedBeforeAnythingRuns) {
  auto seq = gpipe_test::make_mlp(2, 6);
  const auto before = seq->parameters()[0].clone();
  Pipe pipe(
      seq,
      GPipeOptions(2).microbatches(2).lanes({0, 1}).program(
          gpipe::parse_program("lane 0: 0F0 0B0 0F1 0B1\n"
                               "lane 1: 1F0 1F1 1B1 1B0\n")));
  const auto x = torch::randn({4, 6});
  const auto message = error_of([&] { pipe->step(x, x, mse); });
  EXPECT_NE(message.find("gpipe: invalid program"), std::string::npos)
      << message;
  EXPECT_FALSE(seq->parameters()[0].grad().defined());
  EXPECT_TRUE(torch::equal(seq->parameters()[0], before));
}

TEST(Executor, AUsersProgramForOtherLanesOrSizesIsRejected) {
  auto seq = gpipe_test::make_mlp(2, 6);
  Pipe pipe(
      seq,
      GPipeOptions(2).microbatches(2).program(
          gpipe::parse_program("lane 0: 0F0 0B0 0F1 0B1\n"
                               "lane 1: 1F0 1B0 1F1 1B1\n")));
  const auto x = torch::randn({4, 6});
  EXPECT_EQ(
      error_of([&] { pipe->step(x, x, mse); }),
      "gpipe: the program places stages on lanes [0, 1], but the pipe runs "
      "its partitions on lanes [0, 0] (set GPipeOptions::lanes to match)");
  const auto three = torch::randn({3, 6});
  pipe->options.program(gpipe::parse_program("lane 0: 0F0 1F0 1B0 0B0\n"));
  EXPECT_EQ(
      error_of([&] { pipe->step(three, three, mse); }),
      "gpipe: the program has 2 stages and 1 micro-batches, but the pipe has "
      "2 partitions and this batch 2 micro-batches (a batch smaller than "
      "microbatches() gives fewer)");
}

TEST(Executor, BadLanesAreRejectedAtConstruction) {
  auto seq = gpipe_test::make_mlp(4, 6);
  EXPECT_EQ(
      error_of([&] {
        Pipe(seq, GPipeOptions(4).lanes({0, 1}));
      }),
      "gpipe: lanes needs one entry per partition (partitions: 4, lanes: [0, 1])");
  EXPECT_EQ(
      error_of([&] {
        Pipe(seq, GPipeOptions(4).lanes({0, 2, 0, 2}));
      }),
      "gpipe: lanes are numbered 0 to 2 but lane 1 has no partition (lanes: [0, 2, 0, 2])");
  EXPECT_EQ(
      error_of([&] {
        Pipe(seq, GPipeOptions(4).lanes({0, -1, 0, 1}));
      }),
      "gpipe: lanes must be 0 or more (lanes: [0, -1, 0, 1])");
  EXPECT_EQ(
      error_of([&] {
        Pipe(
            seq,
            GPipeOptions(4)
                .lanes({0, 1, 2, 3})
                .concurrent_cpu_partitions(true));
      }),
      "gpipe: give either lanes or concurrent_cpu_partitions, not both "
      "(concurrent_cpu_partitions(true) is the shorthand for one lane per CPU "
      "partition)");
}

TEST(Executor, LanesAreFixedWhenThePipeIsBuilt) {
  auto seq = gpipe_test::make_mlp(4, 6);
  Pipe pipe(seq, GPipeOptions(2).lanes({0, 1}));
  pipe->options.lanes({0, 0});
  const auto x = torch::randn({2, 6});
  EXPECT_NE(
      error_of([&] { pipe(x); })
          .find("gpipe: lanes is fixed when the pipe is built (lanes: 0, 1 "
                "then, 0, 0 now)"),
      std::string::npos);
}

namespace {

/// y = x * w, taking kF in forward, kI for the input gradient and kW for
/// the weight gradient, each only when the engine asks for it; counts both.
constexpr auto kF = std::chrono::milliseconds(20);
constexpr auto kI = std::chrono::milliseconds(20);
constexpr auto kW = std::chrono::milliseconds(20);
std::atomic<int> input_gradients{0};
std::atomic<int> weight_gradients{0};
/// Makes the weight gradient fail as if out of memory.
std::atomic<bool> weight_gradient_runs_out_of_memory{false};

struct SleepyScale : torch::autograd::Function<SleepyScale> {
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx,
      const torch::Tensor& x,
      const torch::Tensor& w) {
    std::this_thread::sleep_for(kF);
    ctx->save_for_backward({x, w});
    return {x * w};
  }
  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx,
      torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    torch::Tensor gx;
    torch::Tensor gw;
    if (ctx->needs_input_grad(0)) {
      std::this_thread::sleep_for(kI);
      ++input_gradients;
      gx = grads[0] * saved[1];
    }
    if (ctx->needs_input_grad(1)) {
      TORCH_CHECK_WITH(
          OutOfMemoryError,
          !weight_gradient_runs_out_of_memory.load(),
          "pretend OOM in the weight gradient");
      std::this_thread::sleep_for(kW);
      ++weight_gradients;
      gw = (grads[0] * saved[0]).sum(0);
    }
    return {gx, gw};
  }
};

struct SleepyScaleLayerImpl : torch::nn::Module {
  explicit SleepyScaleLayerImpl(int64_t width = 2)
      : w(register_parameter("w", torch::ones({width}))) {}
  torch::Tensor forward(const torch::Tensor& x) {
    return SleepyScale::apply(x, w)[0];
  }
  torch::Tensor w;
};
TORCH_MODULE(SleepyScaleLayer);

Pipe sleepy_pipe(
    int64_t k,
    int64_t m,
    const std::vector<int64_t>& lanes,
    Schedule schedule) {
  torch::nn::Sequential seq;
  for (int64_t j = 0; j < k; ++j) {
    seq->push_back(SleepyScaleLayer());
  }
  return Pipe(
      seq,
      GPipeOptions(k)
          .microbatches(m)
          .lanes(lanes)
          .schedule(schedule)
          .checkpoint(Checkpoint::Never));
}

double seconds(std::chrono::milliseconds t) {
  return std::chrono::duration<double>(t).count();
}

/// The best of three steps (after a warm-up that starts the workers).
double measured_makespan(Pipe& pipe, int64_t m) {
  const auto x = torch::randn({m, 2}, torch::requires_grad());
  pipe->step(x, x.detach(), mse);
  double best = 1e9;
  for (int run = 0; run < 3; ++run) {
    const auto start = Clock::now();
    pipe->step(x, x.detach(), mse);
    best = std::min(
        best, std::chrono::duration<double>(Clock::now() - start).count());
  }
  return best;
}

} // namespace

TEST(Executor, WeightGradientsNeverRedoTheInputGradient) {
  // Every cell computes its input gradient once and its weight gradient once,
  // whether its backward runs whole (B) or split (I then W).
  for (const auto schedule : {Schedule::OneFOneB, Schedule::ZeroBubbleH1}) {
    for (const auto mode : gpipe_test::kCheckpointModes) {
      auto pipe = sleepy_pipe(2, 3, {0, 1}, schedule);
      pipe->options.checkpoint(mode);
      input_gradients = 0;
      weight_gradients = 0;
      const auto x = torch::randn({3, 2}, torch::requires_grad());
      pipe->step(x, x.detach(), mse);
      EXPECT_EQ(input_gradients.load(), 2 * 3) << schedule << " " << mode;
      EXPECT_EQ(weight_gradients.load(), 2 * 3) << schedule << " " << mode;
      ASSERT_TRUE(x.grad().defined());
    }
  }
}

TEST(Executor, EveryScheduleOverlapsAsSimulatePredictsWithSleepingStages) {
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "makespans under AddressSanitizer measure the sanitizer";
#endif
  const int64_t k = 4;
  const int64_t m = 8;
  const gpipe::Costs costs{
      seconds(kF), seconds(kI + kW), seconds(kI), seconds(kW)};
  std::map<Schedule, double> measured;
  std::map<Schedule, double> predicted;
  for (const auto schedule : kSchedules) {
    // The schedules over several stages per lane: 8 stages on the 4 lanes
    // (twice the work in all).
    const int64_t stages = gpipe::stages_per_lane(schedule) * k;
    const auto lanes = gpipe::schedule_placement(schedule, stages, k);
    auto pipe = sleepy_pipe(stages, m, lanes, schedule);
    predicted[schedule] =
        gpipe::simulate(gpipe::build_program(schedule, stages, m, lanes), costs)
            .makespan;
    measured[schedule] = measured_makespan(pipe, m);
    std::cout << "  " << schedule << ": predicted " << predicted[schedule]
              << " s, measured " << measured[schedule] << " s\n";
    EXPECT_LE(measured[schedule], 1.15 * predicted[schedule])
        << schedule << ": predicted " << predicted[schedule] << " s";
    EXPECT_GE(measured[schedule], 0.95 * predicted[schedule])
        << schedule << ": predicted " << predicted[schedule] << " s";
  }
  const double gain =
      predicted[Schedule::OneFOneB] - predicted[Schedule::ZeroBubbleH1];
  ASSERT_GT(gain, 0.0);
  EXPECT_LE(
      measured[Schedule::ZeroBubbleH1],
      measured[Schedule::OneFOneB] - 2.0 / 3.0 * gain)
      << "1F1B " << measured[Schedule::OneFOneB] << " s, ZB-H1 "
      << measured[Schedule::ZeroBubbleH1] << " s, predicted gain " << gain
      << " s";
}

TEST(Executor, MicrobatchesInFlightPerStageAreWhatSimulatePredicts) {
  // In flight: from a cell's forward to the end of its backward (B, or W).
  const int64_t m = 8;
  for (const auto schedule : kSchedules) {
    // The schedules over several stages per lane: 8 stages on 4 lanes; the
    // others a stage per lane.
    const int64_t k = gpipe::stages_per_lane(schedule) * 4;
    const auto lanes = gpipe::schedule_placement(schedule, k, 4);
    auto pipe = sleepy_pipe(k, m, lanes, schedule);
    auto timeline = std::make_shared<gpipe::Timeline>();
    pipe->set_timeline(timeline);
    const auto x = torch::randn({m, 2}, torch::requires_grad());
    pipe->step(x, x.detach(), mse);
    std::vector<std::vector<std::pair<double, int>>> changes(k);
    for (const auto& event : timeline->events()) {
      const auto j = static_cast<size_t>(event.partition);
      if (event.phase == gpipe::Phase::Forward) {
        changes[j].emplace_back(event.start_us, +1);
      } else if (
          event.phase == gpipe::Phase::Backward ||
          event.phase == gpipe::Phase::BackwardWeight) {
        changes[j].emplace_back(event.end_us, -1);
      }
    }
    const auto expected = gpipe::simulate(
                              gpipe::build_program(schedule, k, m, lanes),
                              {0.02, 0.04, 0.02, 0.02})
                              .peak_in_flight;
    for (int64_t j = 0; j < k; ++j) {
      auto& mine = changes[static_cast<size_t>(j)];
      std::sort(mine.begin(), mine.end(), [](const auto& a, const auto& b) {
        return a.first < b.first || (a.first == b.first && a.second < b.second);
      });
      int now = 0;
      int peak = 0;
      for (const auto& [time, delta] : mine) {
        now += delta;
        peak = std::max(peak, now);
      }
      EXPECT_EQ(peak, expected[static_cast<size_t>(j)])
          << schedule << " stage " << j;
      // 1F1B: at most K - j on stage j. ZB-H1 keeps 1F1B's peak (K, on
      // stage 0) on every stage: a later stage holds micro-batches whose W
      // it postpones to fill its bubble (Qi et al. 2023, Section 3).
      if (schedule == Schedule::OneFOneB) {
        EXPECT_LE(peak, k - j) << schedule << " stage " << j;
      } else if (schedule == Schedule::ZeroBubbleH1) {
        EXPECT_LE(peak, k) << schedule << " stage " << j;
      }
    }
  }
}

TEST(Executor, AnErrorInAWeightGradientKeepsItsTypeAndNamesItsCellOnce) {
  for (const auto schedule : kSchedules) {
    if (gpipe::places_stages_in_a_v(schedule)) {
      continue; // K = 3: no V
    }
    auto seq = gpipe_test::make_mlp(2, 6);
    seq->push_back(SleepyScaleLayer(6));
    seq->push_back(torch::nn::Linear(6, 6));
    Pipe pipe(
        seq,
        GPipeOptions(3).microbatches(4).lanes({0, 1, 2}).schedule(schedule));
    const auto x = torch::randn({8, 6});
    weight_gradient_runs_out_of_memory = true;
    for (int attempt = 0; attempt < 2; ++attempt) { // the pipe stays usable
      try {
        pipe->step(x, x, mse);
        ADD_FAILURE() << schedule << ": no error";
      } catch (const c10::OutOfMemoryError& e) {
        const std::string message = e.what();
        const std::string context = "gpipe: partition 2 failed on micro-batch";
        const auto first = message.find(context);
        EXPECT_NE(first, std::string::npos) << message;
        EXPECT_EQ(message.find(context, first + 1), std::string::npos)
            << message;
        EXPECT_NE(
            message.find(
                schedule == Schedule::ZeroBubbleH1 ? "in backward_weight"
                                                   : "in backward"),
            std::string::npos)
            << message;
        EXPECT_NE(
            message.find("pretend OOM in the weight gradient"),
            std::string::npos)
            << message;
      }
    }
    weight_gradient_runs_out_of_memory = false;
    for (auto& p : seq->parameters()) {
      p.mutable_grad().reset();
    }
    pipe->step(x, x, mse); // and trains again
    EXPECT_TRUE(seq->parameters()[0].grad().defined()) << schedule;
  }
}

TEST(Executor, AFailureOnOneLaneNeverLeavesAnotherLaneWaiting) {
  // The last stage's loss fails on micro-batch 2 while the first lanes wait
  // for its gradients; every lane stops, the error arrives, and the next
  // step trains normally.
  for (const auto schedule : kSchedules) {
    auto seq = gpipe_test::make_mlp(4, 6);
    Pipe pipe(
        seq,
        GPipeOptions(4)
            .microbatches(4)
            .lanes(lanes_of(schedule, 4))
            .schedule(schedule));
    const auto x = torch::randn({8, 6});
    int calls = 0;
    auto failing = [&](const torch::Tensor& out, const torch::Tensor& y) {
      TORCH_CHECK(++calls != 3, "loss refused");
      return mse(out, y);
    };
    const auto message = error_of([&] { pipe->step(x, x, failing); });
    EXPECT_NE(
        message.find("gpipe: partition 3 failed on micro-batch 2 in loss_fn"),
        std::string::npos)
        << schedule << ": " << message;
    for (auto& p : seq->parameters()) {
      p.mutable_grad().reset();
    }
    pipe->step(x, x, mse);
    auto plain = gpipe_test::make_mlp(4, 6);
    mse(plain->forward(x), x).backward();
    gpipe_test::expect_close(
        grads_of(seq->parameters()),
        grads_of(plain->parameters()),
        1e-6,
        gpipe::to_string(schedule));
  }
}

TEST(Transport, AMailboxHandsOverByTagAndChecksWhatTheReceiverExpects) {
  gpipe::detail::MailboxTransport mailbox;
  using gpipe::detail::Direction;
  using gpipe::detail::TensorMeta;
  const auto x = torch::ones({2, 3});
  const auto ids = torch::zeros({2}, torch::kLong);
  mailbox.send({1, 0, Direction::Forward}, {x, ids});
  mailbox.send({1, 1, Direction::Forward}, {torch::zeros({2, 3})});
  mailbox.send({0, 0, Direction::Backward}, {torch::Tensor()}); // no gradient
  mailbox.send({3, 0, Direction::Forward, 1}, {x}); // a skip's channel
  const auto received = mailbox.recv(
      {1, 0, Direction::Forward},
      std::vector<TensorMeta>{{{2, 3}, torch::kFloat}, {{2}, torch::kLong}});
  ASSERT_EQ(received.size(), 2u);
  EXPECT_TRUE(received[0].is_same(x));
  EXPECT_TRUE(received[1].is_same(ids));
  EXPECT_FALSE(mailbox.recv({0, 0, Direction::Backward})[0].defined());
  EXPECT_TRUE(mailbox.recv({3, 0, Direction::Forward, 1})[0].is_same(x));
  EXPECT_EQ(
      error_of([&] {
        mailbox.recv(
            {1, 1, Direction::Forward},
            std::vector<TensorMeta>{{{2, 4}, torch::kFloat}});
      }),
      "gpipe: received the activation for stage 1, micro-batch 1 with tensor "
      "0 of shape [2, 3] and dtype Float, expected shape [2, 4] and dtype "
      "Float");
}

TEST(Transport, AMailboxRefusesABundleWithAnotherNumberOfTensors) {
  gpipe::detail::MailboxTransport mailbox;
  using gpipe::detail::Direction;
  using gpipe::detail::TensorMeta;
  mailbox.send({2, 1, Direction::Backward, 3}, {torch::ones({1})});
  EXPECT_EQ(
      error_of([&] {
        mailbox.recv(
            {2, 1, Direction::Backward, 3},
            std::vector<TensorMeta>{
                {{1}, torch::kFloat}, {{1}, torch::kFloat}});
      }),
      "gpipe: received the gradient of skip route 2 for stage 2, micro-batch "
      "1 with 1 tensors, expected 2");
}

TEST(Transport, AbortWakesEveryLaneWaitingInAReceive) {
  gpipe::detail::MailboxTransport mailbox;
  std::atomic<int> woken{0};
  std::vector<std::thread> waiting;
  for (int64_t s = 0; s < 3; ++s) {
    waiting.emplace_back([&, s] {
      try {
        mailbox.recv({s, 0, gpipe::detail::Direction::Forward});
      } catch (const gpipe::detail::LaneAborted&) {
        ++woken;
      }
    });
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  mailbox.abort();
  for (auto& thread : waiting) {
    thread.join();
  }
  EXPECT_EQ(woken.load(), 3);
}

} // namespace executor_test
