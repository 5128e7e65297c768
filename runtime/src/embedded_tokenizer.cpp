#include "shoal/runtime/embedded_tokenizer.hpp"

#include "shoal/base/error.hpp"

#include <fstream>

// .incbin keeps the 7.8 MB file out of the C++ front end: compiling it as a char array
// literal would take minutes and gigabytes. The build names the files as OBJECT_DEPENDS and
// passes their hash as a definition, so neither Ninja nor ccache keeps a stale object.
asm(R"(
  .pushsection .rodata
  .balign 16
  .globl shoal_embedded_tokenizer_json_begin
shoal_embedded_tokenizer_json_begin:
  .incbin ")" SHOAL_EMBEDDED_TOKENIZER_DIR R"(/tokenizer.json"
  .globl shoal_embedded_tokenizer_json_end
shoal_embedded_tokenizer_json_end:
  .balign 16
  .globl shoal_embedded_tokenizer_config_begin
shoal_embedded_tokenizer_config_begin:
  .incbin ")" SHOAL_EMBEDDED_TOKENIZER_DIR R"(/tokenizer_config.json"
  .globl shoal_embedded_tokenizer_config_end
shoal_embedded_tokenizer_config_end:
  .popsection
)");

extern "C" {
extern const char shoal_embedded_tokenizer_json_begin[];
extern const char shoal_embedded_tokenizer_json_end[];
extern const char shoal_embedded_tokenizer_config_begin[];
extern const char shoal_embedded_tokenizer_config_end[];
}

namespace shoal::runtime {
namespace {

void write_file(const std::filesystem::path& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) shoal::fail(errc::failed_precondition, "cannot write {}", path.string());
}

}  // namespace

std::string_view deepseek_v3_tokenizer_json() {
  return {shoal_embedded_tokenizer_json_begin,
          static_cast<std::size_t>(shoal_embedded_tokenizer_json_end - shoal_embedded_tokenizer_json_begin)};
}

std::string_view deepseek_v3_tokenizer_config_json() {
  return {shoal_embedded_tokenizer_config_begin,
          static_cast<std::size_t>(shoal_embedded_tokenizer_config_end - shoal_embedded_tokenizer_config_begin)};
}

void write_deepseek_v3_tokenizer(const std::filesystem::path& dir) {
  write_file(dir / "tokenizer.json", deepseek_v3_tokenizer_json());
  write_file(dir / "tokenizer_config.json", deepseek_v3_tokenizer_config_json());
}

}  // namespace shoal::runtime
