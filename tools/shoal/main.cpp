// The shoal command: one binary, many subcommands.

#include "commands.hpp"

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
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const shoal::error& e) {
    fmt::print(stderr, "shoal: error: {}\n", e.what());
    return e.code() == shoal::errc::internal ? 70 : 2;
  } catch (const std::exception& e) {
    fmt::print(stderr, "shoal: error: {}\n", e.what());
    return 1;
  }
  return 0;
}
