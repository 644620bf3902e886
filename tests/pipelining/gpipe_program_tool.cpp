// gpipe_program_tool: gpipe's programs for the Python tests beside
// torch.distributed.pipelining (csv_interop.py, conformance.py), which hold
// pipelining's schedules against gpipe's through files.
//
//   gpipe_program_tool schedules
//       gpipe's schedule names, one a line
//   gpipe_program_tool schedule <name> --lanes L --stages-per-lane V
//       --microbatches M [--placement loop|v] [--format F]
//       build_program's program, stage s on lane s mod L (loop) or in a V
//       (stage s and 2L - 1 - s on lane s, and so on down and up)
//   gpipe_program_tool read <file> --format F [--to F]
//       the file parsed and validated (simulate), written in --to (text)
//   gpipe_program_tool makespan <file> --format F [--F x] [--B x] [--I x]
//       [--W x] [--comm x]
//       the simulated makespan (simulate's costs, Costs{} by default)
//   gpipe_program_tool batch
//       runs each line of stdin as a command line of the above, printing its
//       output, then "--- exit <code>" (one process for many requests: a
//       LibTorch program takes a while to start)
//
// Formats F: text, csv-compute (pipelining's compute_only), csv-comms
// (compute_comms). Exits 0, 1 on a gpipe error (printed, "gpipe: ..."), 2 on
// a usage error.
#include <gpipe/program.h>
#include <gpipe/program_csv.h>
#include <gpipe/schedule.h>
#include <gpipe/schedules.h>
#include <gpipe/simulate.h>

#include <c10/util/Exception.h>

#include <cstdint>
#include <exception>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace {

struct UsageError {
  std::string message;
};

gpipe::ProgramFormat format_named(const std::string& name) {
  if (name == "text") {
    return gpipe::ProgramFormat::Text;
  }
  if (name == "csv-compute") {
    return gpipe::ProgramFormat::PipeliningComputeOnly;
  }
  if (name == "csv-comms") {
    return gpipe::ProgramFormat::PipeliningComputeComms;
  }
  throw UsageError{
      "unknown format '" + name + "' (formats: text, csv-compute, csv-comms)"};
}

/// The positional arguments and the --flag value pairs of a command line
/// after its command.
struct Arguments {
  std::vector<std::string> positional;
  std::map<std::string, std::string> flags;

  std::string flag(const std::string& name, const std::string& otherwise)
      const {
    const auto found = flags.find(name);
    return found == flags.end() ? otherwise : found->second;
  }
  std::string required(const std::string& name) const {
    const auto found = flags.find(name);
    if (found == flags.end()) {
      throw UsageError{"--" + name + " is required"};
    }
    return found->second;
  }
};

Arguments split(const std::vector<std::string>& words) {
  Arguments arguments;
  for (size_t k = 2; k < words.size(); ++k) {
    if (words[k].rfind("--", 0) != 0) {
      arguments.positional.push_back(words[k]);
      continue;
    }
    if (k + 1 == words.size()) {
      throw UsageError{words[k] + " needs a value"};
    }
    arguments.flags[words[k].substr(2)] = words[k + 1];
    ++k;
  }
  return arguments;
}

int64_t whole(const std::string& text, const std::string& what) {
  try {
    size_t used = 0;
    const int64_t value = std::stoll(text, &used);
    if (used == text.size() && value >= 1) {
      return value;
    }
  } catch (const std::exception&) {
  }
  throw UsageError{
      what + " must be a whole number of at least 1 ('" + text + "')"};
}

double cost(
    const Arguments& arguments,
    const std::string& name,
    double otherwise) {
  const std::string text = arguments.flag(name, "");
  if (text.empty()) {
    return otherwise;
  }
  try {
    size_t used = 0;
    const double value = std::stod(text, &used);
    if (used == text.size()) {
      return value;
    }
  } catch (const std::exception&) {
  }
  throw UsageError{"--" + name + " must be a number ('" + text + "')"};
}

/// Stage s's lane: s mod L (loop), or down the lanes and back up (v: stage
/// s and 2L - 1 - s on lane s), as pipelining's generate_stage_to_rank_mapping.
std::vector<int64_t> placement(
    const std::string& style,
    int64_t lanes,
    int64_t chunks) {
  if (style != "loop" && style != "v") {
    throw UsageError{"unknown placement '" + style + "' (placements: loop, v)"};
  }
  std::vector<int64_t> lane_of_stage;
  for (int64_t s = 0; s < lanes * chunks; ++s) {
    const int64_t across = s % lanes;
    const bool up = style == "v" && (s / lanes) % 2 == 1;
    lane_of_stage.push_back(up ? lanes - 1 - across : across);
  }
  return lane_of_stage;
}

std::string read_file(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) {
    throw UsageError{"cannot read '" + path + "'"};
  }
  std::ostringstream text;
  text << file.rdbuf();
  return text.str();
}

gpipe::Program read_program(const Arguments& arguments) {
  if (arguments.positional.size() != 1) {
    throw UsageError{"expected one file"};
  }
  return gpipe::parse_program(
      read_file(arguments.positional[0]),
      format_named(arguments.required("format")));
}

int run(const std::vector<std::string>& words, std::ostream& out);

int batch(std::ostream& out) {
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream split_line(line);
    std::vector<std::string> words{"gpipe_program_tool"};
    for (std::string word; split_line >> word;) {
      words.push_back(word);
    }
    if (words.size() == 1) {
      continue;
    }
    const int code = run(words, out);
    out << "--- exit " << code << "\n";
  }
  return 0;
}

int run(const std::vector<std::string>& words, std::ostream& out) {
  try {
    if (words.size() < 2) {
      throw UsageError{
          "expected a command: schedules, schedule, read, makespan or batch"};
    }
    const std::string& command = words[1];
    const Arguments arguments = split(words);
    if (command == "batch") {
      return batch(out);
    }
    if (command == "schedules") {
      for (const gpipe::Schedule schedule : gpipe::kEverySchedule) {
        out << gpipe::to_string(schedule) << "\n";
      }
      return 0;
    }
    if (command == "schedule") {
      if (arguments.positional.size() != 1) {
        throw UsageError{"expected one schedule name"};
      }
      const int64_t lanes = whole(arguments.required("lanes"), "--lanes");
      const int64_t chunks =
          whole(arguments.required("stages-per-lane"), "--stages-per-lane");
      const int64_t m =
          whole(arguments.required("microbatches"), "--microbatches");
      const gpipe::Program program = gpipe::build_program(
          gpipe::parse_schedule(arguments.positional[0]),
          lanes * chunks,
          m,
          placement(arguments.flag("placement", "loop"), lanes, chunks));
      out << gpipe::format_program(
          program, format_named(arguments.flag("format", "text")));
      return 0;
    }
    if (command == "read") {
      const gpipe::Program program = read_program(arguments);
      gpipe::simulate(program);
      out << gpipe::format_program(
          gpipe::lower(program), format_named(arguments.flag("to", "text")));
      return 0;
    }
    if (command == "makespan") {
      const gpipe::Costs defaults;
      const gpipe::Costs costs{
          cost(arguments, "F", defaults.F),
          cost(arguments, "B", defaults.B),
          cost(arguments, "I", defaults.I),
          cost(arguments, "W", defaults.W),
          cost(arguments, "comm", defaults.comm)};
      out << gpipe::simulate(read_program(arguments), costs).makespan << "\n";
      return 0;
    }
    throw UsageError{"unknown command '" + command + "'"};
  } catch (const UsageError& e) {
    out << "gpipe_program_tool: " << e.message << "\n";
    return 2;
  } catch (const c10::Error& e) {
    out << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {
    out << "gpipe_program_tool: " << e.what() << "\n";
    return 1;
  }
}

} // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> words(argv, argv + argc);
  std::ostringstream out;
  const int code = run(words, out);
  (code == 0 ? std::cout : std::cerr) << out.str();
  return code;
}
