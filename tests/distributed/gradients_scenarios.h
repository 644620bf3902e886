// The scenarios of gradients_test.cpp, run by the distributed test
// program's ranks (distributed_test.cpp's run_scenario dispatches to them).
#pragma once

#include <gpipe/distributed/world.h>

#include <memory>
#include <string>

namespace gpipe_test {

/// What run_gradients_scenario returns for a scenario it does not know.
constexpr int kUnknownScenario = -1;

/// Runs `scenario` on this rank: its exit code, or kUnknownScenario.
int run_gradients_scenario(
    const std::string& scenario,
    const std::shared_ptr<gpipe::distributed::World>& world);

} // namespace gpipe_test
