// The one header users include: GPipe pipeline parallelism for LibTorch.
#pragma once

#include <gpipe/options.h>
#include <gpipe/pipe.h>
#include <gpipe/schedule.h>
#include <gpipe/version.h>
