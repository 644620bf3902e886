// The program both consumer projects (find_package/, add_subdirectory/)
// build: one forward and backward through a small pipe, as a user would.
// CONSUMER_WAY names the project; CONSUMER_EXPECTED_VERSION, when defined, is
// the version the package config reported.
#include <gpipe/gpipe.h>

#include <torch/torch.h>

#include <cstring>
#include <iostream>

int main() {
  torch::manual_seed(0);
  torch::nn::Sequential seq(
      torch::nn::Linear(8, 8), torch::nn::ReLU(), torch::nn::Linear(8, 2));
  gpipe::GPipe<torch::nn::Sequential> pipe(
      seq, gpipe::GPipeOptions(2).microbatches(2));

  auto loss = pipe(torch::randn({4, 8})).pow(2).mean();
  loss.backward();
  for (const auto& p : seq->parameters()) {
    if (!p.grad().defined()) {
      std::cerr << "consumer: a parameter has no gradient\n";
      return 1;
    }
  }
#ifdef CONSUMER_EXPECTED_VERSION
  if (std::strcmp(gpipe::kVersion, CONSUMER_EXPECTED_VERSION) != 0) {
    std::cerr << "consumer: headers say " << gpipe::kVersion
              << ", package config says " << CONSUMER_EXPECTED_VERSION << "\n";
    return 1;
  }
#endif
  std::cout << "gpipe " << gpipe::kVersion << " via " << CONSUMER_WAY
            << ": loss " << loss.item<float>() << "\n";
  return 0;
}
