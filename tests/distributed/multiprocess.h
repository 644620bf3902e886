// Real processes for the distributed tests: the test program starts copies
// of itself as the ranks of a job on 127.0.0.1, each running one scenario
// (selected by GPIPE_TEST_SCENARIO), and collects how each one ended. A
// deadline bounds every job: ranks still running then are killed, so no
// child outlives its test.
#pragma once

#include <gtest/gtest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace gpipe_test::multiprocess {

/// How one rank ended.
struct Outcome {
  int rank = 0;
  bool exited = false; // else killed by a signal
  int code = 0; // exit code, or the signal
  bool killed_by_harness = false;
  double seconds = 0; // from the job's start to the rank's end
  std::string log; // its stdout and stderr

  /// The value of the last "RESULT key=value" line, or "".
  std::string result(const std::string& key) const {
    std::istringstream lines(log);
    std::string line;
    std::string value;
    const std::string prefix = "RESULT " + key + "=";
    while (std::getline(lines, line)) {
      if (line.rfind(prefix, 0) == 0) {
        value = line.substr(prefix.size());
      }
    }
    return value;
  }

  bool succeeded() const {
    return exited && code == 0;
  }
};

inline std::ostream& operator<<(std::ostream& os, const Outcome& outcome) {
  os << "rank " << outcome.rank << ": "
     << (outcome.killed_by_harness
             ? "killed by the harness (deadline, or a straggler)"
             : outcome.exited ? "exit " + std::to_string(outcome.code)
                              : "signal " + std::to_string(outcome.code))
     << " after " << outcome.seconds << " s\n"
     << outcome.log;
  return os;
}

/// A port nothing listens on now (the kernel's pick).
inline int free_port() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = 0;
  bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address));
  socklen_t length = sizeof(address);
  getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length);
  const int port = ntohs(address.sin_port);
  close(fd);
  return port;
}

struct Job {
  std::string scenario;
  std::string args; // GPIPE_TEST_ARGS, "key=value,..."
  int world = 2;
  std::chrono::seconds deadline{120};
  int port = 0; // 0: a free one
  bool set_rank_environment = true; // false: the ranks get no RANK etc.
  int straggler = -1; // a rank expected to hang: killed once the rest end
};

/// Runs `job.world` copies of this program and waits for all of them.
inline std::vector<Outcome> run(const Job& job) {
  char directory_template[] = "/tmp/gpipe_mp_XXXXXX";
  const std::string directory = mkdtemp(directory_template);
  const int port = job.port != 0 ? job.port : free_port();
  const auto start = std::chrono::steady_clock::now();
  std::vector<pid_t> pids;
  for (int rank = 0; rank < job.world; ++rank) {
    const std::string log = directory + "/rank" + std::to_string(rank);
    const pid_t pid = fork();
    if (pid == 0) {
      setpgid(0, 0);
      setenv("GPIPE_TEST_SCENARIO", job.scenario.c_str(), 1);
      setenv("GPIPE_TEST_ARGS", job.args.c_str(), 1);
      setenv("OMP_NUM_THREADS", "1", 1);
      if (job.set_rank_environment) {
        setenv("RANK", std::to_string(rank).c_str(), 1);
        setenv("LOCAL_RANK", std::to_string(rank).c_str(), 1);
        setenv("WORLD_SIZE", std::to_string(job.world).c_str(), 1);
        setenv("MASTER_ADDR", "127.0.0.1", 1);
        setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
      } else {
        for (const char* name :
             {"RANK",
              "LOCAL_RANK",
              "WORLD_SIZE",
              "MASTER_ADDR",
              "MASTER_PORT"}) {
          unsetenv(name);
        }
      }
      FILE* out = fopen(log.c_str(), "w");
      dup2(fileno(out), 1);
      dup2(fileno(out), 2);
      execl("/proc/self/exe", "gpipe_distributed_tests", nullptr);
      _exit(127);
    }
    pids.push_back(pid);
  }
  std::vector<Outcome> outcomes(static_cast<size_t>(job.world));
  std::vector<bool> done(static_cast<size_t>(job.world), false);
  size_t remaining = pids.size();
  while (remaining > 0) {
    const bool late = std::chrono::steady_clock::now() - start > job.deadline;
    const bool only_straggler_left = job.straggler >= 0 && remaining == 1 &&
        !done[static_cast<size_t>(job.straggler)];
    for (size_t r = 0; r < pids.size(); ++r) {
      if (done[r]) {
        continue;
      }
      if (late || only_straggler_left) {
        kill(pids[r], SIGKILL);
        outcomes[r].killed_by_harness = true;
      }
      int status = 0;
      const pid_t ended =
          waitpid(pids[r], &status, late || only_straggler_left ? 0 : WNOHANG);
      if (ended == pids[r]) {
        done[r] = true;
        --remaining;
        auto& outcome = outcomes[r];
        outcome.rank = static_cast<int>(r);
        outcome.exited = WIFEXITED(status);
        outcome.code = outcome.exited ? WEXITSTATUS(status) : WTERMSIG(status);
        outcome.seconds = std::chrono::duration<double>(
                              std::chrono::steady_clock::now() - start)
                              .count();
      }
    }
    if (remaining > 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
  for (size_t r = 0; r < pids.size(); ++r) {
    std::ifstream in(directory + "/rank" + std::to_string(r));
    std::stringstream text;
    text << in.rdbuf();
    outcomes[r].log = text.str();
    std::remove((directory + "/rank" + std::to_string(r)).c_str());
  }
  rmdir(directory.c_str());
  return outcomes;
}

/// Whether process `pid` still exists.
inline bool alive(pid_t pid) {
  return kill(pid, 0) == 0;
}

/// The arguments a rank was started with, from GPIPE_TEST_ARGS.
inline std::map<std::string, std::string> arguments() {
  std::map<std::string, std::string> parsed;
  const char* text = std::getenv("GPIPE_TEST_ARGS");
  std::stringstream items(text == nullptr ? "" : text);
  std::string item;
  while (std::getline(items, item, ',')) {
    const auto equals = item.find('=');
    if (equals != std::string::npos) {
      parsed[item.substr(0, equals)] = item.substr(equals + 1);
    }
  }
  return parsed;
}

/// The whole number `args[key]`, or `fallback` when it is not given.
inline int64_t arg(
    const std::map<std::string, std::string>& args,
    const char* key,
    int64_t fallback) {
  const auto found = args.find(key);
  return found == args.end() ? fallback : std::stoll(found->second);
}

/// The name in the whole Sequential of a pipe's parameter name
/// ("stage3.6.weight" of a pipe built stage by stage is "6.weight").
inline std::string plain_name(const std::string& name) {
  return name.rfind("stage", 0) == 0 ? name.substr(name.find('.') + 1) : name;
}

} // namespace gpipe_test::multiprocess
