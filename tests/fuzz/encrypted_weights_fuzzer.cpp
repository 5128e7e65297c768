// An encrypted weights file of any bytes, opened with a fixed key as the loader opens a shard:
// a file that does not authenticate, whose header is inconsistent or whose size disagrees with
// its header is refused with shoal::error(invalid_argument); one that opens has tensors inside
// its data area whose bytes can be read. Never anything else.
//
// The seed corpus holds files encrypted with the key 0x11 * 32 under the name
// fuzz.safetensors, so that mutations reach the safetensors header behind the first chunk.

#include "fuzz_check.hpp"

#include "shoal/base/error.hpp"
#include "shoal/runtime/safetensors.hpp"
#include "shoal/runtime/weights_crypto.hpp"

#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  // The file name is authenticated, so it is the same for every input.
  static const std::filesystem::path dir = [] {
    auto d = std::filesystem::temp_directory_path() / ("shoal-fuzz-encrypted-" + std::to_string(::getpid()));
    std::filesystem::create_directories(d);
    return d;
  }();
  const auto file = dir / "fuzz.safetensors";
  std::ofstream(file, std::ios::binary | std::ios::trunc).write(reinterpret_cast<const char*>(data),
                                                                 static_cast<std::streamsize>(size));
  shoal::runtime::weights_key key;
  key.bytes.fill(0x11);
  try {
    const auto opened = shoal::runtime::safetensors_file::open(file, &key);
    for (const auto& [name, entry] : opened->entries()) {
      SHOAL_FUZZ_CHECK(entry.begin <= entry.end);
      volatile std::byte sink{};
      if (entry.end > entry.begin) sink = opened->data(entry)[entry.end - entry.begin - 1];
      (void)sink;
    }
  } catch (const shoal::error& e) {
    // A plain file is refused as not encrypted; anything else as malformed or unauthentic.
    SHOAL_FUZZ_CHECK(e.code() == shoal::errc::invalid_argument);
  }
  return 0;
}
