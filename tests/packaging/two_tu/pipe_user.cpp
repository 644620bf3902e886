// The second translation unit of the two-TU link test: it includes the
// umbrella header too and uses the pipe, so any non-inline function or
// variable defined in a gpipe header is defined twice and the link fails.
#include <gpipe/gpipe.h>

#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/linear.h>

float train_step_in_second_tu() {
  torch::nn::Sequential seq(
      torch::nn::Linear(4, 4), torch::nn::Tanh(), torch::nn::Linear(4, 1));
  gpipe::GPipe<torch::nn::Sequential> pipe(
      seq, gpipe::GPipeOptions(2).microbatches(2));
  auto loss = pipe(torch::randn({4, 4})).sum();
  loss.backward();
  return loss.item<float>();
}
