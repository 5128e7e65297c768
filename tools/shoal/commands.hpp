#pragma once
// Each group of subcommands registers itself on the top-level CLI.

namespace CLI {
class App;
}

namespace shoal::tools {

/// make-model, eval, generate, bench.
void add_model_commands(CLI::App& app);

}  // namespace shoal::tools
