#pragma once
// Runs the built shoal binary as a user would and captures what it prints.

#include <catch2/catch.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

namespace shoal::test {

/// Exit code, stdout and stderr of one shoal invocation.
struct result {
  int exit_code = -1;
  std::string out;
  std::string err;
};

/// Runs `shoal ARGS` (a shell-quoted argument string), with `input` on stdin.
inline result run(const std::string& args, const std::string& input = {}) {
  namespace fs = std::filesystem;
  static int counter = 0;
  const auto tag = std::to_string(::getpid()) + "-" + std::to_string(counter++);
  const fs::path err_file = fs::temp_directory_path() / ("shoal-run-err-" + tag);
  const fs::path in_file = fs::temp_directory_path() / ("shoal-run-in-" + tag);
  std::ofstream(in_file, std::ios::binary) << input;
  const std::string command =
      std::string(SHOAL_BINARY) + " " + args + " <" + in_file.string() + " 2>" + err_file.string();
  result r;
  FILE* pipe = ::popen(command.c_str(), "r");
  REQUIRE(pipe != nullptr);
  char buffer[65536];
  std::size_t n;
  while ((n = std::fread(buffer, 1, sizeof buffer, pipe)) > 0) r.out.append(buffer, n);
  const int status = ::pclose(pipe);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::ifstream in(err_file);
  std::stringstream text;
  text << in.rdbuf();
  r.err = text.str();
  fs::remove(err_file);
  fs::remove(in_file);
  return r;
}

}  // namespace shoal::test
