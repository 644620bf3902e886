// The library's version, in one place: CMake reads it from here into
// project(VERSION ...), so the package config and the code never disagree.
#pragma once

#define GPIPE_VERSION_MAJOR 0
#define GPIPE_VERSION_MINOR 1
#define GPIPE_VERSION_PATCH 0

namespace gpipe {
/// "major.minor.patch" of the headers in use.
inline constexpr const char* kVersion = "0.1.0";
} // namespace gpipe
