// The command lines of the examples: `--name value` or `--name=value`,
// `--help`, whole numbers with a minimum, the --checkpoint modes, and one way
// of saying what is wrong. Kept with the examples (it is not part of the
// library), so that every example reads and rejects its flags alike; each keeps
// its own flags and what they mean.
#pragma once

#include <gpipe/options.h>

#include <cstdint>
#include <cstdlib>
#include <exception>
#include <functional>
#include <iostream>
#include <string>

namespace gpipe_example {

/// Prints "<program>: <message> (<program> --help lists the flags)" to
/// stderr and exits with status 2.
[[noreturn]] inline void usage_error(
    const char* program,
    const std::string& message) {
  std::cerr << program << ": " << message << " (" << program
            << " --help lists the flags)\n";
  std::exit(2);
}

/// The whole number `text` of flag --`name`, at least `minimum`; a usage
/// error otherwise.
inline int64_t parse_int(
    const char* program,
    const std::string& name,
    const std::string& text,
    int64_t minimum) {
  size_t used = 0;
  int64_t value = 0;
  try {
    value = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != text.size() || text.empty()) {
    usage_error(
        program, "--" + name + " needs a whole number (got: " + text + ")");
  }
  if (value < minimum) {
    usage_error(
        program,
        "--" + name + " must be at least " + std::to_string(minimum) +
            " (got: " + text + ")");
  }
  return value;
}

/// Calls `on_flag(name, value)` for each flag of the command line, in order,
/// `name` without its "--". `--help` or `-h` prints `usage` and exits with
/// status 0; an argument that is not a flag, or a last flag without a value,
/// is a usage error.
inline void for_each_flag(
    int argc,
    char** argv,
    const char* program,
    const char* usage,
    const std::function<
        void(const std::string& name, const std::string& value)>& on_flag) {
  for (int k = 1; k < argc; ++k) {
    std::string arg = argv[k];
    if (arg == "--help" || arg == "-h") {
      std::cout << usage;
      std::exit(0);
    }
    if (arg.rfind("--", 0) != 0) {
      usage_error(program, "unexpected argument (got: " + arg + ")");
    }
    std::string name = arg.substr(2);
    std::string value;
    const auto equals = name.find('=');
    if (equals != std::string::npos) {
      value = name.substr(equals + 1);
      name = name.substr(0, equals);
    } else {
      if (k + 1 >= argc) {
        usage_error(program, "--" + name + " needs a value");
      }
      value = argv[++k];
    }
    on_flag(name, value);
  }
}

/// The checkpoint mode a --checkpoint value (never, except_last or always)
/// names.
inline gpipe::Checkpoint checkpoint_of(const std::string& name) {
  if (name == "never") {
    return gpipe::Checkpoint::Never;
  }
  if (name == "always") {
    return gpipe::Checkpoint::Always;
  }
  return gpipe::Checkpoint::ExceptLast;
}

} // namespace gpipe_example
