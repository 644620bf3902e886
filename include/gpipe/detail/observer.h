// Watching the operators a cell runs: its random draws and its BatchNorms.
//
// Note [Random draws are recorded per operator]
// A checkpointed cell runs its forward twice, and its recompute must draw
// exactly the random numbers its forward drew. Snapshotting the generators
// once per cell is only right when nothing else draws from them in between,
// and the CPU generator is one per process: cells on concurrent lanes (and
// the engine's per-device threads, which recompute CUDA cells) draw from it
// at the same time, so a cell's forward does not see a contiguous stream.
// So a cell observes its own operators through a thread-local RecordFunction
// callback (the profiler's hook, public ATen API):
//   * every operator that can draw (one with a Generator argument, or a fused
//     dropout kernel) takes a process-wide lock for its duration, when lanes
//     run at once, so that no other cell draws while it does;
//   * in forward, the generator states (the CPU's and the cell's CUDA
//     device's) are captured at the start of each such operator;
//   * in recompute, the k-th such operator runs on the k-th captured state,
//     and the generators are put back afterwards, so recomputing never shifts
//     what anyone draws next.
// A recompute that draws in a different order from its forward (randomness
// that depends on data) is reported, never replayed wrongly. Draws made
// without an operator (calling a generator directly) are not seen.
//
// The same callback feeds Deferred BatchNorm (see batch_norm.h), which needs
// the input of every `aten::batch_norm` a cell runs.
#pragma once

#include <ATen/Context.h>
#include <ATen/core/Generator.h>
#include <ATen/record_function.h>
#include <c10/util/Exception.h>
#include <torch/types.h>

#include <cstdint>
#include <cstring>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace gpipe::detail {

inline at::Generator default_generator(const torch::Device& device) {
  return at::globalContext().defaultGenerator(device);
}

inline torch::Tensor generator_state(at::Generator generator) {
  std::lock_guard<std::mutex> lock(generator.mutex());
  return generator.get_state();
}

inline void set_generator_state(
    at::Generator generator,
    const torch::Tensor& state) {
  std::lock_guard<std::mutex> lock(generator.mutex());
  generator.set_state(state);
}

/// The states of the CPU generator and, for a CUDA device, its generator.
struct GeneratorStates {
  torch::Tensor cpu;
  torch::Tensor device;

  static GeneratorStates capture(const torch::Device& device) {
    GeneratorStates states;
    states.cpu = generator_state(default_generator(torch::kCPU));
    if (device.is_cuda()) {
      states.device = generator_state(default_generator(device));
    }
    return states;
  }

  void restore(const torch::Device& device) const {
    set_generator_state(default_generator(torch::kCPU), cpu);
    if (device.is_cuda() && this->device.defined()) {
      set_generator_state(default_generator(device), this->device);
    }
  }
};

/// Operators that draw random numbers take turns on this lock while lanes
/// run at once (Note [Random draws are recorded per operator]).
inline std::mutex& random_draw_mutex() {
  static std::mutex mutex;
  return mutex;
}

/// Whether an operator can draw from a default generator: it takes a
/// Generator, or it is a fused dropout kernel (which draws without one).
inline bool draws_random_numbers(const at::RecordFunction& fn) {
  // Keyed by the schema's name string, which lives as long as the operator.
  thread_local std::unordered_map<const void*, bool> known;
  const char* name = fn.name();
  const auto found = known.find(name);
  if (found != known.end()) {
    return found->second;
  }
  bool draws = std::strstr(name, "dropout") != nullptr;
  if (!draws) {
    if (const auto schema = fn.operator_schema()) {
      for (const auto& argument : schema->arguments()) {
        auto type = argument.type();
        if (type->kind() == c10::TypeKind::OptionalType) {
          type = type->castRaw<c10::OptionalType>()->getElementType();
        }
        if (type->kind() == c10::TypeKind::GeneratorType) {
          draws = true;
          break;
        }
      }
    }
  }
  known.emplace(name, draws);
  return draws;
}

/// The generator states before each random operator of one cell's forward.
struct RandomDraws {
  std::vector<GeneratorStates> before;
};

/// Something that wants the input of every `aten::batch_norm` (batch_norm.h).
struct BatchNormObserver {
  virtual ~BatchNormObserver() = default;
  /// Called with the operator's inputs: (input, weight, bias, running_mean,
  /// running_var, training, momentum, eps, cudnn_enabled).
  virtual void observe(c10::ArrayRef<const c10::IValue> inputs) = 0;
};

/// What one thread does with the operators of the cell it runs.
struct CellObserver {
  enum class Draws {
    /// Random operators only take turns (when `lock_draws`).
    Serialize,
    /// Capture the generators before each random operator into `draws`.
    Record,
    /// Run each random operator on the state captured in `draws`.
    Replay,
  };

  Draws mode = Draws::Serialize;
  bool lock_draws = false;
  torch::Device device = torch::kCPU;
  RandomDraws* draws = nullptr;
  BatchNormObserver* batch_norm = nullptr;

  /// Set when the replay ran out of captured states (checked by the caller:
  /// exceptions cannot leave a RecordFunction callback).
  bool replay_mismatch = false;
  size_t replayed = 0;

  void begin_draw() {
    if (depth_++ > 0) {
      return; // an operator called by a random operator: already covered
    }
    if (lock_draws) {
      lock_ = std::unique_lock<std::mutex>(random_draw_mutex());
    }
    if (mode == Draws::Record) {
      draws->before.push_back(GeneratorStates::capture(device));
    } else if (mode == Draws::Replay) {
      if (replayed >= draws->before.size()) {
        replay_mismatch = true;
        return;
      }
      restore_after_ = GeneratorStates::capture(device);
      draws->before[replayed++].restore(device);
    }
  }

  void end_draw() {
    if (depth_ == 0 || --depth_ > 0) {
      return;
    }
    if (restore_after_) {
      restore_after_->restore(device);
      restore_after_.reset();
    }
    if (lock_.owns_lock()) {
      lock_.unlock();
    }
  }

  bool finished_replay() const {
    return !replay_mismatch &&
        (mode != Draws::Replay || draws == nullptr ||
         replayed == draws->before.size());
  }

 private:
  int depth_ = 0;
  std::unique_lock<std::mutex> lock_;
  std::optional<GeneratorStates> restore_after_;
};

inline CellObserver*& current_observer() {
  thread_local CellObserver* observer = nullptr;
  return observer;
}

inline std::unique_ptr<at::ObserverContext> on_operator_start(
    const at::RecordFunction& fn) {
  CellObserver* observer = current_observer();
  if (observer == nullptr) {
    return nullptr;
  }
  if (observer->batch_norm != nullptr &&
      std::strcmp(fn.name(), "aten::batch_norm") == 0 && fn.num_inputs() >= 6) {
    observer->batch_norm->observe(fn.inputs());
  }
  if (draws_random_numbers(fn)) {
    observer->begin_draw();
  }
  return nullptr;
}

inline void on_operator_end(
    const at::RecordFunction& fn,
    at::ObserverContext* /*context*/) {
  CellObserver* observer = current_observer();
  if (observer != nullptr && draws_random_numbers(fn)) {
    observer->end_draw();
  }
}

/// Makes `observer` watch this thread's operators for the guard's lifetime.
/// Scopes nest (a pipe inside a partition): the innermost observer wins.
class ObserverScope {
 public:
  explicit ObserverScope(CellObserver& observer)
      : previous_(current_observer()), enable_(true) {
    if (previous_ == nullptr) {
      handle_ = at::addThreadLocalCallback(
          at::RecordFunctionCallback(&on_operator_start, &on_operator_end)
              .needsInputs(observer.batch_norm != nullptr)
              .scopes({at::RecordScope::FUNCTION}));
    }
    current_observer() = &observer;
  }

  ~ObserverScope() {
    current_observer() = previous_;
    if (handle_ != 0) {
      at::removeCallback(handle_);
    }
  }

  ObserverScope(const ObserverScope&) = delete;
  ObserverScope& operator=(const ObserverScope&) = delete;

 private:
  CellObserver* previous_;
  at::RecordFunctionGuard enable_; // a user's DisableRecordFunctionGuard
  at::CallbackHandle handle_ = 0;
};

} // namespace gpipe::detail
