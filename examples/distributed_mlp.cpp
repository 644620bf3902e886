// distributed_mlp: giant_mlp's distributed mode as a program of its own
// (distributed_mode.h), for the benchmarks and the restart test.
#include "distributed_mode.h"

int main(int argc, char** argv) {
  return gpipe_example::distributed_mode::main(argc, argv);
}
