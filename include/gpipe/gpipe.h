// The one header users include: GPipe pipeline parallelism for LibTorch.
//
// The library only: options, schedules and programs, the pipe, skip
// connections, recompute awareness, failed cells, and the timeline hook. The
// tools are opt-in headers: <gpipe/trace.h> (Chrome traces), <gpipe/chart.h>
// (schedule pictures), <gpipe/memory.h> (memory meter) and <gpipe/balance.h>
// (profiling and balancing).
#pragma once

#include <gpipe/failure.h>
#include <gpipe/grad_scaler.h>
#include <gpipe/gradients.h>
#include <gpipe/options.h>
#include <gpipe/pipe.h>
#include <gpipe/program.h>
#include <gpipe/program_csv.h>
#include <gpipe/recompute.h>
#include <gpipe/schedule.h>
#include <gpipe/schedules.h>
#include <gpipe/search.h>
#include <gpipe/simulate.h>
#include <gpipe/skip.h>
#include <gpipe/stage_costs.h>
#include <gpipe/timeline.h>
#include <gpipe/version.h>
