#pragma once
// Each group of subcommands registers itself on the top-level CLI.

namespace CLI {
class App;
}

namespace shoal::tools {

/// make-model, eval, generate.
void add_model_commands(CLI::App& app);

/// bench: CPU model speed against the measured memory roofline.
void add_bench_command(CLI::App& app);

/// tokenize, detokenize, bench-tokenizer: the checkpoint's tokenizer.
void add_text_commands(CLI::App& app);

/// node, launch: run a cluster config as processes.
void add_cluster_commands(CLI::App& app);

}  // namespace shoal::tools
