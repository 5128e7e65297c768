#pragma once
/// \file
/// Lower-case hexadecimal of bytes (digests, salts, keys).

#include <cstddef>
#include <string>

namespace shoal {

/// `n` bytes as 2n lower-case hex digits.
inline std::string to_hex(const unsigned char* data, std::size_t n) {
  static constexpr char digits[] = "0123456789abcdef";
  std::string out(2 * n, '0');
  for (std::size_t i = 0; i < n; ++i) {
    out[2 * i] = digits[data[i] >> 4];
    out[2 * i + 1] = digits[data[i] & 15];
  }
  return out;
}

}  // namespace shoal
