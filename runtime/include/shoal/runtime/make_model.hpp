#pragma once
/// \file
/// Deterministic random DeepSeek-V3 checkpoints in the real on-disk format, for demos, tests
/// and benchmarks.

#include "shoal/config/model_config.hpp"

#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

namespace shoal::runtime {

/// Names of the built-in presets ("tiny", "bench-small").
std::vector<std::string> model_preset_names();

/// The architecture of a preset; `fp8` adds the block-FP8 quantization_config. Throws
/// `invalid_argument` for an unknown name, listing the known ones.
config::model_config model_preset(std::string_view name, bool fp8);

/// Writes config.json and sharded safetensors (with model.safetensors.index.json) of random
/// weights for `config` into `out_dir` (created if needed). The same seed gives the same
/// bytes. Projections are uniform with variance 1/fan_in, stored in BF16, or in FP8 with
/// 128x128 block scales when the config is quantized. `progress` gets one line per shard.
void write_random_model(const config::model_config& config, const std::filesystem::path& out_dir,
                        std::uint64_t seed, const std::function<void(const std::string&)>& progress = {});

}  // namespace shoal::runtime
