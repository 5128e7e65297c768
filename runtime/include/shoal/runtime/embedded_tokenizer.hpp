#pragma once
/// \file
/// The DeepSeek-V3 tokenizer files, compiled into the binary so that generated checkpoints
/// (make-model) work with text without the source tree at run time.

#include <filesystem>
#include <string_view>

namespace shoal::runtime {

/// The published DeepSeek-V3 `tokenizer.json`.
std::string_view deepseek_v3_tokenizer_json();

/// The published DeepSeek-V3 `tokenizer_config.json` (with its chat template).
std::string_view deepseek_v3_tokenizer_config_json();

/// Writes both files into `dir` (which must exist). Throws `failed_precondition` when they
/// cannot be written.
void write_deepseek_v3_tokenizer(const std::filesystem::path& dir);

}  // namespace shoal::runtime
