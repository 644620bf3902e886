// search_schedule and simulate with per-stage costs: every searched program
// is valid, goes by order and fits its memory limit; it is never slower than
// a fixed schedule under the same limit, and on stages of unequal cost or
// with more memory it is faster, down to the lower bound where that bound
// is reachable.
#include "test_support.h"

#include <gpipe/ordered_messages.h>
#include <gpipe/schedule.h>
#include <gpipe/schedules.h>
#include <gpipe/search.h>
#include <gpipe/simulate.h>

#include <limits>
#include <string>
#include <vector>

namespace search_test {

using gpipe::Costs;
using gpipe::Program;
using gpipe::Schedule;
using gpipe::SearchOptions;

namespace {

/// Stages of unequal cost, as a profiler of the giant MLP with an uneven
/// balance measures them (F = I = W per stage; messages 0.2).
const std::vector<Costs> kUneven = {
    {1.3, 2.6, 1.3, 1.3, 0.2},
    {0.8, 1.6, 0.8, 0.8, 0.2},
    {1.1, 2.2, 1.1, 1.1, 0.2},
    {0.6, 1.2, 0.6, 0.6, 0.2}};

const std::vector<int64_t> kFourLanes = {0, 1, 2, 3};

/// The shortest fixed schedule on `lanes` whose peak fits `limit`
/// micro-batches per lane.
double best_fixed(
    const std::vector<Costs>& costs,
    const std::vector<int64_t>& lanes,
    int64_t m,
    double limit) {
  double best = std::numeric_limits<double>::infinity();
  const std::vector<double> one(lanes.size(), 1.0);
  for (const Schedule schedule : gpipe::kEverySchedule) {
    Program program;
    try {
      program = gpipe::build_program(
          schedule, static_cast<int64_t>(lanes.size()), m, lanes);
    } catch (const c10::Error&) {
      continue; // not on this placement
    }
    const auto run = gpipe::simulate(program, costs);
    bool fits = true;
    for (const double peak : gpipe::detail::peak_memory(run, one)) {
      fits = fits && peak <= limit;
    }
    if (fits) {
      best = std::min(best, run.makespan);
    }
  }
  return best;
}

} // namespace

TEST(SimulateStageCosts, EachStageTakesItsOwnTime) {
  // Fill-drain, one micro-batch: F0, receive, F1, B1, receive, B0.
  const Program program = gpipe::build_program(
      Schedule::FillDrain, 2, 1, std::vector<int64_t>{0, 1});
  const std::vector<Costs> costs = {
      {1.0, 2.0, 1.0, 1.0, 0.25}, {3.0, 4.0, 2.0, 2.0, 0.5}};
  EXPECT_DOUBLE_EQ(
      gpipe::simulate(program, costs).makespan,
      1.0 + 0.5 + 3.0 + 4.0 + 0.25 + 2.0);
  EXPECT_DOUBLE_EQ(
      gpipe::simulate(program, std::vector<Costs>{costs[1]}).makespan,
      gpipe::simulate(program, costs[1]).makespan);
  EXPECT_EQ(
      gpipe_test::error_of(
          [&] { gpipe::simulate(program, std::vector<Costs>(3)); }),
      "gpipe: simulate needs one Costs, or one per stage (stages: 2, costs: 3)");
  EXPECT_EQ(
      gpipe_test::error_of([&] {
        gpipe::simulate(
            program, std::vector<Costs>{costs[0], {-1.0, 2.0, 1.0, 1.0, 0.0}});
      }),
      "gpipe: simulate needs costs of zero or more (stage 1: F: -1, B: 2, I: 1, W: 1, comm: 0)");
}

TEST(SearchSchedule, EveryProgramItReturnsIsValidGoesByOrderAndFitsItsLimit) {
  const std::vector<std::vector<int64_t>> placements = {
      {0, 1}, {0, 1, 2}, {0, 1, 2, 3}, {0, 1, 0, 1}, {0, 1, 1, 0}, {0, 0, 0}};
  for (const auto& lanes : placements) {
    const auto stages = static_cast<int64_t>(lanes.size());
    const int64_t lane_count =
        1 + *std::max_element(lanes.begin(), lanes.end());
    std::vector<Costs> costs;
    for (int64_t s = 0; s < stages; ++s) {
      const double f = 0.5 + 0.3 * static_cast<double>((s * 7) % 5);
      costs.push_back({f, 2.2 * f, 1.3 * f, 0.9 * f, 0.1});
    }
    for (const int64_t m : {1, 3, 8}) {
      for (const double per_stage : {1.0, 2.0, 1e9}) {
        // Each lane may hold per_stage micro-batches of each of its stages.
        std::vector<double> limit(static_cast<size_t>(lane_count), 0.0);
        for (const int64_t l : lanes) {
          limit[static_cast<size_t>(l)] += per_stage;
        }
        const std::string what = "stages " + std::to_string(stages) +
            " lanes " + std::to_string(lane_count) + " m " + std::to_string(m) +
            " limit " + std::to_string(per_stage);
        const auto found = gpipe::search_schedule(
            costs, lanes, m, SearchOptions().memory_limit(limit));
        ASSERT_EQ(
            gpipe_test::error_of([&] {
              const auto run = gpipe::simulate(found.program, costs);
              EXPECT_DOUBLE_EQ(run.makespan, found.makespan) << what;
              gpipe::check_ordered_messages(
                  gpipe::lower_for_ordered_messages(found.program));
              const auto peaks = gpipe::detail::peak_memory(
                  run, std::vector<double>(lanes.size(), 1.0));
              for (size_t l = 0; l < peaks.size(); ++l) {
                EXPECT_LE(peaks[l], limit[l]) << what << " lane " << l;
                EXPECT_DOUBLE_EQ(peaks[l], found.peak_memory[l]) << what;
              }
            }),
            "(no error)")
            << what;
        EXPECT_GE(found.makespan, found.lower_bound - 1e-9) << what;
        EXPECT_FALSE(found.found_by.empty()) << what;
      }
    }
  }
}

TEST(SearchSchedule, IsNeverSlowerThanAFixedScheduleThatFitsTheSameLimit) {
  for (const auto& costs :
       {std::vector<Costs>(4, Costs{1.0, 2.0, 1.0, 1.0, 0.0}), kUneven}) {
    for (const int64_t m : {4, 8, 16}) {
      for (const double limit : {4.0, 8.0, 1e9}) {
        const auto found = gpipe::search_schedule(
            costs,
            kFourLanes,
            m,
            SearchOptions().memory_limit({limit, limit, limit, limit}));
        EXPECT_LE(found.makespan, best_fixed(costs, kFourLanes, m, limit))
            << "m " << m << " limit " << limit;
      }
    }
  }
}

TEST(SearchSchedule, WithMemoryToSpareItReachesTheLowerBoundOnUnequalStages) {
  // 1F1B's limit (4 micro-batches on the first lane) keeps ZB-H1 ahead of
  // any other order here; twice that lets the search fill every bubble,
  // which no fixed schedule does: 32.8 against ZB-H1's 34.9 at m = 8.
  for (const int64_t m : {8, 16}) {
    const auto found = gpipe::search_schedule(
        kUneven, kFourLanes, m, SearchOptions().memory_limit({8, 8, 8, 8}));
    EXPECT_NEAR(found.makespan, found.lower_bound, 1e-9) << "m " << m;
    EXPECT_LT(found.makespan, 0.98 * best_fixed(kUneven, kFourLanes, m, 8))
        << "m " << m;
  }
}

TEST(SearchSchedule, EqualStagesGetTheLowerBoundAtOneFOneBsMemory) {
  // F = I = W and free messages: ZB-H1's makespan, 3 m + K - 1, is the
  // bound (the last lane waits K - 1 forwards for its first micro-batch).
  for (const int64_t m : {4, 8, 16}) {
    const auto found = gpipe::search_schedule(
        std::vector<Costs>(4, Costs{1.0, 2.0, 1.0, 1.0, 0.0}),
        kFourLanes,
        m,
        SearchOptions().memory_limit({4, 4, 4, 4}));
    EXPECT_DOUBLE_EQ(found.makespan, 3.0 * static_cast<double>(m) + 3.0);
    EXPECT_DOUBLE_EQ(found.lower_bound, found.makespan);
  }
}

TEST(SearchSchedule, ALimitBelowOneMicrobatchSaysWhatWouldFit) {
  EXPECT_EQ(
      gpipe_test::error_of([] {
        gpipe::search_schedule(
            kUneven, {0, 1, 1, 0}, 4, SearchOptions().memory_limit({2.0, 1.5}));
      }),
      "gpipe: search_schedule: lane 1 may hold 1.5, less than one micro-batch through its stages (2); a limit of 2 or more fits");
}

TEST(SearchSchedule, SizesThatDisagreeAreErrorsNamingThem) {
  EXPECT_EQ(
      gpipe_test::error_of([] {
        gpipe::search_schedule(kUneven, {0, 1, 2}, 4);
      }),
      "gpipe: search_schedule needs the costs of every stage (stages: 3, costs: 4)");
  EXPECT_EQ(
      gpipe_test::error_of([] {
        gpipe::search_schedule(
            kUneven, kFourLanes, 4, SearchOptions().memory_limit({4, 4}));
      }),
      "gpipe: search_schedule needs one memory limit per lane (lanes: 4, limits: 2)");
  EXPECT_EQ(
      gpipe_test::error_of([] {
        gpipe::search_schedule(
            kUneven, kFourLanes, 4, SearchOptions().activation({1.0}));
      }),
      "gpipe: search_schedule needs one activation size per stage (stages: 4, activation sizes: 1)");
  EXPECT_EQ(
      gpipe_test::error_of(
          [] { gpipe::search_schedule(kUneven, kFourLanes, 0); }),
      "gpipe: search_schedule needs at least one stage and one micro-batch (stages: 4, m: 0)");
}

TEST(StageCosts, AreTheMediansOfEachStagesPhasesFromATimeline) {
  using gpipe::Phase;
  using gpipe::TimelineEvent;
  auto slice = [](int64_t partition, Phase phase, double us) {
    TimelineEvent event;
    event.partition = partition;
    event.phase = phase;
    event.start_us = 100.0;
    event.end_us = 100.0 + us;
    return event;
  };
  const std::vector<TimelineEvent> events = {
      slice(0, Phase::Forward, 10),
      slice(0, Phase::Forward, 30),
      slice(0, Phase::Forward, 20),
      slice(0, Phase::BackwardInput, 15),
      slice(0, Phase::BackwardWeight, 5),
      slice(0, Phase::Recompute, 8),
      slice(1, Phase::Copy, 2),
      slice(1, Phase::Forward, 40),
      slice(1, Phase::Backward, 70)};
  const auto costs = gpipe::stage_costs(events, 2);
  ASSERT_EQ(costs.size(), 2u);
  EXPECT_DOUBLE_EQ(costs[0].F, 20e-6);
  EXPECT_DOUBLE_EQ(costs[0].I, 23e-6); // its recompute runs before it
  EXPECT_DOUBLE_EQ(costs[0].W, 5e-6);
  EXPECT_DOUBLE_EQ(costs[0].B, 28e-6);
  EXPECT_DOUBLE_EQ(costs[0].comm, 0.0);
  EXPECT_DOUBLE_EQ(costs[1].F, 40e-6);
  EXPECT_DOUBLE_EQ(costs[1].B, 70e-6);
  EXPECT_DOUBLE_EQ(costs[1].I, 70e-6); // a whole backward: all of it in I
  EXPECT_DOUBLE_EQ(costs[1].W, 0.0);
  EXPECT_DOUBLE_EQ(costs[1].comm, 2e-6);
  EXPECT_EQ(
      gpipe_test::error_of([&] { gpipe::stage_costs(events, 3); }),
      "gpipe: stage_costs: stage 2 has no forward among the 9 events (stages: 3); record a training step first");
}

namespace {

torch::Tensor mse(const torch::Tensor& out, const torch::Tensor& target) {
  return torch::mse_loss(out, target);
}

} // namespace

TEST(AutoSchedule, TheFirstStepMeasuresLaterStepsRunTheSearchedProgram) {
  // Every step trains like plain training: the measuring one (ZB-H1) and
  // the searched program's; the user's timeline misses only the first.
  const auto x = torch::randn({9, 6});
  const auto y = torch::randn({9, 6});
  auto plain = gpipe_test::make_mlp(8, 6, 5);
  auto seq = gpipe_test::make_mlp(8, 6, 5);
  gpipe::GPipe<torch::nn::Sequential> pipe(
      seq,
      gpipe::GPipeOptions(4)
          .microbatches(4)
          .lanes({0, 1, 2, 3})
          .schedule(Schedule::Auto)
          .checkpoint(gpipe::Checkpoint::Never));
  const Program zero_bubble = gpipe::build_program(
      Schedule::ZeroBubbleH1, 4, 4, std::vector<int64_t>{0, 1, 2, 3});
  EXPECT_EQ(pipe->step_program_for(4), zero_bubble);
  auto timeline = std::make_shared<gpipe::Timeline>();
  pipe->set_timeline(timeline);
  for (int step = 0; step < 3; ++step) {
    plain->zero_grad();
    seq->zero_grad();
    const auto want = mse(plain->forward(x), y);
    want.backward();
    const auto got = pipe->step(x, y, mse);
    EXPECT_NEAR(got.item<double>(), want.item<double>(), 1e-6);
    gpipe_test::expect_close(
        gpipe_test::grads_of(seq->parameters()),
        gpipe_test::grads_of(plain->parameters()),
        1e-6,
        "step " + std::to_string(step));
    EXPECT_EQ(pipe->timeline(), timeline);
    EXPECT_EQ(timeline->events().empty(), step == 0) << "step " << step;
  }
  const Program& searched = pipe->step_program_for(4);
  EXPECT_EQ(
      gpipe_test::error_of([&] { gpipe::simulate(searched); }), "(no error)");
  // Within 1F1B's activations (4 per lane), as activation_limit 0 asks.
  for (const int64_t held : gpipe::simulate(searched).peak_in_flight) {
    EXPECT_LE(held, 4);
  }
}

TEST(AutoSchedule, AnActivationLimitBelowOneMicrobatchIsAnErrorBeforeTheStep) {
  auto seq = gpipe_test::make_mlp(4, 6);
  gpipe::GPipe<torch::nn::Sequential> pipe(
      seq,
      gpipe::GPipeOptions(4)
          .microbatches(2)
          .lanes({0, 1, 1, 0})
          .schedule(Schedule::Auto)
          .activation_limit(1.5));
  const auto x = torch::randn({4, 6});
  EXPECT_EQ(
      gpipe_test::error_of([&] { pipe->step(x, x, mse); }),
      "gpipe: activation_limit 1.5 is below one micro-batch through the stages of a lane (2); use 2 or more, or 0 for the stage count");
  for (const auto& p : seq->parameters()) {
    EXPECT_FALSE(p.grad().defined()); // nothing ran
  }
  pipe->options.activation_limit(2);
  pipe->step(x, x, mse);
  EXPECT_TRUE(seq->parameters()[0].grad().defined());
}

TEST(AutoSchedule, CannotBeBuiltWithoutMeasuredCosts) {
  EXPECT_EQ(
      gpipe_test::error_of([] {
        gpipe::build_program(Schedule::Auto, 2, 4, std::vector<int64_t>{0, 1});
      }),
      "gpipe: auto is searched for the costs a pipe measures; use search_schedule (search.h), or Schedule::Auto in a pipe's options (m: 4, n: 2)");
  EXPECT_EQ(gpipe::parse_schedule("auto"), Schedule::Auto);
}

} // namespace search_test
