// The cluster YAML parser on any bytes: it accepts a config or throws
// shoal::error(invalid_argument) whose message starts with "cluster.yaml:"; an accepted
// config is then checked against a fixed model (tiny-b's shape, which the seeds describe), which accepts
// it or refuses it the same way.

#include "fuzz_check.hpp"

#include "shoal/base/error.hpp"
#include "shoal/config/cluster_config.hpp"
#include "shoal/config/model_config.hpp"

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace {

const shoal::config::model_config& fixed_model() {
  static const shoal::config::model_config model = [] {
    shoal::config::model_config m;
    m.num_hidden_layers = 6;
    m.first_k_dense_replace = 2;
    m.n_routed_experts = 32;
    m.num_experts_per_tok = 6;
    m.n_group = 8;
    m.topk_group = 3;
    return m;
  }();
  return model;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  shoal::config::cluster_config cluster;
  try {
    cluster = shoal::config::parse_cluster_config(text, "cluster.yaml", "/models");
  } catch (const shoal::error& e) {
    SHOAL_FUZZ_CHECK(e.code() == shoal::errc::invalid_argument);
    SHOAL_FUZZ_CHECK(std::string_view(e.what()).starts_with("cluster.yaml"));
    return 0;
  }
  try {
    shoal::config::validate_against_model(cluster, fixed_model());
  } catch (const shoal::error& e) {
    SHOAL_FUZZ_CHECK(e.code() == shoal::errc::invalid_argument);
  }
  return 0;
}
