// Two-TU link test (see pipe_user.cpp): both TUs include <gpipe/gpipe.h> and
// instantiate the pipe; the program links and runs once in each.
#include <gpipe/gpipe.h>

#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/linear.h>

#include <cmath>
#include <iostream>

float train_step_in_second_tu();

int main() {
  torch::manual_seed(0);
  torch::nn::Sequential seq(
      torch::nn::Linear(4, 4), torch::nn::ReLU(), torch::nn::Linear(4, 1));
  gpipe::GPipe<torch::nn::Sequential> pipe(
      seq, gpipe::GPipeOptions(2).microbatches(2));
  auto loss = pipe(torch::randn({4, 4})).sum();
  loss.backward();
  const float other = train_step_in_second_tu();
  if (!std::isfinite(loss.item<float>()) || !std::isfinite(other)) {
    std::cerr << "two_tu: non-finite loss\n";
    return 1;
  }
  std::cout << "two_tu: " << gpipe::kVersion
            << " linked from two translation units\n";
  return 0;
}
