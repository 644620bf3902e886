// The one header users include: GPipe pipeline parallelism for LibTorch.
#pragma once

#include <gpipe/chart.h>
#include <gpipe/memory.h>
#include <gpipe/options.h>
#include <gpipe/pipe.h>
#include <gpipe/schedule.h>
#include <gpipe/timeline.h>
#include <gpipe/trace.h>
#include <gpipe/version.h>
