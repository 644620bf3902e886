// Exceptions keep their type (Note [Exceptions keep their type]): whatever
// a layer, a backward, or loss_fn throws reaches the caller as itself, its
// cell is found with gpipe::failed_cell, and the pipe works afterwards.
#include "test_support.h"

#include <new>
#include <stdexcept>
#include <string>

namespace exceptions_test {

using gpipe::GPipe;
using gpipe::GPipeOptions;
using gpipe::Schedule;
using gpipe_test::failure_of;
using Pipe = GPipe<torch::nn::Sequential>;

namespace {

/// A user's own exception type.
struct DataError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class Thrown { UserType, BadAlloc, Int };

[[noreturn]] void raise(Thrown what) {
  switch (what) {
    case Thrown::UserType:
      throw DataError("a bad row");
    case Thrown::BadAlloc:
      throw std::bad_alloc();
    case Thrown::Int:
      throw 7;
  }
  throw 0;
}

/// What a failure must look like for each kind thrown.
struct Expected {
  std::string type;
  std::string message;
};

Expected expected(Thrown what) {
  switch (what) {
    case Thrown::UserType:
      return {"exceptions_test::(anonymous namespace)::DataError", "a bad row"};
    case Thrown::BadAlloc:
      return {"std::bad_alloc", "std::bad_alloc"};
    case Thrown::Int:
      return {"int", "7"};
  }
  return {};
}

/// Where the layer throws: in its forward (F), in the backward through its
/// input (B, or I when the backward is split) or through its weight (W).
struct Trap {
  bool armed = false;
  Thrown what = Thrown::UserType;
  std::string where; // "forward", "input", "weight"
};

/// The identity in forward; its backward throws what the trap says.
struct RaiseInBackward : torch::autograd::Function<RaiseInBackward> {
  static torch::Tensor forward(
      torch::autograd::AutogradContext* ctx,
      const torch::Tensor& x,
      Trap* trap) {
    ctx->saved_data["what"] = static_cast<int64_t>(trap->what);
    return x.clone();
  }
  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx,
      torch::autograd::variable_list /*grads*/) {
    raise(static_cast<Thrown>(ctx->saved_data["what"].toInt()));
  }
};

/// x @ weight.t(), with the trap on the forward, the input's path or the
/// weight's path.
struct TrappedLinearImpl : torch::nn::Module {
  explicit TrappedLinearImpl(Trap* trap_) : trap(trap_) {
    weight = register_parameter("weight", torch::randn({4, 4}) * 0.5);
  }
  torch::Tensor forward(torch::Tensor x) {
    const bool armed = trap->armed;
    if (armed && trap->where == "forward") {
      raise(trap->what);
    }
    auto w = armed && trap->where == "weight"
        ? RaiseInBackward::apply(weight, trap)
        : weight;
    auto h =
        armed && trap->where == "input" ? RaiseInBackward::apply(x, trap) : x;
    return torch::matmul(h, w.t());
  }
  Trap* trap;
  torch::Tensor weight;
};
TORCH_MODULE(TrappedLinear);

torch::nn::Sequential trapped_model(Trap* trap) {
  torch::manual_seed(0);
  return torch::nn::Sequential(
      torch::nn::Linear(4, 4),
      torch::nn::Tanh(),
      torch::nn::Linear(4, 4),
      TrappedLinear(trap));
}

const Thrown kEveryKind[] = {Thrown::UserType, Thrown::BadAlloc, Thrown::Int};

/// Runs one step that fails as `trap` (or loss_fn, with "loss_fn") says,
/// and checks what reaches the caller; then one that succeeds.
void expect_step_failure(
    Schedule schedule,
    const std::string& where,
    const std::string& phase) {
  for (const Thrown what : kEveryKind) {
    SCOPED_TRACE(where + ", " + expected(what).type);
    Trap trap;
    Pipe pipe(
        trapped_model(&trap),
        GPipeOptions(2).microbatches(2).schedule(schedule));
    bool loss_throws = where == "loss_fn";
    auto loss_fn = [&](const torch::Tensor& y, const torch::Tensor& t) {
      if (loss_throws) {
        raise(what);
      }
      return torch::mse_loss(y, t);
    };
    trap = {where != "loss_fn", what, where};
    const auto x = torch::randn({4, 4});
    const auto t = torch::randn({4, 4});
    const auto failure = failure_of([&] { pipe->step(x, t, loss_fn); });
    EXPECT_EQ(failure.type, expected(what).type);
    EXPECT_EQ(failure.message, expected(what).message);
    EXPECT_EQ(failure.cell.rfind("partition 1, micro-batch ", 0), 0u)
        << failure.cell;
    EXPECT_NE(failure.cell.find(", " + phase), std::string::npos)
        << failure.cell;
    // The pipe works afterwards.
    trap.armed = false;
    loss_throws = false;
    EXPECT_TRUE(pipe->step(x, t, loss_fn).defined());
  }
}

} // namespace

TEST(ExceptionsKeepTheirType, ThrownInForwardUnderStep) {
  expect_step_failure(Schedule::FillDrain, "forward", "forward");
}

TEST(ExceptionsKeepTheirType, ThrownInBackwardUnderStep) {
  expect_step_failure(Schedule::FillDrain, "input", "backward");
}

TEST(ExceptionsKeepTheirType, ThrownInTheInputHalfOfASplitBackward) {
  expect_step_failure(Schedule::ZeroBubbleH1, "input", "backward_input");
}

TEST(ExceptionsKeepTheirType, ThrownInTheWeightHalfOfASplitBackward) {
  expect_step_failure(Schedule::ZeroBubbleH1, "weight", "backward_weight");
}

TEST(ExceptionsKeepTheirType, ThrownInTheLossFunction) {
  expect_step_failure(Schedule::OneFOneB, "loss_fn", "loss_fn");
}

TEST(
    ExceptionsKeepTheirType,
    ThrownInForwardAndInTheUsersBackwardUnderForward) {
  for (const Thrown what : kEveryKind) {
    for (const std::string where : {"forward", "input"}) {
      SCOPED_TRACE(where + ", " + expected(what).type);
      Trap trap;
      auto seq = trapped_model(&trap);
      Pipe pipe(seq, GPipeOptions(2).microbatches(2));
      trap = {true, what, where};
      const auto failure = failure_of([&] {
        pipe(torch::randn({4, 4})).sum().backward();
      });
      EXPECT_EQ(failure.type, expected(what).type);
      EXPECT_EQ(failure.message, expected(what).message);
      EXPECT_EQ(failure.cell.rfind("partition 1, micro-batch ", 0), 0u)
          << failure.cell;
      EXPECT_NE(
          failure.cell.find(where == "forward" ? ", forward" : ", backward"),
          std::string::npos)
          << failure.cell;
      trap.armed = false;
      pipe(torch::randn({4, 4})).sum().backward();
      EXPECT_TRUE(seq->parameters()[0].grad().defined());
    }
  }
}

TEST(
    ExceptionsKeepTheirType,
    ACellFailureOfConcurrentLanesIsTheFirstAndKeepsItsType) {
  // Two CPU lanes at once; every micro-batch of the last partition fails:
  // one failure reaches the caller, as itself, with its cell.
  Trap trap;
  Pipe pipe(
      trapped_model(&trap),
      GPipeOptions(2).microbatches(4).concurrent_cpu_partitions(true));
  trap = {true, Thrown::UserType, "forward"};
  for (int k = 0; k < 5; ++k) {
    const auto failure = failure_of([&] { pipe(torch::randn({8, 4})); });
    EXPECT_EQ(
        failure.type, "exceptions_test::(anonymous namespace)::DataError");
    EXPECT_EQ(failure.cell.rfind("partition 1, micro-batch ", 0), 0u)
        << failure.cell;
  }
  trap.armed = false;
  EXPECT_TRUE(pipe(torch::randn({8, 4})).defined());
}

TEST(ExceptionsKeepTheirType, AnExceptionFromOutsideAPipeHasNoCell) {
  try {
    throw DataError("elsewhere");
  } catch (const DataError&) {
    EXPECT_FALSE(gpipe::failed_cell(std::current_exception()).has_value());
  }
}

} // namespace exceptions_test
