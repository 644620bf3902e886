// Whole-model gradients across ranks: a token embedding tied to the output
// head on another rank, the global norm clipped over every stage, and fp16
// loss scaling whose found-inf every rank agrees on; each compared with
// plain training of the same seeded model in every rank.
#include "../test_support.h"
#include "gradients_scenarios.h"
#include "multiprocess.h"

#include <gpipe/distributed.h>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <iostream>
#include <limits>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <vector>

namespace {

namespace mp = gpipe_test::multiprocess;
using mp::arg;
using mp::plain_name;
namespace gd = gpipe::distributed;
using gpipe::Checkpoint;
using gpipe::Schedule;

constexpr int64_t kVocabulary = 11;
constexpr int64_t kWidth = 6;

/// Embedding, three Linear + Tanh, the tied head: 8 layers in double,
/// seeded, so that every rank builds the same.
torch::nn::Sequential make_tied_model() {
  torch::manual_seed(5);
  torch::nn::Embedding embedding(kVocabulary, kWidth);
  torch::nn::Sequential seq;
  seq->push_back(embedding);
  for (int l = 0; l < 3; ++l) {
    seq->push_back(torch::nn::Linear(kWidth, kWidth));
    seq->push_back(torch::nn::Tanh());
  }
  seq->push_back(gpipe_test::TiedHead(embedding));
  seq->to(torch::kFloat64);
  return seq;
}

torch::Tensor cross_entropy(const torch::Tensor& out, const torch::Tensor& t) {
  return torch::nn::functional::cross_entropy(out, t);
}

/// Counts mismatches, printing each.
struct Checks {
  int checks = 0;
  int failures = 0;
  void close(
      const torch::Tensor& got,
      const torch::Tensor& want,
      const std::string& what,
      double rtol = 1e-6) {
    ++checks;
    const bool same = got.defined() == want.defined() &&
        (!got.defined() || torch::allclose(got, want, rtol, 1e-12));
    if (!same) {
      ++failures;
      std::cout << "MISMATCH " << what << "\n got " << got << "\n want " << want
                << std::endl;
    }
  }
  void equal(double got, double want, const std::string& what) {
    ++checks;
    if (!(got == want || std::abs(got - want) <= 1e-6 * std::abs(want))) {
      ++failures;
      std::cout << "MISMATCH " << what << ": got " << got << ", want " << want
                << std::endl;
    }
  }
  int report() const {
    std::cout << "RESULT checks=" << checks << std::endl;
    std::cout << "RESULT mismatches=" << failures << std::endl;
    return failures == 0 ? 0 : 1;
  }
};

/// make_tied_model's 8 layers built stage by stage, each stage from a model
/// of its own, so the head's embedding is a copy (perturbed here) that
/// `options` gets a tie declared for (unless `declare` is false).
gd::DistributedGPipe built_stage_by_stage(
    const std::shared_ptr<gd::World>& world,
    gd::DistributedOptions options,
    bool declare = true) {
  const int64_t n = options.stages() * options.stages_per_rank();
  const auto balance = gpipe::detail::resolve_balance(8, n, {});
  if (declare) {
    options.tie(
        {"stage0.0.weight",
         "stage" + std::to_string(n - 1) + ".7.embedding.weight"});
  }
  return gd::DistributedGPipe(
      world,
      [&](int64_t s) {
        auto whole = make_tied_model();
        int64_t first = 0;
        for (int64_t k = 0; k < s; ++k) {
          first += balance[static_cast<size_t>(k)];
        }
        torch::nn::Sequential stage;
        for (int64_t l = first; l < first + balance[static_cast<size_t>(s)];
             ++l) {
          stage->push_back(std::to_string(l), whole->begin()[l]);
        }
        if (s == n - 1) {
          torch::NoGradGuard no_grad;
          stage->named_parameters()["7.embedding.weight"].add_(1.0);
        }
        return stage;
      },
      options);
}

/// A tied embedding and head, clipped, 3 SGD-with-momentum steps on every
/// schedule (and checkpoint mode): gradients, norms and weights equal
/// plain training's; both copies of the tie match plain every step.
int tied_clipped(const std::shared_ptr<gd::World>& world) {
  const auto args = mp::arguments();
  const int64_t stages = arg(args, "stages", world->size());
  const int64_t replicas = world->size() / stages;
  const bool all_modes = arg(args, "all_modes", 0) != 0;
  // Built stage by stage, the tie declared: each stage a model of its own,
  // the head's copy perturbed (the copies take the embedding's value).
  const bool builder = arg(args, "builder", 0) != 0;
  Checks check;
  std::vector<Schedule> schedules(
      std::begin(gpipe::kEverySchedule), std::end(gpipe::kEverySchedule));
  schedules.push_back(Schedule::Auto);
  for (const Schedule schedule : schedules) {
    for (const Checkpoint mode :
         {Checkpoint::ExceptLast, Checkpoint::Never, Checkpoint::Always}) {
      if (!all_modes && mode != Checkpoint::ExceptLast) {
        continue;
      }
      const std::string what = std::string(gpipe::to_string(schedule)) + ", " +
          gpipe::to_string(mode);
      auto plain = make_tied_model();
      auto options = gd::DistributedOptions(stages)
                         .microbatches(3)
                         .schedule(schedule)
                         .checkpoint(mode)
                         .stages_per_rank(gpipe::stages_per_lane(schedule));
      auto pipe = builder
          ? built_stage_by_stage(world, options)
          : gd::DistributedGPipe(world, make_tied_model(), options);
      const int64_t positions_of_tie =
          pipe->ties().empty() ? 1 : pipe->ties().front().positions.size();
      check.equal(
          static_cast<double>(pipe->ties().size()),
          builder || positions_of_tie > 1 ? 1.0 : 0.0,
          what + ": ties found");
      const auto plain_parameters = gpipe::unique_parameters(*plain);
      const auto pipe_parameters = gpipe::unique_parameters(*pipe);
      torch::optim::SGD plain_sgd(
          plain_parameters, torch::optim::SGDOptions(0.2).momentum(0.9));
      torch::optim::SGD pipe_sgd(
          pipe_parameters, torch::optim::SGDOptions(0.2).momentum(0.9));
      torch::manual_seed(13);
      for (int step = 0; step < 3; ++step) {
        const std::string at = what + ", step " + std::to_string(step);
        const auto ids = torch::randint(0, kVocabulary, {10}, torch::kLong);
        const auto next = torch::randint(0, kVocabulary, {10}, torch::kLong);
        plain_sgd.zero_grad();
        const auto want = cross_entropy(plain->forward(ids), next);
        want.backward();
        const double want_norm = torch::nn::utils::clip_grad_norm_(
            plain_parameters, /*max_norm=*/0.3);
        pipe_sgd.zero_grad();
        const auto got = pipe->step(
            pipe->is_first()
                ? torch::tensor_split(ids, replicas)[pipe->replica()]
                : torch::Tensor(),
            pipe->is_last()
                ? torch::tensor_split(next, replicas)[pipe->replica()]
                : torch::Tensor(),
            cross_entropy);
        check.close(got, want.detach(), at + ": loss");
        const double got_norm = gd::clip_grad_norm(pipe, /*max_norm=*/0.3);
        check.equal(got_norm, want_norm, at + ": gradient norm");
        auto reference = plain->named_parameters();
        for (const auto& p : pipe->named_parameters()) {
          check.close(
              p.value().grad(),
              reference[plain_name(p.key())].grad(),
              at + ": clipped gradient of " + p.key());
        }
        plain_sgd.step();
        pipe_sgd.step();
        for (const auto& p : pipe->named_parameters()) {
          check.close(
              p.value(),
              reference[plain_name(p.key())],
              at + ": weight " + p.key());
        }
      }
    }
  }
  return check.report();
}

/// One step of the tied model on 6 random tokens (the first rank draws the
/// input, the last the targets).
void step_on_random_tokens(gd::DistributedGPipe& pipe) {
  pipe->step(
      pipe->is_first() ? torch::randint(0, kVocabulary, {6}, torch::kLong)
                       : torch::Tensor(),
      pipe->is_last() ? torch::randint(0, kVocabulary, {6}, torch::kLong)
                      : torch::Tensor(),
      cross_entropy);
}

/// A tied copy changed on one rank between steps: the next step is a
/// gpipe: error on every rank, naming the tie.
int tied_drift(const std::shared_ptr<gd::World>& world) {
  const auto args = mp::arguments();
  // Built stage by stage on a V schedule: the first rank holds both copies.
  const bool builder = arg(args, "builder", 0) != 0;
  const auto options = gd::DistributedOptions(world->size()).microbatches(2);
  auto pipe = builder ? built_stage_by_stage(
                            world,
                            gd::DistributedOptions(options)
                                .schedule(Schedule::ZeroBubbleV)
                                .stages_per_rank(2))
                      : gd::DistributedGPipe(world, make_tied_model(), options);
  torch::manual_seed(13);
  std::string error = "none";
  for (int step = 0; step < 4 && error == "none"; ++step) {
    if (step == 1 && pipe->is_first()) {
      torch::NoGradGuard no_grad;
      pipe->named_parameters()
          [builder ? "stage3.7.embedding.weight" : "0.weight"]
              .add_(1e-3);
    }
    try {
      step_on_random_tokens(pipe);
    } catch (const std::exception& e) {
      const std::string message = e.what();
      error = message.substr(0, message.find('\n'));
      std::cout << "RESULT step=" << step << std::endl;
    }
  }
  std::cout << "RESULT error=" << error << std::endl;
  return 0;
}

/// Microseconds on the steady clock, which every process on a host shares.
int64_t steady_now_us() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

/// Passes its input through and holds up its backward 150 ms; says when the
/// last hold-up ended.
struct HeldBackward : torch::autograd::Function<HeldBackward> {
  inline static std::atomic<int64_t> released_us{0};
  static torch::Tensor forward(
      torch::autograd::AutogradContext* /*context*/,
      const torch::Tensor& x) {
    return x.clone();
  }
  static torch::autograd::tensor_list backward(
      torch::autograd::AutogradContext* /*context*/,
      torch::autograd::tensor_list grads) {
    std::this_thread::sleep_for(std::chrono::milliseconds(150));
    released_us = steady_now_us();
    return {grads[0]};
  }
};

/// The tied model on 4 ranks with the first rank's backward held up: each
/// rank says when its step() returned, and the first when its last hold-up
/// ended.
int tie_with_a_slow_first_rank(const std::shared_ptr<gd::World>& world) {
  const auto tied = make_tied_model();
  torch::nn::Sequential model;
  bool first = true;
  for (const auto& layer : *tied) {
    model->push_back(layer);
    if (first) {
      model->push_back(torch::nn::Functional(
          [](const torch::Tensor& x) { return HeldBackward::apply(x); }));
      first = false;
    }
  }
  gd::DistributedGPipe pipe(
      world,
      model,
      gd::DistributedOptions(4).microbatches(2).balance({3, 2, 2, 2}));
  torch::manual_seed(13);
  for (int step = 0; step < 2; ++step) {
    step_on_random_tokens(pipe);
    std::cout << "RESULT returned_us=" << steady_now_us() << std::endl;
  }
  std::cout << "RESULT released_us=" << HeldBackward::released_us.load()
            << std::endl;
  return 0;
}

/// Bad tie declarations: each the same gpipe: error on every rank, at
/// construction.
int declared_tie_errors(const std::shared_ptr<gd::World>& world) {
  const auto options = gd::DistributedOptions(world->size()).microbatches(2);
  using Names = std::vector<std::string>;
  const std::vector<std::pair<bool, Names>> cases = {
      {true, {"stage0.0.weight"}},
      {true,
       {"stage0.0.weight", "stage1.7.embedding.weight", "stage0.0.weight"}},
      {true, {"stage0.0.weight", "stage1.9.weight"}},
      {true, {"stage0.0.weight", "stage0.1.weight"}},
      {false, {"0.weight", "7.embedding.weight"}},
      {false, {"0.weight", "1.embedding.weight"}},
  };
  for (size_t c = 0; c < cases.size(); ++c) {
    const auto& [builder, names] = cases[c];
    std::string error = "none";
    try {
      if (c == 5) {
        // The head right after its embedding, on one stage: one tensor.
        torch::nn::Embedding embedding(kVocabulary, kWidth);
        torch::nn::Sequential model(
            embedding,
            gpipe_test::TiedHead(embedding),
            torch::nn::Linear(kVocabulary, kVocabulary),
            torch::nn::Linear(kVocabulary, kVocabulary));
        gd::DistributedGPipe(
            world, model, gd::DistributedOptions(options).tie(names));
      } else if (builder) {
        auto declared = gd::DistributedOptions(options).tie(names);
        built_stage_by_stage(world, declared, /*declare=*/false);
      } else {
        gd::DistributedGPipe(
            world,
            make_tied_model(),
            gd::DistributedOptions(options).tie(names));
      }
    } catch (const c10::Error& e) {
      error = e.what_without_backtrace();
    }
    std::cout << "RESULT case" << c << "=" << error.substr(0, error.find('\n'))
              << std::endl;
  }
  return 0;
}

/// A NaN in one rank's gradients makes every rank's norm NaN, for the
/// infinity norm too (a max), and error_if_nonfinite a gpipe: error on
/// every rank.
int nan_norm(const std::shared_ptr<gd::World>& world) {
  auto pipe = gd::DistributedGPipe(
      world,
      make_tied_model(),
      gd::DistributedOptions(world->size()).microbatches(2));
  for (const double norm_type :
       {2.0, std::numeric_limits<double>::infinity()}) {
    torch::manual_seed(3);
    const auto ids = torch::randint(0, kVocabulary, {6}, torch::kLong);
    pipe->zero_grad();
    pipe->step(ids, ids, cross_entropy);
    // Rank 1 holds a Linear that no other rank counts.
    if (world->rank() == 1) {
      TORCH_CHECK(!pipe->counted_parameters().empty(), "rank 1 counts none");
      pipe->counted_parameters().back().grad().view({-1})[0] =
          std::numeric_limits<double>::quiet_NaN();
    }
    const double norm = gd::clip_grad_norm(pipe, 1.0, norm_type);
    std::cout << "RESULT norm_" << norm_type << "=" << norm << std::endl;
  }
  std::string error = "none";
  try {
    gd::clip_grad_norm(
        pipe,
        1.0,
        std::numeric_limits<double>::infinity(),
        /*error_if_nonfinite=*/true);
  } catch (const c10::Error& e) {
    error = e.what_without_backtrace();
  }
  std::cout << "RESULT error=" << error.substr(0, error.find('\n'))
            << std::endl;
  return 0;
}

/// fp16-style loss scaling across ranks: a forced inf on one rank at one
/// step makes every rank skip it and back off the scale; every step's
/// weights and scale equal plain scaling's, done by hand.
int scaled(const std::shared_ptr<gd::World>& world) {
  const auto args = mp::arguments();
  const int64_t inf_rank = arg(args, "inf_rank", 0);
  const int64_t inf_step = arg(args, "inf_step", 2);
  Checks check;
  auto plain = make_tied_model();
  auto pipe = gd::DistributedGPipe(
      world,
      make_tied_model(),
      gd::DistributedOptions(world->size())
          .microbatches(3)
          .schedule(Schedule::OneFOneB));
  gd::GradScaler scaler(
      world, gpipe::GradScalerOptions().init_scale(1024).growth_interval(2));
  const auto plain_parameters = gpipe::unique_parameters(*plain);
  torch::optim::SGD plain_sgd(plain_parameters, torch::optim::SGDOptions(0.1));
  torch::optim::SGD pipe_sgd(
      gpipe::unique_parameters(*pipe), torch::optim::SGDOptions(0.1));
  gpipe_test::LossScalingByHand by_hand{1024, 2};
  // The parameter rank inf_rank poisons, known to every rank: the first
  // parameter of that rank's stage.
  const auto first_name_of_rank = [&](int64_t rank) {
    auto probe = make_tied_model();
    const auto balance = gpipe::detail::resolve_balance(8, world->size(), {});
    int64_t layer = 0;
    for (int64_t k = 0; k < rank; ++k) {
      layer += balance[static_cast<size_t>(k)];
    }
    // Tanh layers have no parameters: the next layer that has one.
    for (;; ++layer) {
      const auto named = probe->ptr(layer)->named_parameters();
      if (named.size() > 0) {
        return std::to_string(layer) + "." + named.begin()->key();
      }
    }
  };
  const std::string inf_name = first_name_of_rank(inf_rank);
  torch::manual_seed(17);
  for (int64_t step = 0; step < 6; ++step) {
    const std::string at = "step " + std::to_string(step);
    const auto ids = torch::randint(0, kVocabulary, {9}, torch::kLong);
    const auto next = torch::randint(0, kVocabulary, {9}, torch::kLong);
    // Plain scaling, by hand.
    plain_sgd.zero_grad();
    const auto want = cross_entropy(plain->forward(ids), next);
    (want * by_hand.scale).backward();
    if (step == inf_step) {
      plain->named_parameters()[inf_name].grad().view({-1})[0] = INFINITY;
    }
    const bool plain_inf = by_hand.step(plain_parameters, plain_sgd);
    // The pipe.
    pipe_sgd.zero_grad();
    const auto loss = pipe->step(
        pipe->is_first() ? ids : torch::Tensor(),
        pipe->is_last() ? next : torch::Tensor(),
        scaler.scaled(cross_entropy));
    check.close(scaler.unscaled(loss), want.detach(), at + ": loss");
    if (step == inf_step && world->rank() == inf_rank) {
      pipe->named_parameters()[inf_name].grad().view({-1})[0] = INFINITY;
    }
    const bool stepped = scaler.step(pipe_sgd);
    check.equal(stepped ? 1.0 : 0.0, plain_inf ? 0.0 : 1.0, at + ": stepped");
    scaler.update();
    check.equal(scaler.scale(), by_hand.scale, at + ": scale");
    auto reference = plain->named_parameters();
    for (const auto& p : pipe->named_parameters()) {
      check.close(
          p.value(),
          reference[plain_name(p.key())],
          at + ": weight " + p.key());
    }
  }
  // The scale saved on one rank comes back on a fresh scaler.
  std::stringstream saved;
  torch::save(scaler, saved);
  gd::GradScaler restored(world);
  torch::load(restored, saved);
  check.equal(restored.scale(), scaler.scale(), "restored scale");
  check.equal(
      static_cast<double>(restored.growth_tracker()),
      static_cast<double>(scaler.growth_tracker()),
      "restored growth tracker");
  return check.report();
}

/// ZeRO-1 on 2 stages x 2 replicas: SGD with momentum and AdamW, sharded,
/// step like the unsharded optimizer on plain training of the global batch
/// (tie and clipping included), with about half the optimizer state.
int sharded(const std::shared_ptr<gd::World>& world) {
  const auto args = mp::arguments();
  const int64_t stages = arg(args, "stages", 2);
  const int64_t replicas = world->size() / stages;
  Checks check;
  for (const std::string kind : {"sgd", "adamw"}) {
    const auto make = [&](std::vector<torch::Tensor> parameters)
        -> std::unique_ptr<torch::optim::Optimizer> {
      if (kind == "sgd") {
        return std::make_unique<torch::optim::SGD>(
            std::move(parameters), torch::optim::SGDOptions(0.1).momentum(0.9));
      }
      return std::make_unique<torch::optim::AdamW>(
          std::move(parameters),
          torch::optim::AdamWOptions(0.01).weight_decay(0.1));
    };
    auto plain = make_tied_model();
    auto pipe = gd::DistributedGPipe(
        world,
        make_tied_model(),
        gd::DistributedOptions(stages).microbatches(2).schedule(
            Schedule::OneFOneB));
    auto plain_optimizer = make(gpipe::unique_parameters(*plain));
    gd::ShardedOptimizer optimizer(*pipe, make);
    torch::manual_seed(29);
    for (int step = 0; step < 3; ++step) {
      const std::string at = kind + ", step " + std::to_string(step);
      const auto ids = torch::randint(0, kVocabulary, {8}, torch::kLong);
      const auto next = torch::randint(0, kVocabulary, {8}, torch::kLong);
      plain_optimizer->zero_grad();
      cross_entropy(plain->forward(ids), next).backward();
      torch::nn::utils::clip_grad_norm_(
          gpipe::unique_parameters(*plain), /*max_norm=*/0.5);
      plain_optimizer->step();
      optimizer.zero_grad();
      pipe->step(
          torch::tensor_split(ids, replicas)[pipe->replica()],
          torch::tensor_split(next, replicas)[pipe->replica()],
          cross_entropy);
      gd::clip_grad_norm(pipe, /*max_norm=*/0.5);
      optimizer.step();
      auto reference = plain->named_parameters();
      for (const auto& p : pipe->named_parameters()) {
        check.close(p.value(), reference[p.key()], at + ": weight " + p.key());
      }
    }
    // This rank's state against what the unsharded optimizer holds for the
    // same parameters.
    int64_t unsharded = 0;
    auto reference = plain->named_parameters();
    std::set<const c10::TensorImpl*> seen;
    for (const auto& p : pipe->named_parameters()) {
      const auto& q = reference[p.key()];
      if (!seen.insert(q.unsafeGetTensorImpl()).second) {
        continue;
      }
      const auto found = plain_optimizer->state().find(q.unsafeGetTensorImpl());
      if (found != plain_optimizer->state().end()) {
        unsharded += gd::detail::state_bytes(*found->second);
      }
    }
    const int64_t mine = gd::optimizer_state_bytes(optimizer.shard_optimizer());
    std::cout << "RESULT " << kind << "_state_bytes=" << mine << "/"
              << unsharded << std::endl;
    ++check.checks;
    // One replica holds it all; two hold about half each.
    const bool expected = replicas == 1 ? mine == unsharded
                                        : mine > 0 && mine * 4 < unsharded * 3;
    if (!expected) {
      ++check.failures;
      std::cout << "MISMATCH " << kind << ": state of " << mine
                << " bytes against " << unsharded << " unsharded" << std::endl;
    }
  }
  return check.report();
}

void expect_all_succeeded(const std::vector<mp::Outcome>& outcomes) {
  for (const auto& outcome : outcomes) {
    EXPECT_TRUE(outcome.succeeded()) << outcome;
    EXPECT_EQ(outcome.result("mismatches"), "0") << outcome;
  }
}

} // namespace

namespace gpipe_test {

int run_gradients_scenario(
    const std::string& scenario,
    const std::shared_ptr<gd::World>& world) {
  if (scenario == "tied_clipped") {
    return tied_clipped(world);
  }
  if (scenario == "tied_drift") {
    return tied_drift(world);
  }
  if (scenario == "tie_with_a_slow_first_rank") {
    return tie_with_a_slow_first_rank(world);
  }
  if (scenario == "declared_tie_errors") {
    return declared_tie_errors(world);
  }
  if (scenario == "scaled") {
    return scaled(world);
  }
  if (scenario == "nan_norm") {
    return nan_norm(world);
  }
  if (scenario == "sharded") {
    return sharded(world);
  }
  return kUnknownScenario;
}

} // namespace gpipe_test

TEST(
    DistributedGradients,
    ATiedEmbeddingAndHeadOnTwoRanksTrainLikePlainClippedOnEverySchedule) {
  expect_all_succeeded(
      mp::run({"tied_clipped", "stages=2,all_modes=1", /*world=*/2}));
}

TEST(
    DistributedGradients,
    ATiedEmbeddingAndHeadOnFourRanksTrainLikePlainClippedOnEverySchedule) {
  expect_all_succeeded(mp::run({"tied_clipped", "stages=4", /*world=*/4}));
}

TEST(
    DistributedGradients,
    TiesAndClippingWithTwoReplicasOfTwoStagesTrainLikePlainOnTheGlobalBatch) {
  expect_all_succeeded(mp::run({"tied_clipped", "stages=2", /*world=*/4}));
}

TEST(
    DistributedGradients,
    DeclaredTiesOfAPipeBuiltStageByStageTrainLikePlainClippedOnEverySchedule) {
  // Two ranks: the V schedules hold both copies on the first rank.
  expect_all_succeeded(
      mp::run({"tied_clipped", "stages=2,builder=1", /*world=*/2}));
  // Two replicas of two stages.
  expect_all_succeeded(
      mp::run({"tied_clipped", "stages=2,builder=1", /*world=*/4}));
}

TEST(DistributedGradients, BadTieDeclarationsAreTheSameErrorOnEveryRank) {
  const std::vector<std::string> expected = {
      "needs at least two names, got [stage0.0.weight]",
      "names \"stage0.0.weight\" twice",
      "names \"stage1.9.weight\", which no stage of the pipe holds (a pipe "
      "built stage by stage",
      "names \"stage0.0.weight\" (shape [11, 6], Double) and "
      "\"stage0.1.weight\" (shape [6, 6], Double): the copies of a tie need "
      "one shape",
      "names \"0.weight\", which the pipe ties already",
      "names \"1.embedding.weight\" and another name of the same tensor",
  };
  for (const auto& outcome :
       mp::run({"declared_tie_errors", "", /*world=*/2})) {
    EXPECT_TRUE(outcome.succeeded()) << outcome;
    for (size_t c = 0; c < expected.size(); ++c) {
      const auto error = outcome.result("case" + std::to_string(c));
      EXPECT_EQ(error.rfind("gpipe: DistributedOptions::tie ", 0), 0u)
          << outcome;
      EXPECT_NE(error.find(expected[c]), std::string::npos)
          << "case " << c << ": " << error;
    }
  }
}

TEST(
    DistributedGradients,
    ADeclaredCopyModifiedBehindThePipesBackFailsEveryRank) {
  const auto outcomes = mp::run({"tied_drift", "builder=1", /*world=*/2});
  for (const auto& outcome : outcomes) {
    EXPECT_TRUE(outcome.succeeded()) << outcome;
    EXPECT_NE(
        outcome.result("error").find("tied parameter \"stage0.0.weight\""),
        std::string::npos)
        << outcome;
    EXPECT_EQ(outcome.result("step"), "1") << outcome;
  }
}

TEST(DistributedGradients, ATiedCopyModifiedBehindThePipesBackFailsEveryRank) {
  const auto outcomes = mp::run({"tied_drift", "", /*world=*/4});
  for (const auto& outcome : outcomes) {
    EXPECT_TRUE(outcome.succeeded()) << outcome;
    EXPECT_NE(
        outcome.result("error").find("tied parameter \"0.weight\""),
        std::string::npos)
        << outcome;
    EXPECT_EQ(outcome.result("step"), "1") << outcome;
  }
}

TEST(
    DistributedGradients,
    TheMiddleRanksOfATiedPipeGetTheLossWithoutWaitingForTheFirstRankToDrain) {
  // The tie joins the first and the last rank; the first rank's backward is
  // held up 150 ms a micro-batch. The loss goes out before the tie's sum,
  // so ranks 1 and 2 return while rank 0 still drains.
  const auto outcomes =
      mp::run({"tie_with_a_slow_first_rank", "", /*world=*/4});
  ASSERT_EQ(outcomes.size(), 4U);
  for (const auto& outcome : outcomes) {
    ASSERT_TRUE(outcome.succeeded()) << outcome;
  }
  const int64_t released = std::stoll(outcomes[0].result("released_us"));
  for (const int rank : {1, 2}) {
    EXPECT_LT(std::stoll(outcomes[rank].result("returned_us")), released)
        << outcomes[rank];
  }
  // The owners wait for the tie's sum: they return after the hold-up.
  for (const int rank : {0, 3}) {
    EXPECT_GT(std::stoll(outcomes[rank].result("returned_us")), released)
        << outcomes[rank];
  }
}

TEST(
    DistributedGradients,
    AnInfOnOneRankMakesEveryRankSkipTheStepAndHalveTheScale) {
  expect_all_succeeded(
      mp::run({"scaled", "inf_rank=1,inf_step=2", /*world=*/2}));
  expect_all_succeeded(
      mp::run({"scaled", "inf_rank=3,inf_step=3", /*world=*/4}));
}

TEST(
    ShardedOptimizer,
    TwoReplicasOfTwoStagesStepSgdAndAdamWLikePlainWithAboutHalfTheState) {
  const auto outcomes = mp::run({"sharded", "stages=2", /*world=*/4});
  expect_all_succeeded(outcomes);
  for (const auto& outcome : outcomes) {
    std::cout << "rank " << outcome.rank
              << ": SGD state bytes (sharded/unsharded) "
              << outcome.result("sgd_state_bytes") << ", AdamW "
              << outcome.result("adamw_state_bytes") << std::endl;
  }
}

TEST(ShardedOptimizer, OneReplicaHoldsTheWholeStateAndStepsLikePlain) {
  expect_all_succeeded(mp::run({"sharded", "stages=2", /*world=*/2}));
}

TEST(ShardedOptimizer, ShardsBalanceBytesLargestFirstTheSameOnEveryReplica) {
  const std::vector<torch::Tensor> parameters{
      torch::zeros({10}),
      torch::zeros({40}),
      torch::zeros({30}),
      torch::zeros({20}, torch::kFloat64),
      torch::zeros({5})};
  // Bytes 40, 160, 120, 160, 20: largest first, each to the lightest.
  EXPECT_EQ(
      gd::detail::shard_of_parameters(parameters, 2),
      (std::vector<int64_t>{1, 0, 0, 1, 1}));
  EXPECT_EQ(
      gd::detail::shard_of_parameters(parameters, 1),
      (std::vector<int64_t>(5, 0)));
}

TEST(
    DistributedGradients,
    TheTieWatchSeesAnyChangedElementWithinItsStrideOfSteps) {
  // 200,000 elements: past the first check, every 4th from a moving offset.
  const auto copy = torch::randn({400, 500});
  auto changed = copy.clone();
  changed[123][457] += 1e-6; // element 61,957, at offset 1 of stride 4
  EXPECT_NE(
      gd::detail::bits_fingerprint(copy, 0),
      gd::detail::bits_fingerprint(changed, 0));
  int64_t seen = 0;
  for (int64_t check = 1; check <= 4; ++check) {
    seen += gd::detail::bits_fingerprint(copy, check) !=
        gd::detail::bits_fingerprint(changed, check);
  }
  EXPECT_EQ(seen, 1);
  // A change to most elements is seen by every check.
  const auto stepped = copy * 0.999f;
  for (int64_t check = 0; check < 4; ++check) {
    EXPECT_NE(
        gd::detail::bits_fingerprint(copy, check),
        gd::detail::bits_fingerprint(stepped, check));
  }
}

TEST(DistributedGradients, ANaNGradientOnOneRankMakesEveryRanksNormNaN) {
  for (const auto& outcome : mp::run({"nan_norm", "", /*world=*/4})) {
    EXPECT_TRUE(outcome.succeeded()) << outcome;
    EXPECT_EQ(outcome.result("norm_2"), "nan") << outcome;
    EXPECT_EQ(outcome.result("norm_inf"), "nan") << outcome;
    EXPECT_NE(
        outcome.result("error").find(
            "gpipe: the total gradient norm of order inf is nan"),
        std::string::npos)
        << outcome;
  }
}
