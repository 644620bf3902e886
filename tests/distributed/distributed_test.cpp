// The pipe across processes: real ranks over Gloo on 127.0.0.1, started by
// the test itself (multiprocess.h), compared with plain training of the same
// seeded model in each rank, and failing as the README promises.
#include "../test_support.h"
#include "gradients_scenarios.h"
#include "multiprocess.h"

#include <gpipe/distributed.h>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <dirent.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <deque>
#include <fstream>
#include <iostream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

namespace mp = gpipe_test::multiprocess;
using mp::arg;
using mp::plain_name;
namespace gd = gpipe::distributed;
using gpipe::Checkpoint;
using gpipe::Reduction;
using gpipe::Schedule;

/// Every fixed schedule, then Schedule::Auto.
const std::vector<Schedule> kSchedules = [] {
  std::vector<Schedule> every(
      std::begin(gpipe::kEverySchedule), std::end(gpipe::kEverySchedule));
  every.push_back(Schedule::Auto);
  return every;
}();

constexpr Checkpoint kModes[] = {
    Checkpoint::Never,
    Checkpoint::ExceptLast,
    Checkpoint::Always};

// ---------------------------------------------------------------------------
// What the ranks run.
// ---------------------------------------------------------------------------

/// 8 Linear(5, 5) + Tanh pairs in double, seeded: every rank builds the same.
torch::nn::Sequential make_model() {
  torch::manual_seed(7);
  torch::nn::Sequential seq;
  for (int l = 0; l < 8; ++l) {
    seq->push_back(torch::nn::Linear(5, 5));
    seq->push_back(torch::nn::Tanh());
  }
  seq->to(torch::kFloat64);
  return seq;
}

torch::Tensor loss_of(
    const torch::Tensor& out,
    const torch::Tensor& target,
    Reduction reduction) {
  return torch::mse_loss(
      out,
      target,
      reduction == Reduction::Mean ? torch::Reduction::Mean
                                   : torch::Reduction::Sum);
}

/// Whether the last step's replica sums started where Note [Replica sums
/// overlap the drain] says, for the MLP of make_model (printed if not):
/// all after the drain with `bucket_bytes` 0; else, on a rank of one stage
/// with no hooked parameter whose last weight-gradient op is a B, every
/// bucket during that B (a W of the first stage has nothing left to do: its
/// I did the weights too, as no input requires grad).
bool expected_replica_sums(
    gd::DistributedGPipeImpl& pipe,
    int64_t m,
    int64_t bucket_bytes,
    bool hook,
    const std::string& what,
    int64_t step) {
  const auto& lane = pipe.program_for(m, pipe.last_step_by_order())
                         .lanes[static_cast<size_t>(pipe.position())];
  gpipe::Op last_weight_op = gpipe::Op::F;
  for (const auto& action : lane) {
    if (action.op == gpipe::Op::B || action.op == gpipe::Op::W) {
      last_weight_op = action.op;
    }
  }
  const auto sums = pipe.last_step_replica_sums();
  bool expected = sums.buckets ==
      sums.during_backward + sums.after_backward + sums.after_drain;
  if (pipe.replicas() == 1) {
    expected = expected && sums.buckets == 0;
  } else if (bucket_bytes == 0) {
    // One bucket (every parameter is float64), after the drain.
    expected = expected && sums.buckets == 1 && sums.after_drain == 1;
  } else if (bucket_bytes > 0 && bucket_bytes <= 8) {
    // A bucket per parameter.
    const auto parameters = static_cast<int64_t>(pipe.parameters().size());
    expected = expected && sums.buckets == parameters;
    if (hook && pipe.is_first()) {
      // The hooked weight is registered first, so its bucket starts last.
      expected = expected && sums.after_drain == 1;
    } else if (pipe.my_stages().size() == 1 && last_weight_op == gpipe::Op::B) {
      expected = expected && sums.during_backward == parameters;
    } else {
      expected = expected && sums.after_drain == 0;
    }
  }
  if (!expected) {
    std::cout << "MISMATCH " << what << ": step " << step << " on rank "
              << pipe.world()->rank() << " started " << sums.buckets
              << " replica sums: " << sums.during_backward
              << " during its last backward, " << sums.after_backward
              << " after it, " << sums.after_drain << " after the drain"
              << std::endl;
  }
  return expected;
}

/// Trains a DistributedGPipe and plain training of the global batch side by
/// side for `steps` SGD steps on every schedule and checkpoint mode asked
/// for; returns the number of mismatches (each printed).
int train_like_plain(const std::shared_ptr<gd::World>& world) {
  const auto args = mp::arguments();
  const int64_t stages = arg(args, "stages", world->size());
  const int64_t steps = arg(args, "steps", 1);
  const bool all_modes = arg(args, "all_modes", 0) != 0;
  const bool builder = arg(args, "builder", 0) != 0;
  const int64_t replicas = world->size() / stages;
  const auto numbers = [&](const char* key, const std::string& fallback) {
    std::vector<int64_t> values;
    std::stringstream items(args.count(key) ? args.at(key) : fallback);
    std::string item;
    while (std::getline(items, item, ':')) {
      values.push_back(std::stoll(item));
    }
    return values;
  };
  const std::vector<int64_t> microbatch_counts = numbers("m", "1");
  // The global batch of each step, in turn: a new size is agreed anew.
  const std::vector<int64_t> batches = numbers("batches", "11");
  // Replica bucket sizes to train with; -1: the default.
  const std::vector<int64_t> bucket_sizes = numbers("bucket_bytes", "-1");
  // A hook on the first stage's first parameter: its gradient is delivered
  // after the drain (Note [Replica sums overlap the drain]).
  const bool hook = arg(args, "hook", 0) != 0;
  int failures = 0;
  int checks = 0;
  const auto expect_close = [&](const torch::Tensor& got,
                                const torch::Tensor& want,
                                const std::string& what) {
    const bool same = got.defined() == want.defined() &&
        (!got.defined() ||
         torch::allclose(got.to(torch::kCPU), want, 1e-9, 1e-11));
    ++checks;
    if (!same) {
      ++failures;
      std::cout << "MISMATCH " << what << "\n got " << got << "\n want " << want
                << std::endl;
    }
  };
  for (const Reduction reduction : {Reduction::Mean, Reduction::Sum}) {
    if (reduction == Reduction::Sum && arg(args, "sum", 0) == 0) {
      continue;
    }
    for (const Schedule schedule : kSchedules) {
      for (const Checkpoint mode : kModes) {
        if (!all_modes && mode != Checkpoint::ExceptLast) {
          continue;
        }
        for (const int64_t m : microbatch_counts) {
          for (const int64_t bucket_bytes : bucket_sizes) {
            const std::string what = std::string("schedule ") +
                gpipe::to_string(schedule) + ", checkpoint " +
                gpipe::to_string(mode) + ", m " + std::to_string(m) + ", " +
                gpipe::to_string(reduction) + ", buckets of " +
                std::to_string(bucket_bytes) + " B";
            auto plain = make_model();
            auto options =
                gd::DistributedOptions(stages)
                    .microbatches(m)
                    .schedule(schedule)
                    .checkpoint(mode)
                    .loss_reduction(reduction)
                    .match_by_order(arg(args, "by_order", 0) != 0)
                    .stages_per_rank(gpipe::stages_per_lane(schedule));
            if (bucket_bytes >= 0) {
              options.replica_bucket_bytes(bucket_bytes);
            }
            if (arg(args, "gloo", 0) != 0) {
              options.backend(gd::Backend::Gloo);
            }
            if (arg(args, "nccl", 0) != 0) {
              // cuda:LOCAL_RANK, a GPU per rank.
              options.device(torch::kCUDA).backend(gd::Backend::Nccl);
            } else if (arg(args, "cuda", 0) != 0) {
              options.device(torch::Device(torch::kCUDA, 0))
                  .backend(gd::Backend::Gloo);
            }
            if (arg(args, "user_program", 0) != 0) {
              // The schedule's program, given as the user's own: it places
              // the stages on the ranks itself.
              if (schedule == Schedule::Auto) {
                continue;
              }
              const int64_t n = stages * options.stages_per_rank();
              options.program(gpipe::build_program(
                  schedule,
                  n,
                  m,
                  gpipe::schedule_placement(schedule, n, stages)));
            }
            std::vector<int64_t> built;
            gd::DistributedGPipe pipe(nullptr);
            if (builder) {
              const auto whole = make_model();
              const int64_t n = stages * options.stages_per_rank();
              const auto balance = gpipe::detail::resolve_balance(
                  static_cast<int64_t>(whole->size()), n, {});
              pipe = gd::DistributedGPipe(
                  world,
                  [&](int64_t s) {
                    built.push_back(s);
                    torch::nn::Sequential stage;
                    int64_t first = 0;
                    for (int64_t k = 0; k < s; ++k) {
                      first += balance[static_cast<size_t>(k)];
                    }
                    for (int64_t l = first;
                         l < first + balance[static_cast<size_t>(s)];
                         ++l) {
                      stage->push_back(std::to_string(l), whole->begin()[l]);
                    }
                    return stage;
                  },
                  options);
              if (built != pipe->my_stages()) {
                ++failures;
                std::cout << "MISMATCH the builder built other stages than "
                             "this rank's"
                          << std::endl;
              }
            } else {
              pipe = gd::DistributedGPipe(world, make_model(), options);
            }
            if (hook && pipe->is_first()) {
              pipe->parameters().front().register_hook(
                  [](torch::Tensor grad) { return grad; });
            }
            torch::manual_seed(11);
            std::set<int64_t> seen_batches;
            for (int64_t step = 0; step < steps; ++step) {
              // Uneven: 11 samples give replica shards of 6 and 5.
              const int64_t batch =
                  batches[static_cast<size_t>(step) % batches.size()];
              const auto x = torch::randn({batch, 5}, torch::kFloat64);
              const auto y = torch::randn({batch, 5}, torch::kFloat64);
              plain->zero_grad();
              const auto want = loss_of(plain->forward(x), y, reduction);
              want.backward();
              const auto shard_x =
                  torch::tensor_split(x, replicas)[pipe->replica()];
              const auto shard_y =
                  torch::tensor_split(y, replicas)[pipe->replica()];
              pipe->zero_grad();
              const auto got = pipe->step(
                  pipe->is_first() ? shard_x : torch::Tensor(),
                  pipe->is_last() ? shard_y : torch::Tensor(),
                  [&](const torch::Tensor& out, const torch::Tensor& target) {
                    return loss_of(out, target, reduction);
                  });
              expect_close(
                  got,
                  want.detach(),
                  what + ": loss of step " + std::to_string(step));
              // Note [Ordered steps]: the first step of a batch shape agrees
              // the shapes, with tags; the next ones go by order.
              const bool by_order =
                  arg(args, "by_order", 0) != 0 || arg(args, "nccl", 0) != 0;
              const bool shape_seen_before = seen_batches.count(batch) > 0;
              seen_batches.insert(batch);
              ++checks;
              // Backend::Auto on CPUs: the pipe's own sockets.
              const bool sockets = arg(args, "gloo", 0) == 0 && !by_order &&
                  arg(args, "cuda", 0) == 0;
              if (pipe->uses_sockets() != sockets) {
                ++failures;
                std::cout << "MISMATCH " << what << ": over the pipe's own "
                          << "sockets: " << pipe->uses_sockets() << std::endl;
              }
              if (pipe->last_step_by_order() !=
                  (by_order && shape_seen_before)) {
                ++failures;
                std::cout << "MISMATCH " << what << ": step " << step
                          << " went by order: " << pipe->last_step_by_order()
                          << std::endl;
              }
              if (!expected_replica_sums(
                      *pipe, m, bucket_bytes, hook, what, step)) {
                ++failures;
              }
              ++checks;
              auto reference = plain->named_parameters();
              for (const auto& p : pipe->named_parameters()) {
                const auto& q = reference[plain_name(p.key())];
                expect_close(
                    p.value().grad(),
                    q.grad(),
                    what + ": gradient of " + p.key() + " at step " +
                        std::to_string(step));
              }
              torch::NoGradGuard no_grad;
              for (auto& q : plain->parameters()) {
                q.sub_(0.1 * q.grad());
              }
              for (auto& p : pipe->parameters()) {
                p.sub_(0.1 * p.grad());
              }
            }
            auto reference = plain->named_parameters();
            for (const auto& p : pipe->named_parameters()) {
              expect_close(
                  p.value(),
                  reference[plain_name(p.key())],
                  what + ": weight " + p.key() + " after the steps");
            }
          }
        }
      }
    }
  }
  std::cout << "RESULT checks=" << checks << std::endl;
  std::cout << "RESULT mismatches=" << failures << std::endl;
  return failures == 0 ? 0 : 1;
}

/// A user's own exception type (Note [Exceptions keep their type]).
struct TrapSprang : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// Raises the fault `kind` on rank `at` from its second step on.
struct TrapImpl : torch::nn::Module {
  torch::Tensor forward(torch::Tensor x) {
    if (armed) {
      if (kind == "throw") {
        throw TrapSprang("the trap sprang in forward");
      }
      if (kind == "int") {
        throw 7;
      }
      if (kind == "exit") {
        std::exit(3);
      }
      if (kind == "kill") {
        std::raise(SIGKILL);
      }
      if (kind == "stuck") {
        std::this_thread::sleep_for(std::chrono::hours(1));
      }
    }
    return x;
  }
  std::string kind;
  bool armed = false;
};
TORCH_MODULE(Trap);

int fault(const std::shared_ptr<gd::World>& world) {
  const auto args = mp::arguments();
  const std::string kind = args.at("kind");
  const int64_t at = arg(args, "at", 1);
  auto model = make_model();
  Trap trap;
  trap->kind = kind;
  // The trap sits in the middle of rank `at`'s stage.
  const int64_t per_stage = 16 / world->size();
  torch::nn::Sequential seq;
  for (size_t l = 0; l < model->size(); ++l) {
    if (static_cast<int64_t>(l) == at * per_stage + 1) {
      seq->push_back(trap);
    }
    seq->push_back(model->begin()[static_cast<int64_t>(l)]);
  }
  std::vector<int64_t> balance(static_cast<size_t>(world->size()), per_stage);
  balance[static_cast<size_t>(at)] += 1;
  gd::DistributedGPipe pipe(
      world,
      seq,
      gd::DistributedOptions(world->size())
          .microbatches(4)
          .balance(balance)
          .schedule(Schedule::OneFOneB)
          .backend(
              arg(args, "gloo", 0) != 0 ? gd::Backend::Gloo
                                        : gd::Backend::Auto));
  const bool loss_throws = kind == "loss" && pipe->is_last();
  const auto x = torch::randn({8, 5}, torch::kFloat64);
  const auto y = torch::randn({8, 5}, torch::kFloat64);
  for (int step = 0; step < 2; ++step) {
    trap->armed = step == 1 && world->rank() == at;
    const auto start = std::chrono::steady_clock::now();
    try {
      pipe->step(x, y, [&](const torch::Tensor& out, const torch::Tensor& t) {
        if (step == 1 && loss_throws) {
          throw std::runtime_error("the loss function failed");
        }
        return torch::mse_loss(out, t);
      });
    } catch (...) {
      // The rank that failed gets its own exception, as itself.
      std::string message;
      try {
        throw;
      } catch (const TrapSprang& e) {
        std::cout << "RESULT type=TrapSprang" << std::endl;
        message = e.what();
      } catch (int value) {
        std::cout << "RESULT type=int" << std::endl;
        message = "int " + std::to_string(value);
      } catch (const std::exception& e) {
        message = e.what();
      }
      message = message.substr(0, message.find('\n'));
      std::cout << "RESULT error=" << message << std::endl;
      std::cout << "RESULT seconds="
                << std::chrono::duration<double>(
                       std::chrono::steady_clock::now() - start)
                       .count()
                << std::endl;
      try {
        pipe->step(x, y, [](const torch::Tensor& out, const torch::Tensor& t) {
          return torch::mse_loss(out, t);
        });
      } catch (const std::exception& again) {
        message = again.what();
        std::cout << "RESULT again=" << message.substr(0, message.find('\n'))
                  << std::endl;
      }
      if (const int64_t later = arg(args, "read_store_after_ms", 0);
          later > 0 && world->rank() != 0) {
        // Long after rank 0's step failed: is its store still up?
        std::this_thread::sleep_for(std::chrono::milliseconds(later));
        bool readable = false;
        try {
          world->store()->check({"gpipe/worlds_ended"}); // any answer
          readable = true;
        } catch (const std::exception&) {
        }
        std::cout << "RESULT store_after=" << (readable ? "up" : "gone")
                  << std::endl;
      }
      return step == 1 ? 0 : 2;
    }
  }
  std::cout << "RESULT error=none" << std::endl;
  return 1;
}

/// Widens its input by a zero column on every other call: its output's
/// shape changes while the pipe's input shape does not.
struct WidenImpl : torch::nn::Module {
  torch::Tensor forward(torch::Tensor x) {
    return calls++ % 2 == 0
        ? x
        : torch::cat({x, torch::zeros({x.size(0), 1}, x.options())}, 1);
  }
  int64_t calls = 0;
};
TORCH_MODULE(Widen);

/// Keeps the first `width` columns.
struct NarrowImpl : torch::nn::Module {
  torch::Tensor forward(torch::Tensor x) {
    return x.narrow(1, 0, 5);
  }
};
TORCH_MODULE(Narrow);

/// Two steps of a model whose activation shapes change between steps of one
/// input shape; reports the error, if any.
int dynamic_shapes(const std::shared_ptr<gd::World>& world) {
  const auto args = mp::arguments();
  torch::manual_seed(3);
  torch::nn::Sequential seq(
      torch::nn::Linear(5, 5), Widen(), Narrow(), torch::nn::Linear(5, 5));
  seq->to(torch::kFloat64);
  gd::DistributedGPipe pipe(
      world,
      seq,
      gd::DistributedOptions(2).microbatches(1).agree_shapes_every_step(
          arg(args, "every_step", 0) != 0));
  const auto x = torch::randn({4, 5}, torch::kFloat64);
  try {
    for (int step = 0; step < 2; ++step) {
      pipe->step(x, x, [](const torch::Tensor& out, const torch::Tensor& t) {
        return torch::mse_loss(out, t);
      });
    }
  } catch (const std::exception& e) {
    std::string message = e.what();
    std::cout << "RESULT error=" << message.substr(0, message.find('\n'))
              << std::endl;
    return 0;
  }
  std::cout << "RESULT error=none" << std::endl;
  return 0;
}

/// {hidden, mask, int64 ids} -> {linear(hidden) * mask + ids / 100, mask,
/// ids}: a list whose tensors differ in dtype and in requires_grad.
struct MaskedLinearImpl : torch::nn::Module {
  MaskedLinearImpl()
      : linear(register_module("linear", torch::nn::Linear(5, 5))) {
    linear->to(torch::kFloat64);
  }
  std::vector<torch::Tensor> forward(std::vector<torch::Tensor> x) {
    return {
        torch::tanh(linear(x[0])) * x[1] + x[2].to(torch::kFloat64) / 100,
        x[1],
        x[2]};
  }
  torch::nn::Linear linear;
};
TORCH_MODULE(MaskedLinear);

struct FirstOfImpl : torch::nn::Module {
  torch::Tensor forward(std::vector<torch::Tensor> x) {
    return x[0];
  }
};
TORCH_MODULE(FirstOf);

/// Several tensors between ranks: gradients equal plain training.
/// Note [Messages over the pipe's own sockets]: rank 0 sends numbered
/// messages under three tags while rank 1 posts their receives ahead, late
/// or exactly as they arrive; each must reach its receive, in order.
int sockets_deliver_every_message(const std::shared_ptr<gd::World>& world) {
  const int64_t peer = 1 - world->rank();
  gd::detail::PeerSockets sockets(*world, "test/sockets/", {peer});
  constexpr int64_t kMessages = 1200;
  const auto tag_of = [](int64_t k) { return static_cast<int>(k % 3); };
  // Every fourth is 1 MiB, whose bytes take a while to read.
  const auto size_of = [](int64_t k) -> int64_t {
    return k % 4 == 0 ? 131072 : 1 + k % 5;
  };
  if (world->rank() == 0) {
    std::vector<c10::intrusive_ptr<c10d::Work>> sends;
    for (int64_t k = 0; k < kMessages; ++k) {
      auto message =
          torch::full({size_of(k)}, static_cast<double>(k), torch::kDouble);
      sends.push_back(sockets.send(message, peer, tag_of(k)));
      if (k % 7 == 0) {
        std::this_thread::yield();
      }
    }
    for (auto& send : sends) {
      send->wait();
    }
  }
  int wrong = 0;
  if (world->rank() == 1) {
    std::deque<std::pair<int64_t, torch::Tensor>> posted_values;
    std::deque<c10::intrusive_ptr<c10d::Work>> posted;
    int64_t next = 0;
    for (int64_t k = 0; k < kMessages; ++k) {
      // Keep 0 to 3 receives posted ahead, changing every few messages.
      const int64_t ahead = (k / 11) % 4;
      while (next < kMessages && next <= k + ahead) {
        auto into = torch::empty({size_of(next)}, torch::kDouble);
        posted.push_back(sockets.recv(into, peer, tag_of(next)));
        posted_values.emplace_back(next, into);
        ++next;
      }
      posted.front()->wait(std::chrono::milliseconds(5000));
      const auto [number, value] = posted_values.front();
      if (!value.eq(static_cast<double>(number)).all().item<bool>()) {
        ++wrong;
      }
      posted.pop_front();
      posted_values.pop_front();
      if (k % 13 == 0) {
        std::this_thread::sleep_for(std::chrono::microseconds(50));
      }
    }
  }
  world->group()->barrier()->wait();
  std::cout << "RESULT wrong=" << wrong << std::endl;
  return wrong == 0 ? 0 : 1;
}

int several_tensors(const std::shared_ptr<gd::World>& world) {
  const auto make = [] {
    torch::manual_seed(5);
    return torch::nn::Sequential(
        MaskedLinear(), MaskedLinear(), MaskedLinear(), FirstOf());
  };
  auto plain = make();
  int failures = 0;
  for (const Schedule schedule : kSchedules) {
    gd::DistributedGPipe pipe(
        world,
        make(),
        gd::DistributedOptions(2)
            .microbatches(3)
            .schedule(schedule)
            .stages_per_rank(gpipe::stages_per_lane(schedule)));
    torch::manual_seed(9);
    const auto x = torch::randn({7, 5}, torch::kFloat64);
    const auto mask = (torch::rand({7, 5}) > 0.3).to(torch::kFloat64);
    const auto ids = torch::randint(0, 10, {7, 5}, torch::kInt64);
    const auto y = torch::randn({7, 5}, torch::kFloat64);
    plain->zero_grad();
    torch::mse_loss(plain->forward(std::vector<torch::Tensor>{x, mask, ids}), y)
        .backward();
    const auto loss = pipe->step(
        pipe->is_first() ? std::vector<torch::Tensor>{x, mask, ids}
                         : std::vector<torch::Tensor>{},
        y,
        [](const torch::Tensor& out, const torch::Tensor& t) {
          return torch::mse_loss(out, t);
        });
    auto reference = plain->named_parameters();
    for (const auto& p : pipe->named_parameters()) {
      if (!torch::allclose(
              p.value().grad(), reference[p.key()].grad(), 1e-9, 1e-11)) {
        ++failures;
        std::cout << "MISMATCH " << gpipe::to_string(schedule) << " " << p.key()
                  << std::endl;
      }
    }
  }
  std::cout << "RESULT mismatches=" << failures << std::endl;
  return failures == 0 ? 0 : 1;
}

/// Builds a pipe with a bad configuration and reports the error.
int configuration(const std::shared_ptr<gd::World>& world) {
  const auto args = mp::arguments();
  const std::string kind = args.at("kind");
  try {
    auto options = gd::DistributedOptions(arg(args, "stages", world->size()))
                       .microbatches(2);
    if (kind == "options" && world->rank() == 1) {
      options.microbatches(4);
    }
    if (kind == "interface" && world->rank() == 1) {
      // Backend::Auto then picks Gloo here and the pipe's own sockets on
      // rank 0.
      setenv("GLOO_SOCKET_IFNAME", "lo", 1);
    }
    auto model = make_model();
    if (kind == "model" && world->rank() == 1) {
      model->push_back(torch::nn::Identity());
    }
    if (kind == "nccl_on_cpu") {
      options.backend(gd::Backend::Nccl);
    }
    if (kind == "cuda_without_gpu") {
      options.device(torch::kCUDA);
    }
    if (kind == "forged_backend") {
      options.backend(static_cast<gd::Backend>(42));
    }
    if (kind == "forged_checkpoint") {
      options.checkpoint(static_cast<gpipe::Checkpoint>(42));
    }
    if (kind == "order_on_nccl") {
      options.backend(gd::Backend::Nccl)
          .device(torch::Device(torch::kCUDA, 0))
          .match_by_order(true);
    }
    if (kind == "order_on_sockets") {
      options.backend(gd::Backend::Sockets).match_by_order(true);
    }
    gd::DistributedGPipe pipe(world, model, options);
    std::cout << "RESULT error=none" << std::endl;
    return 1;
  } catch (const std::exception& e) {
    std::string message = e.what();
    std::cout << "RESULT error=" << message.substr(0, message.find('\n'))
              << std::endl;
    return 0;
  }
}

/// Resident memory from /proc/self/status, in KiB.
int64_t rss_kib() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmRSS:", 0) == 0) {
      return std::stoll(line.substr(6));
    }
  }
  return -1;
}

/// Entries of a /proc folder (open descriptors, threads).
int64_t entries_of(const char* path) {
  DIR* dir = opendir(path);
  int64_t n = 0;
  while (const dirent* entry = dir ? readdir(dir) : nullptr) {
    n += entry->d_name[0] != '.';
  }
  if (dir) {
    closedir(dir);
  }
  return n;
}

/// Trains `steps` steps of 1F1B with a timeline read every millisecond by
/// another thread, and reports RSS, descriptors and threads at step 100
/// and at the end (issue 24's soak across ranks).
int soak(const std::shared_ptr<gd::World>& world) {
  const auto args = mp::arguments();
  const int64_t steps = arg(args, "steps", 300);
  gd::DistributedGPipe pipe(
      world,
      make_model(),
      gd::DistributedOptions(world->size())
          .microbatches(4)
          .schedule(Schedule::OneFOneB));
  auto timeline =
      std::make_shared<gpipe::Timeline>(gpipe::TimelineOptions().window(1024));
  pipe->set_timeline(timeline);
  std::atomic<bool> done{false};
  int64_t reads = 0;
  size_t most = 0;
  std::thread reader([&] {
    while (!done) {
      most = std::max(most, timeline->events().size());
      ++reads;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  });
  torch::optim::SGD sgd(pipe->parameters(), 0.01);
  const auto x = torch::randn({16, 5}, torch::kFloat64);
  const auto y = torch::randn({16, 5}, torch::kFloat64);
  int64_t rss_mark = 0, fds_mark = 0, threads_mark = 0;
  for (int64_t step = 0; step < steps; ++step) {
    if (step == std::min<int64_t>(100, steps / 3)) {
      rss_mark = rss_kib();
      fds_mark = entries_of("/proc/self/fd");
      threads_mark = entries_of("/proc/self/task");
    }
    sgd.zero_grad();
    pipe->step(x, y, [](const torch::Tensor& out, const torch::Tensor& t) {
      return loss_of(out, t, Reduction::Mean);
    });
    sgd.step();
  }
  done = true;
  reader.join();
  std::cout << "RESULT rss_mark_kib=" << rss_mark << std::endl;
  std::cout << "RESULT rss_end_kib=" << rss_kib() << std::endl;
  std::cout << "RESULT fds=" << fds_mark << "->" << entries_of("/proc/self/fd")
            << std::endl;
  std::cout << "RESULT threads=" << threads_mark << "->"
            << entries_of("/proc/self/task") << std::endl;
  std::cout << "RESULT most_slices=" << most << std::endl;
  std::cout << "RESULT reads=" << reads << std::endl;
  return 0;
}

int run_scenario(const std::string& scenario) {
  torch::set_num_threads(1);
  const auto args = mp::arguments();
  std::shared_ptr<gd::World> world;
  try {
    world = gd::World::connect(gd::WorldOptions().timeout(
        std::chrono::milliseconds(arg(args, "timeout_ms", 20000))));
  } catch (const std::exception& e) {
    std::string message = e.what();
    std::cout << "RESULT error=" << message.substr(0, message.find('\n'))
              << std::endl;
    return scenario == "connect" ? 0 : 1;
  }
  if (scenario == "train") {
    return train_like_plain(world);
  }
  if (scenario == "fault") {
    return fault(world);
  }
  if (scenario == "several_tensors") {
    return several_tensors(world);
  }
  if (scenario == "sockets") {
    return sockets_deliver_every_message(world);
  }
  if (scenario == "dynamic") {
    return dynamic_shapes(world);
  }
  if (scenario == "configuration") {
    return configuration(world);
  }
  if (scenario == "soak") {
    return soak(world);
  }
  const int code = gpipe_test::run_gradients_scenario(scenario, world);
  if (code != gpipe_test::kUnknownScenario) {
    return code;
  }
  std::cout << "unknown scenario " << scenario << std::endl;
  return 1;
}

// ---------------------------------------------------------------------------
// The tests: each starts the ranks and judges how they ended.
// ---------------------------------------------------------------------------

// Note [Messages matched by order], without processes: what NCCL would do
// with each program, run by ordered_messages.h's rules.

std::vector<int64_t> round_robin(int64_t stages, int64_t ranks) {
  std::vector<int64_t> lanes;
  for (int64_t s = 0; s < stages; ++s) {
    lanes.push_back(s % ranks);
  }
  return lanes;
}

TEST(
    MessagesMatchedByOrder,
    EveryScheduleOnEveryPlacementRunsByOrderOnceLowered) {
  int64_t checked = 0;
  for (const Schedule schedule : kSchedules) {
    for (const int64_t ranks : {2, 3, 4, 5, 8}) {
      for (const int64_t v : {1, 2, 3, 4}) {
        for (const int64_t m : {1, 2, 3, 4, 5, 8, 13, 32}) {
          gpipe::Program program;
          try {
            program = gpipe::build_program(
                schedule, ranks * v, m, round_robin(ranks * v, ranks));
          } catch (const c10::Error&) {
            continue; // a placement this schedule does not take
          }
          const auto placed = gpipe::lower_for_ordered_messages(program);
          EXPECT_NO_THROW({
            gpipe::simulate(placed);
            gpipe::check_ordered_messages(placed);
          }) << schedule
             << ", ranks " << ranks << ", v " << v << ", m " << m << "\n"
             << placed;
          ++checked;
        }
      }
    }
  }
  EXPECT_GE(checked, 500);
}

TEST(
    MessagesMatchedByOrder,
    ReceivingRightBeforeTheConsumerCanMismatchOrDeadlock) {
  // Interleaved placement: lane 0 sends two messages to lane 1 in the
  // order its stages produce them, lane 1 consumes them in another.
  const auto mismatched =
      gpipe::build_program(Schedule::OneFOneB, 4, 3, round_robin(4, 2));
  EXPECT_NE(
      gpipe_test::error_of([&] { gpipe::check_ordered_messages(mismatched); })
          .find("message 2 from lane 1 to lane 0 is 1SEND_F2 at the sender but "
                "2RECV_B0 at the receiver"),
      std::string::npos);
  // Each lane holds a group whose other end the other issues only later.
  const auto deadlocked =
      gpipe::build_program(Schedule::FillDrain, 4, 4, round_robin(4, 2));
  EXPECT_NE(
      gpipe_test::error_of([&] { gpipe::check_ordered_messages(deadlocked); })
          .find("its coalesced groups wait for each other (lane 0 at 2SEND_F0, "
                "lane 1 at 1SEND_F1)"),
      std::string::npos);
  // Both run once their receives are placed by time.
  for (const auto* program : {&mismatched, &deadlocked}) {
    EXPECT_NO_THROW(gpipe::check_ordered_messages(
        gpipe::lower_for_ordered_messages(*program)));
  }
}

TEST(MessagesMatchedByOrder, PlacingByTimeKeepsComputationsAndSendsInPlace) {
  const auto program =
      gpipe::build_program(Schedule::Interleaved1F1B, 8, 5, round_robin(8, 4));
  const auto placed = gpipe::lower_for_ordered_messages(program);
  for (size_t l = 0; l < program.lanes.size(); ++l) {
    std::vector<gpipe::Action> before;
    std::vector<gpipe::Action> after;
    for (const auto& a : program.lanes[l]) {
      if (gpipe::is_compute(a.op) || gpipe::detail::is_send(a.op)) {
        before.push_back(a);
      }
    }
    for (const auto& a : placed.lanes[l]) {
      if (gpipe::is_compute(a.op) || gpipe::detail::is_send(a.op)) {
        after.push_back(a);
      }
    }
    EXPECT_EQ(before, after) << "lane " << l;
    EXPECT_EQ(program.lanes[l].size(), placed.lanes[l].size()) << "lane " << l;
  }
}

void expect_all_succeeded(const std::vector<mp::Outcome>& outcomes) {
  for (const auto& outcome : outcomes) {
    EXPECT_TRUE(outcome.succeeded()) << outcome;
  }
}

// Note [Receives are posted ahead], without processes: which receives a
// lane posts, how far ahead, and in what order.

gd::detail::LaneReceives receives_of_lane(
    Schedule schedule,
    int64_t stages,
    int64_t m,
    int64_t lane) {
  const auto program =
      gpipe::build_program(schedule, stages, m, round_robin(stages, stages));
  return gd::detail::receives_of(program.lanes[static_cast<size_t>(lane)]);
}

TEST(ReceivesAhead, FillDrainPostsEveryForwardReceiveOfTheStepAtItsStart) {
  for (int64_t j = 0; j < 4; ++j) {
    const auto receives = receives_of_lane(Schedule::FillDrain, 4, 8, j);
    EXPECT_EQ(receives.depth, 8u) << "stage " << j;
    EXPECT_EQ(receives.tags.size(), (j > 0 ? 8u : 0u) + (j < 3 ? 8u : 0u))
        << "stage " << j;
  }
}

TEST(ReceivesAhead, OneFOneBPostsAsFarAheadAsItsStageHoldsMicrobatches) {
  for (int64_t j = 0; j < 4; ++j) {
    const auto receives = receives_of_lane(Schedule::OneFOneB, 4, 8, j);
    EXPECT_EQ(receives.depth, static_cast<size_t>(std::max<int64_t>(2, 4 - j)))
        << "stage " << j;
  }
  // A split backward holds a micro-batch until its W.
  EXPECT_GE(receives_of_lane(Schedule::ZeroBubbleH1, 4, 8, 0).depth, 4u);
}

TEST(ReceivesAhead, KeepsTheNextDepthReceivesPostedInProgramOrder) {
  auto receives = receives_of_lane(Schedule::FillDrain, 3, 6, 1);
  receives.depth = 2;
  const auto tags = receives.tags;
  std::vector<gpipe::detail::Tag> posted;
  const gd::detail::ReceivesAhead::Post post = [&](const auto& tag) {
    posted.push_back(tag);
    gd::detail::PostedReceive receive;
    receive.tag = tag;
    return std::optional<gd::detail::PostedReceive>(std::move(receive));
  };
  gd::detail::ReceivesAhead ahead;
  ahead.begin(receives);
  for (size_t k = 0; k < tags.size(); ++k) {
    const auto taken = ahead.take(tags[k], post);
    ASSERT_TRUE(taken.has_value()) << k;
    EXPECT_TRUE(gd::detail::same_tag(taken->tag, tags[k])) << k;
    // The one taken and the two after it have been posted, no more.
    EXPECT_EQ(posted.size(), std::min(tags.size(), k + 3)) << k;
  }
  for (size_t k = 0; k < tags.size(); ++k) {
    EXPECT_TRUE(gd::detail::same_tag(posted[k], tags[k])) << k;
  }
  EXPECT_TRUE(ahead.drained());
}

TEST(ReceivesAhead, AReceiveWhoseShapesAreNotAgreedIsLeftToTheLane) {
  const auto receives = receives_of_lane(Schedule::OneFOneB, 3, 4, 1);
  const auto& tags = receives.tags;
  // The third receive cannot be posted ahead; the others can.
  const gd::detail::ReceivesAhead::Post post =
      [&](const auto& tag) -> std::optional<gd::detail::PostedReceive> {
    if (gd::detail::same_tag(tag, tags[2])) {
      return std::nullopt;
    }
    gd::detail::PostedReceive receive;
    receive.tag = tag;
    return receive;
  };
  gd::detail::ReceivesAhead ahead;
  ahead.begin(receives);
  for (size_t k = 0; k < tags.size(); ++k) {
    EXPECT_EQ(ahead.take(tags[k], post).has_value(), k != 2) << k;
  }
  EXPECT_TRUE(ahead.drained());
}

TEST(ReceivesAhead, AReceiveOutOfProgramOrderIsAnInternalError) {
  const auto receives = receives_of_lane(Schedule::FillDrain, 3, 4, 1);
  gd::detail::ReceivesAhead ahead;
  ahead.begin(receives);
  const gd::detail::ReceivesAhead::Post post = [](const auto&) {
    return std::optional<gd::detail::PostedReceive>();
  };
  EXPECT_NE(
      gpipe_test::error_of([&] { ahead.take(receives.tags[1], post); })
          .find("where its program has the activation for stage 1, "
                "micro-batch 0"),
      std::string::npos);
}

TEST(
    Distributed,
    TwoRanksTrainLikePlainOnEveryScheduleCheckpointModeAndMicrobatchCount) {
  expect_all_succeeded(
      mp::run({"train", "stages=2,all_modes=1,m=1:3:8,sum=1", /*world=*/2}));
}

TEST(Distributed, TwoRanksOnOneGpuThroughGlooStagingTrainLikePlain_CUDA) {
  if (!torch::cuda::is_available()) {
    GTEST_SKIP() << "no CUDA device";
  }
  // Two ranks share the one GPU, which NCCL refuses: Gloo carries their
  // tensors through the CPU.
  expect_all_succeeded(
      mp::run({"train", "stages=2,m=1:3,steps=2,sum=1,cuda=1", /*world=*/2}));
}

TEST(
    Distributed,
    TwoRanksTrainLikePlainWithMessagesMatchedByOrderOnEverySchedule) {
  expect_all_succeeded(mp::run(
      {"train", "stages=2,m=1:3:8,steps=2,sum=1,by_order=1", /*world=*/2}));
}

TEST(Distributed, FourRanksTrainLikePlainWithMessagesMatchedByOrder) {
  expect_all_succeeded(mp::run(
      {"train",
       "stages=4,m=3:8,steps=3,batches=11:7:11,by_order=1",
       /*world=*/4}));
}

TEST(
    Distributed,
    TwoReplicasOfTwoStagesTrainLikePlainWithMessagesMatchedByOrder) {
  expect_all_succeeded(mp::run(
      {"train", "stages=2,m=3,steps=3,batches=11:7:11,sum=1,by_order=1", 4}));
}

TEST(Distributed, ThePipesOwnSocketsDeliverEveryMessageToItsReceiveInOrder) {
  // However the receive and the message race (posted ahead, late, or while
  // its bytes are read): a message lost there would time out.
  expect_all_succeeded(mp::run({"sockets", "", /*world=*/2}));
}

TEST(Distributed, TwoRanksTrainLikePlainOverGlooOnEverySchedule) {
  // Backend::Auto sends over the pipe's own sockets on CPUs (the tests
  // above); Gloo, with its rendezvous, still carries every schedule,
  // checkpoint mode and micro-batch count.
  expect_all_succeeded(mp::run(
      {"train", "stages=2,all_modes=1,m=1:3:8,steps=2,sum=1,gloo=1", 2}));
}

TEST(Distributed, FourRanksAndTwoReplicasTrainLikePlainOverGloo) {
  expect_all_succeeded(
      mp::run({"train", "stages=4,m=3:8,steps=3,batches=11:7:11,gloo=1", 4}));
  expect_all_succeeded(mp::run(
      {"train", "stages=2,m=3,steps=3,batches=11:7:11,sum=1,gloo=1", 4}));
}

TEST(Distributed, TwoRanksOnTwoGpusTrainLikePlainOverNccl_MultiCUDA) {
  if (torch::cuda::device_count() < 2) {
    GTEST_SKIP() << "needs 2 CUDA devices, found "
                 << static_cast<int>(torch::cuda::device_count());
  }
  expect_all_succeeded(mp::run(
      {"train", "stages=2,all_modes=1,m=1:3:8,steps=3,sum=1,nccl=1", 2}));
}

TEST(Distributed, TwoReplicasOfTwoStagesTrainLikePlainOverNccl_MultiCUDA) {
  if (torch::cuda::device_count() < 4) {
    GTEST_SKIP() << "needs 4 CUDA devices, found "
                 << static_cast<int>(torch::cuda::device_count());
  }
  expect_all_succeeded(
      mp::run({"train", "stages=2,m=3,steps=3,batches=11:7,sum=1,nccl=1", 4}));
}

TEST(Distributed, RanksRunAProgramOfTheirOwnPlacedByItsLanesAndTrainLikePlain) {
  expect_all_succeeded(mp::run(
      {"train", "stages=2,m=1:3,steps=2,user_program=1,by_order=1", 2}));
  expect_all_succeeded(
      mp::run({"train", "stages=4,m=3:8,steps=2,user_program=1", 4}));
}

TEST(Distributed, FourRanksTrainLikePlainForSeveralOptimizerSteps) {
  expect_all_succeeded(
      mp::run({"train", "stages=4,m=3:8,steps=3", /*world=*/4}));
}

TEST(Distributed, SeveralTensorsOfDifferentDtypesCrossRanksAndTrainLikePlain) {
  expect_all_succeeded(mp::run({"several_tensors", "", /*world=*/2}));
}

TEST(Distributed, ABatchOfAnotherSizeIsAgreedAnewAndTrainsLikePlain) {
  expect_all_succeeded(mp::run(
      {"train", "stages=2,m=3,steps=4,batches=11:7:11:4", /*world=*/4}));
}

TEST(
    Distributed,
    ShapesThatChangeUnderTheSameInputShapeAreAnErrorUnlessAgreedEveryStep) {
  for (const auto& outcome :
       mp::run({"dynamic", "every_step=0", /*world=*/2})) {
    EXPECT_TRUE(outcome.succeeded()) << outcome;
    EXPECT_NE(
        outcome.result("error").find("agree_shapes_every_step(true)"),
        std::string::npos)
        << outcome;
  }
  for (const auto& outcome :
       mp::run({"dynamic", "every_step=1", /*world=*/2})) {
    EXPECT_TRUE(outcome.succeeded()) << outcome;
    EXPECT_EQ(outcome.result("error"), "none") << outcome;
  }
}

TEST(Distributed, TwoReplicasOfTwoStagesTrainLikePlainOnTheGlobalBatch) {
  expect_all_succeeded(
      mp::run({"train", "stages=2,m=3,steps=2,sum=1", /*world=*/4}));
}

TEST(
    Distributed,
    ReplicasSumInBucketsDuringTheLastBackwardOrAfterTheDrainAndTrainLikePlain) {
  // Buckets of 8 bytes: one per parameter, started as each parameter's
  // gradient is final; 0: one bucket, after the drain, as before buckets.
  expect_all_succeeded(mp::run(
      {"train", "stages=2,m=3,steps=2,sum=1,bucket_bytes=8:0", /*world=*/4}));
}

TEST(
    Distributed,
    AHookedParametersBucketStartsAfterTheDrainAndTrainsLikePlain) {
  expect_all_succeeded(mp::run(
      {"train", "stages=2,m=3,steps=2,bucket_bytes=8,hook=1", /*world=*/4}));
}

TEST(
    Distributed,
    APipeBuiltStageByStageBuildsOnlyItsOwnStagesAndTrainsLikePlain) {
  expect_all_succeeded(
      mp::run({"train", "stages=2,m=3,steps=2,builder=1", /*world=*/2}));
}

/// Every rank that did not die reports the failed rank within `bound`.
void expect_everyone_names(
    const std::vector<mp::Outcome>& outcomes,
    int failed,
    const std::string& cause,
    double bound,
    bool failed_rank_reports) {
  for (const auto& outcome : outcomes) {
    if (outcome.rank == failed && !failed_rank_reports) {
      continue;
    }
    EXPECT_TRUE(outcome.succeeded()) << outcome;
    const std::string error = outcome.result("error");
    if (outcome.rank != failed) { // the failed rank gets its own error
      EXPECT_NE(
          error.find("gpipe: rank " + std::to_string(failed) + " (stage "),
          std::string::npos)
          << outcome;
    }
    EXPECT_NE(error.find(cause), std::string::npos) << outcome;
    const double seconds = std::stod("0" + outcome.result("seconds"));
    std::cout << "rank " << outcome.rank << " failed after " << seconds
              << " s: " << error << std::endl;
    EXPECT_LT(seconds, bound) << outcome;
    EXPECT_NE(
        outcome.result("again").find(
            "a previous step of this distributed pipe failed"),
        std::string::npos)
        << outcome;
  }
}

TEST(
    Distributed,
    AnExceptionInOneRanksForwardFailsEveryRankNamingItsStageAndMicrobatch) {
  const auto outcomes =
      mp::run({"fault", "kind=throw,at=2,timeout_ms=20000", /*world=*/4});
  expect_everyone_names(outcomes, 2, "the trap sprang in forward", 10.0, true);
  EXPECT_NE(
      outcomes[0].result("error").find("micro-batch 0"), std::string::npos)
      << outcomes[0];
}

TEST(Distributed, TwoRanksTrainLongWithATimelineReadAndNothingGrows) {
  // Short form here; the long form is GPIPE_SOAK_STEPS=1000 (or more) with
  // --gtest_filter=Distributed.TwoRanksTrainLong*.
  const char* asked = std::getenv("GPIPE_SOAK_STEPS");
  const std::string steps = asked != nullptr ? asked : "300";
  for (const auto& outcome :
       mp::run({"soak", "steps=" + steps + ",timeout_ms=20000", /*world=*/2})) {
    EXPECT_TRUE(outcome.succeeded()) << outcome;
    std::cout << "rank " << outcome.rank << ": " << steps << " steps, RSS "
              << outcome.result("rss_mark_kib") << " -> "
              << outcome.result("rss_end_kib") << " KiB, fds "
              << outcome.result("fds") << ", threads "
              << outcome.result("threads") << ", slices at most "
              << outcome.result("most_slices") << " of 1024, "
              << outcome.result("reads") << " reads" << std::endl;
    // Nothing grows: descriptors and threads (a helper thread may end), the
    // timeline within
    // its window, RSS within 16 MiB (glibc's heap moves by a few MiB
    // between readings of one steady state; a leak of one step's
    // activations per step would be tens of MiB).
    const auto fds = outcome.result("fds");
    const auto threads = outcome.result("threads");
    auto at_mark = [](const std::string& text) {
      return std::stoll("0" + text.substr(0, text.find("->")));
    };
    auto at_end = [](const std::string& text) {
      return std::stoll("0" + text.substr(text.find("->") + 2));
    };
    EXPECT_LE(at_end(fds), at_mark(fds)) << outcome;
    EXPECT_LE(at_end(threads), at_mark(threads)) << outcome;
    EXPECT_LE(std::stoll("0" + outcome.result("most_slices")), 1024) << outcome;
#ifndef __SANITIZE_ADDRESS__ // ASan's quarantine holds freed memory
    EXPECT_LT(
        std::stoll("0" + outcome.result("rss_end_kib")) -
            std::stoll("0" + outcome.result("rss_mark_kib")),
        16 * 1024)
        << outcome;
#endif
  }
}

TEST(
    Distributed,
    TheFailingRankCatchesItsOwnExceptionTypeAndItsPeersReadTheTypesName) {
  // A user's type and an int: the rank that threw catches it as itself;
  // the others get a gpipe: error naming the rank, the cell and the type.
  for (const auto& [kind, type, cause] :
       std::vector<std::tuple<std::string, std::string, std::string>>{
           {"throw", "TrapSprang", "TrapSprang: the trap sprang in forward"},
           {"int", "int", "in forward: int"}}) {
    const auto outcomes = mp::run(
        {"fault", "kind=" + kind + ",at=1,timeout_ms=20000", /*world=*/2});
    ASSERT_EQ(outcomes.size(), 2u);
    EXPECT_EQ(outcomes[1].result("type"), type) << outcomes[1];
    EXPECT_EQ(outcomes[0].result("type"), "") << outcomes[0];
    EXPECT_NE(
        outcomes[0].result("error").find(
            "gpipe: rank 1 (stage 1) failed: gpipe: partition 1 failed on "
            "micro-batch 0 in forward: "),
        std::string::npos)
        << outcomes[0];
    EXPECT_NE(outcomes[0].result("error").find(cause), std::string::npos)
        << outcomes[0];
  }
}

TEST(
    Distributed,
    AFailureOfTheRankThatHostsTheStoreStaysReadableUntilEveryRankHasSeenIt) {
  // Rank 0 fails first and, its step over, ends at once: the store it hosts
  // must outlive it until the other ranks have read its error.
  const auto outcomes = mp::run(
      {"fault",
       "kind=throw,at=0,timeout_ms=20000,read_store_after_ms=1500",
       /*world=*/4});
  expect_everyone_names(outcomes, 0, "the trap sprang in forward", 10.0, true);
  for (size_t r = 1; r < outcomes.size(); ++r) {
    EXPECT_EQ(outcomes[r].result("store_after"), "up") << outcomes[r];
  }
}

TEST(Distributed, AnExceptionInTheLossFunctionFailsEveryRank) {
  const auto outcomes =
      mp::run({"fault", "kind=loss,at=1,timeout_ms=20000", /*world=*/4});
  expect_everyone_names(outcomes, 3, "the loss function failed", 10.0, true);
}

TEST(Distributed, ARankThatExitsFailsEveryOtherRankWithinSeconds) {
  const auto outcomes =
      mp::run({"fault", "kind=exit,at=1,timeout_ms=20000", /*world=*/4});
  EXPECT_TRUE(outcomes[1].exited && outcomes[1].code == 3) << outcomes[1];
  expect_everyone_names(outcomes, 1, "exited", 10.0, false);
}

TEST(Distributed, ARankKilledBySigkillFailsEveryOtherRankWithinSeconds) {
  const auto outcomes =
      mp::run({"fault", "kind=kill,at=2,timeout_ms=20000", /*world=*/4});
  EXPECT_TRUE(!outcomes[2].exited && outcomes[2].code == SIGKILL)
      << outcomes[2];
  expect_everyone_names(outcomes, 2, "exited", 10.0, false);
}

TEST(Distributed, OverGlooEveryFailureStopsEveryRankAsOverThePipesOwnSockets) {
  // An exception, a rank that exits and one killed: every rank fails
  // within seconds naming the rank at fault, as over the pipe's own
  // sockets (the tests above).
  expect_everyone_names(
      mp::run({"fault", "kind=throw,at=2,timeout_ms=20000,gloo=1", 4}),
      2,
      "the trap sprang in forward",
      10.0,
      true);
  const auto exited =
      mp::run({"fault", "kind=exit,at=1,timeout_ms=20000,gloo=1", 4});
  EXPECT_TRUE(exited[1].exited && exited[1].code == 3) << exited[1];
  expect_everyone_names(exited, 1, "exited", 10.0, false);
  const auto killed =
      mp::run({"fault", "kind=kill,at=2,timeout_ms=20000,gloo=1", 4});
  EXPECT_TRUE(!killed[2].exited && killed[2].code == SIGKILL) << killed[2];
  expect_everyone_names(killed, 2, "exited", 10.0, false);
}

/// Rank 1 of 2 never answers: rank 0 fails after the World's 3 s timeout,
/// naming it. `extra`: more arguments of the fault scenario.
void expect_a_stuck_rank_to_fail_its_neighbour(const std::string& extra) {
  mp::Job job{"fault", "kind=stuck,at=1,timeout_ms=3000" + extra, 2};
  job.deadline = std::chrono::seconds(20);
  job.straggler = 1;
  const auto outcomes = mp::run(job);
  EXPECT_TRUE(outcomes[1].killed_by_harness) << outcomes[1];
  const auto& survivor = outcomes[0];
  EXPECT_TRUE(survivor.succeeded()) << survivor;
  EXPECT_NE(
      survivor.result("error").find(
          "gpipe: rank 1 (stage 1) sent nothing for 3000 ms"),
      std::string::npos)
      << survivor;
  const double seconds = std::stod("0" + survivor.result("seconds"));
  std::cout << "rank 0 failed after " << seconds
            << " s: " << survivor.result("error") << std::endl;
  EXPECT_GE(seconds, 2.9) << survivor;
  EXPECT_LT(seconds, 8.0) << survivor;
}

TEST(Distributed, OverGlooAStuckRankFailsItsNeighbourAfterTheTimeout) {
  expect_a_stuck_rank_to_fail_its_neighbour(",gloo=1");
}

TEST(Distributed, AStuckRankFailsItsNeighboursAfterTheTimeout) {
  expect_a_stuck_rank_to_fail_its_neighbour("");
}

TEST(Distributed, AWorldSizeThatIsNotReplicasTimesStagesIsAnErrorOnEveryRank) {
  for (const auto& outcome :
       mp::run({"configuration", "kind=world,stages=3", /*world=*/4})) {
    EXPECT_TRUE(outcome.succeeded()) << outcome;
    EXPECT_NE(
        outcome.result("error").find(
            "gpipe: the world size 4 is not replicas x stages: 3 stages do not divide 4 ranks"),
        std::string::npos)
        << outcome;
  }
}

TEST(Distributed, RanksBuiltWithDifferentOptionsOrModelsAreAnErrorOnEveryRank) {
  // "interface": one rank's GLOO_SOCKET_IFNAME keeps its messages on Gloo.
  for (const std::string kind : {"options", "model", "interface"}) {
    for (const auto& outcome :
         mp::run({"configuration", "kind=" + kind, /*world=*/2})) {
      EXPECT_TRUE(outcome.succeeded()) << kind << ": " << outcome;
      EXPECT_NE(
          outcome.result("error").find("built different pipes"),
          std::string::npos)
          << kind << ": " << outcome;
    }
  }
}

TEST(Distributed, DevicesBackendsAndModesThatCannotWorkAreAnErrorOnEveryRank) {
  std::map<std::string, std::string> expected{
      {"nccl_on_cpu", "Backend::Nccl needs a CUDA device, got cpu"},
      // Forged enum values (a cast, a config file) are named, never taken
      // as some default.
      {"forged_backend",
       "gpipe: backend is not a Backend (value: 42); use Backend::Auto, "
       "Backend::Gloo, Backend::Nccl or Backend::Sockets"},
      {"forged_checkpoint",
       "gpipe: checkpoint is not a Checkpoint (value: 42); use "
       "Checkpoint::Always, Checkpoint::ExceptLast or Checkpoint::Never"},
      // The pipe's own sockets match by tag.
      {"order_on_sockets",
       "match_by_order is for Gloo on CPUs (NCCL always matches by order); "
       "got backend sockets on cpu"}};
  if (!torch::cuda::is_available()) {
    expected.emplace(
        "cuda_without_gpu",
        " but sees 0 CUDA devices (a CUDA device without an index is "
        "cuda:LOCAL_RANK");
  } else {
    expected.emplace("order_on_nccl", "match_by_order is for Gloo on CPUs");
  }
  for (const auto& [kind, error] : expected) {
    for (const auto& outcome :
         mp::run({"configuration", "kind=" + kind, /*world=*/2})) {
      EXPECT_TRUE(outcome.succeeded()) << kind << ": " << outcome;
      EXPECT_NE(outcome.result("error").find(error), std::string::npos)
          << kind << ": " << outcome;
    }
  }
}

TEST(Distributed, AMissingEnvironmentIsAnErrorNamingTheVariables) {
  mp::Job job{"connect", "", /*world=*/1};
  job.set_rank_environment = false;
  const auto outcomes = mp::run(job);
  EXPECT_TRUE(outcomes[0].succeeded()) << outcomes[0];
  EXPECT_NE(
      outcomes[0].result("error").find(
          "missing: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT"),
      std::string::npos)
      << outcomes[0];
}

TEST(Distributed, APortAlreadyInUseIsAnErrorOnTheRankThatHostsTheStore) {
  // Something else listens on the port.
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = 0;
  ASSERT_EQ(
      bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0);
  ASSERT_EQ(listen(fd, 4), 0);
  socklen_t length = sizeof(address);
  getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length);
  mp::Job job{"connect", "timeout_ms=3000", /*world=*/1};
  job.port = ntohs(address.sin_port);
  const auto outcomes = mp::run(job);
  close(fd);
  EXPECT_TRUE(outcomes[0].succeeded()) << outcomes[0];
  EXPECT_NE(
      outcomes[0].result("error").find(
          "could not host the store on 127.0.0.1:" + std::to_string(job.port)),
      std::string::npos)
      << outcomes[0];
}

} // namespace

int main(int argc, char** argv) {
  if (const char* scenario = std::getenv("GPIPE_TEST_SCENARIO")) {
    return run_scenario(scenario);
  }
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
