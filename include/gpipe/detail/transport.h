// How an activation travels from one partition's device to the next.
//
// This is the seam between stages: today a tensor moves inside one process,
// tomorrow a c10d transport will send it to another rank. Everything the
// pipeline needs from a transport is `send(tensor, device)`: it returns the
// tensor on `device`, differentiably (its gradient travels back the same way).
//
// Note [Copies on side streams]
// A copy between CUDA devices issued on the compute streams would serialize
// with compute on both devices. Instead the copy runs on pool streams of both
// devices: the copy streams wait for the producer's compute stream (an
// event), the consumer's compute stream waits for the copy (another event),
// and `record_stream` tells the caching allocator that the source is read on
// the copy stream and the destination is read on the consumer's stream, so
// neither block is handed out again before those streams are done with it.
// The streams called "compute" are whatever streams are current on each device
// in the calling thread, so a user's own stream is honoured. A copy to the
// CPU is a blocking copy (the host must not read it before it lands), and so
// is a copy from the CPU: a pinned source could otherwise be reused by the
// caller while the copy is still reading it.
//
// Note [Gradient copies and the engine's streams]
// In backward, CopyToDevice's node copies the gradient from the device its
// forward wrote to (`to`) back to the one it read from (`from`). The engine
// knows one canonical stream per node: the stream current on `to` when the
// forward ran, which it makes current before calling the backward. Its
// contract ("Stream sync contract" in LibTorch's input_buffer.cpp) is that a
// node's outputs are ready on that canonical stream: the next node, on
// `from`, waits on an event recorded on the producer's canonical stream, not
// on `from`'s streams. So after the copy lands on `from`'s copy stream, the
// canonical stream on `to` waits for it as well (cross-device stream waits
// are legal), and the consumer, which waits on the canonical stream, is
// ordered after the copy whatever stream it runs on. The engine itself
// records the consumer's stream on the gradient (record_stream) when it
// differs from the producer's, so the block is not reused early.
#pragma once

#include <c10/core/Event.h>
#include <c10/core/Stream.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/types.h>

#include <functional>
#include <vector>

namespace gpipe::detail {

/// Called on the copy stream of the destination when a copy starts and
/// ends, to time it where it runs.
struct CopyHooks {
  std::function<void()> begin;
  std::function<void()> end;
};

/// Copies `x` to `to` following Note [Copies on side streams]. With
/// `ready_on_source_stream`, the source device's current stream also waits
/// for the copy (Note [Gradient copies and the engine's streams]).
inline torch::Tensor copy_across_devices(
    const torch::Tensor& x,
    const torch::Device& to,
    bool ready_on_source_stream = false,
    const CopyHooks* hooks = nullptr) {
  const torch::Device from = x.device();
  if (!from.is_cuda() && !to.is_cuda()) {
    if (hooks != nullptr && hooks->begin) {
      hooks->begin();
    }
    auto y = x.to(to);
    if (hooks != nullptr && hooks->end) {
      hooks->end();
    }
    return y;
  }
  std::vector<c10::Stream> copy_streams;
  if (from.is_cuda()) {
    c10::impl::VirtualGuardImpl impl(from.type());
    const c10::Stream producer = impl.getStream(from);
    const c10::Stream copy_stream = impl.getStreamFromGlobalPool(from);
    c10::Event produced(from.type());
    produced.record(producer);
    produced.block(copy_stream);
    copy_streams.push_back(copy_stream);
  }
  c10::optional<c10::Stream> consumer;
  if (to.is_cuda()) {
    c10::impl::VirtualGuardImpl impl(to.type());
    consumer = impl.getStream(to);
    const c10::Stream copy_stream = impl.getStreamFromGlobalPool(to);
    // The destination block may still be read by earlier work on the consumer.
    c10::Event consumer_ready(to.type());
    consumer_ready.record(*consumer);
    consumer_ready.block(copy_stream);
    copy_streams.push_back(copy_stream);
  }
  torch::Tensor y;
  {
    c10::MultiStreamGuard on_copy_streams(copy_streams);
    if (hooks != nullptr && hooks->begin) {
      hooks->begin();
    }
    y = x.to(to, /*non_blocking=*/from.is_cuda() && to.is_cuda());
    if (hooks != nullptr && hooks->end) {
      hooks->end();
    }
    if (from.is_cuda()) {
      x.record_stream(copy_streams.front());
    }
    if (to.is_cuda()) {
      c10::Event copied(to.type());
      copied.record(copy_streams.back());
      copied.block(*consumer);
      y.record_stream(*consumer);
      if (ready_on_source_stream && from.is_cuda()) {
        c10::impl::VirtualGuardImpl impl(from.type());
        copied.block(impl.getStream(from));
      }
    }
  }
  return y;
}

/// The differentiable copy: forward and backward both go through
/// `copy_across_devices`, so gradients overlap with compute as activations do.
struct CopyToDevice : torch::autograd::Function<CopyToDevice> {
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx,
      const torch::Tensor& x,
      torch::Device to,
      const CopyHooks* hooks) {
    ctx->saved_data["from"] = x.device();
    return {
        copy_across_devices(x, to, /*ready_on_source_stream=*/false, hooks)};
  }

  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext* ctx,
      torch::autograd::variable_list grad_outputs) {
    const torch::Device from = ctx->saved_data["from"].toDevice();
    const torch::Tensor& grad = grad_outputs[0];
    return {
        grad.defined()
            ? copy_across_devices(grad, from, /*ready_on_source_stream=*/true)
            : torch::Tensor(),
        torch::Tensor(),
        torch::Tensor()};
  }
};

/// Moves activations between partitions living in one process.
class LocalTransport {
 public:
  /// `x` on `to`; the same tensor when it is already there (no copy).
  torch::Tensor send(
      const torch::Tensor& x,
      const torch::Device& to,
      const CopyHooks* hooks = nullptr) const {
    if (x.device() == to) {
      return x;
    }
    if (x.requires_grad() && torch::GradMode::is_enabled()) {
      return CopyToDevice::apply(x, to, hooks)[0];
    }
    return copy_across_devices(x, to, /*ready_on_source_stream=*/false, hooks);
  }
};

} // namespace gpipe::detail
