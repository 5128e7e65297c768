// The DeepSeek-V3 tokenizer on any bytes: valid UTF-8 encodes to ids that decode back to the
// same text; anything else is refused with shoal::error(invalid_argument).

#include "fuzz_check.hpp"

#include "shoal/base/error.hpp"
#include "shoal/runtime/embedded_tokenizer.hpp"
#include "shoal/runtime/tokenizer.hpp"

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

namespace {

// Built once, before the first input (loading the 129k-entry vocabulary takes seconds under
// ASan, which libFuzzer's per-input timeout would otherwise count).
const shoal::runtime::tokenizer* tok = nullptr;

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  static const auto loaded = shoal::runtime::tokenizer::from_json(
      shoal::runtime::deepseek_v3_tokenizer_json(), shoal::runtime::deepseek_v3_tokenizer_config_json());
  tok = &loaded;
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  std::vector<shoal::runtime::token_id> ids;
  try {
    ids = tok->encode(text);
  } catch (const shoal::error& e) {
    SHOAL_FUZZ_CHECK(e.code() == shoal::errc::invalid_argument);
    return 0;
  }
  for (const auto id : ids) SHOAL_FUZZ_CHECK(id >= 0 && id < tok->id_limit());
  SHOAL_FUZZ_CHECK(tok->decode(ids) == text);
  return 0;
}
