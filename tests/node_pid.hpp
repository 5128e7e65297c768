#pragma once
// The pid of a `shoal node --name NODE` process among a launcher's children, for tests that
// kill or freeze one node of a cluster that `shoal launch` or `shoal serve --cluster` started.

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <sys/types.h>

namespace shoal::testing {

/// The child of `parent` (of any of its threads: the launcher restarts nodes from its watcher
/// thread) whose command line has `--name node`, or -1.
inline pid_t node_pid(pid_t parent, const std::string& node) {
  for (const auto& task : std::filesystem::directory_iterator("/proc/" + std::to_string(parent) + "/task")) {
    std::ifstream children(task.path() / "children");
    for (pid_t child; children >> child;) {
      std::ifstream cmd("/proc/" + std::to_string(child) + "/cmdline");
      std::vector<std::string> args;
      for (std::string arg; std::getline(cmd, arg, '\0');) args.push_back(arg);
      for (std::size_t i = 0; i + 1 < args.size(); ++i)
        if (args[i] == "--name" && args[i + 1] == node) return child;
    }
  }
  return -1;
}

}  // namespace shoal::testing
