// The library's version, written once: the three numbers below. CMake reads
// them into project(VERSION ...), and `kVersion` is spelled from them, so the
// package config and the code never disagree.
#pragma once

#define GPIPE_VERSION_MAJOR 0
#define GPIPE_VERSION_MINOR 2
#define GPIPE_VERSION_PATCH 0

#define GPIPE_VERSION_STRINGIFY_(x) #x
#define GPIPE_VERSION_STRINGIFY(x) GPIPE_VERSION_STRINGIFY_(x)

namespace gpipe {
/// "major.minor.patch" of the headers in use, e.g. "0.1.0".
inline constexpr const char* kVersion =
    GPIPE_VERSION_STRINGIFY(GPIPE_VERSION_MAJOR) "." GPIPE_VERSION_STRINGIFY(
        GPIPE_VERSION_MINOR) "." GPIPE_VERSION_STRINGIFY(GPIPE_VERSION_PATCH);
} // namespace gpipe
