// The shoal command: one binary, many subcommands.

#include "commands.hpp"
#include "exit_codes.hpp"

#include "shoal/base/error.hpp"

#include <CLI/CLI.hpp>
#include <fmt/core.h>

#include <malloc.h>

#include <cstdio>
#include <exception>

int main(int argc, char** argv) {
  // Per-step activation buffers are megabytes; by default glibc maps and unmaps each one,
  // and the kernel zeroes fresh pages on every decode step. Keep freed memory for reuse.
  mallopt(M_MMAP_THRESHOLD, 512 << 20);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  CLI::App app{"Shoal: a cluster runtime for DeepSeek-V3/R1 mixture-of-experts models"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "shoal 0.1.0");
  shoal::tools::add_model_commands(app);
  shoal::tools::add_bench_command(app);
  shoal::tools::add_cluster_commands(app);
  shoal::tools::add_text_commands(app);
  shoal::tools::add_serve_commands(app);
  shoal::tools::add_security_commands(app);
  shoal::tools::add_admin_commands(app);
  shoal::tools::add_plan_command(app);
  // Every command exits 0 on success, 2 when the input (command line, files, requests) is
  // wrong and 70 when Shoal itself failed (exit_codes.hpp); commands run inside parse(), from
  // their callbacks.
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help and --version come here too, with CLI11's exit code 0; app.exit prints them.
    return app.exit(e) == 0 ? shoal::tools::kExitSuccess : shoal::tools::kExitBadInput;
  } catch (...) {
    return shoal::tools::report_failure(std::current_exception());
  }
  return shoal::tools::kExitSuccess;
}
