// The config.json parser on any bytes: it accepts a config or throws
// shoal::error(invalid_argument). An accepted config serializes back to config.json text that
// parses to the same values.

#include "fuzz_check.hpp"

#include "shoal/base/error.hpp"
#include "shoal/config/model_config.hpp"

#include <cstddef>
#include <cstdint>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  shoal::config::model_config config;
  try {
    config = shoal::config::parse_model_config(text, "config.json");
  } catch (const shoal::error& e) {
    SHOAL_FUZZ_CHECK(e.code() == shoal::errc::invalid_argument);
    return 0;
  }
  const std::string again = shoal::config::model_config_to_json(config);
  try {
    const auto reparsed = shoal::config::parse_model_config(again, "config.json (written back)");
    SHOAL_FUZZ_CHECK(shoal::config::model_config_to_json(reparsed) == again);
  } catch (const shoal::error& e) {
    std::fprintf(stderr, "written back config refused: %s\n", e.what());
    SHOAL_FUZZ_CHECK(false);
  }
  return 0;
}
