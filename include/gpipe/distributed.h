// gpipe across processes, opt-in: link gpipe::distributed.
//
// Why a separate umbrella: the multi-process pipe depends on c10d (and so on
// Gloo's headers, which the torch wheel does not ship: see the README), and a
// single-process user should not pay for it. `World` connects the ranks
// (torchrun's environment or explicit values); `DistributedGPipe` runs one
// pipeline stage (or several, interleaved) per rank, replicated for data
// parallelism, with the schedules, checkpointing and exact losses of the
// in-process pipe.
#pragma once

#include <gpipe/gpipe.h>

#include <gpipe/distributed/gradients.h>
#include <gpipe/distributed/pipe.h>
#include <gpipe/distributed/sharded_optimizer.h>
#include <gpipe/distributed/transport.h>
#include <gpipe/distributed/world.h>
