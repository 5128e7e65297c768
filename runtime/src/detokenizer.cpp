#include "shoal/runtime/detokenizer.hpp"

namespace shoal::runtime {
namespace {

enum class scan_kind { valid, invalid, incomplete };

struct scan_result {
  scan_kind kind;
  std::size_t length;  // bytes of the character, of the invalid subpart, or available so far
};

// Classifies the sequence starting at p[0] following the Unicode table of well-formed UTF-8
// byte sequences (3.9, table 3-7): the second byte's range depends on the first.
scan_result scan(const unsigned char* p, std::size_t n) {
  const unsigned char b0 = p[0];
  if (b0 < 0x80) return {scan_kind::valid, 1};
  std::size_t need = 0;
  unsigned char lo = 0x80, hi = 0xBF;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    need = 1;
  } else if (b0 == 0xE0) {
    need = 2, lo = 0xA0;
  } else if ((b0 >= 0xE1 && b0 <= 0xEC) || b0 == 0xEE || b0 == 0xEF) {
    need = 2;
  } else if (b0 == 0xED) {
    need = 2, hi = 0x9F;
  } else if (b0 == 0xF0) {
    need = 3, lo = 0x90;
  } else if (b0 >= 0xF1 && b0 <= 0xF3) {
    need = 3;
  } else if (b0 == 0xF4) {
    need = 3, hi = 0x8F;
  } else {
    return {scan_kind::invalid, 1};
  }
  for (std::size_t i = 1; i <= need; ++i) {
    if (i >= n) return {scan_kind::incomplete, i};
    const unsigned char b = p[i];
    const bool ok = i == 1 ? (b >= lo && b <= hi) : (b >= 0x80 && b <= 0xBF);
    if (!ok) return {scan_kind::invalid, i};
  }
  return {scan_kind::valid, need + 1};
}

constexpr std::string_view kReplacement = "\xEF\xBF\xBD";

}  // namespace

std::string utf8_lossy(std::string_view bytes) {
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  std::string out;
  out.reserve(bytes.size());
  std::size_t i = 0, run = 0;  // [run, i) is valid and not yet copied
  while (i < bytes.size()) {
    if (p[i] < 0x80) {
      ++i;
      continue;
    }
    const auto r = scan(p + i, bytes.size() - i);
    if (r.kind == scan_kind::valid) {
      i += r.length;
      continue;
    }
    out.append(bytes.substr(run, i - run));
    out.append(kReplacement);
    i += r.length;
    run = i;
  }
  out.append(bytes.substr(run));
  return out;
}

bool utf8_valid(std::string_view bytes) {
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  for (std::size_t i = 0; i < bytes.size();) {
    if (p[i] < 0x80) {
      ++i;
      continue;
    }
    const auto r = scan(p + i, bytes.size() - i);
    if (r.kind != scan_kind::valid) return false;
    i += r.length;
  }
  return true;
}

std::size_t utf8_stable_prefix(std::string_view bytes) {
  // Only the last (at most 3) bytes can be the start of an incomplete character.
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  const std::size_t n = bytes.size();
  for (std::size_t back = 1; back <= 3 && back <= n; ++back) {
    const std::size_t start = n - back;
    if ((p[start] & 0xC0) == 0x80) continue;  // a continuation byte: look further back
    if (p[start] < 0x80) return n;
    const auto r = scan(p + start, back);
    return r.kind == scan_kind::incomplete ? start : n;
  }
  return n;
}

std::string stream_detokenizer::push(token_id id) {
  if (skip_special_ && tok_->is_special(id)) return {};
  pending_ += tok_->token_bytes(id);
  const std::size_t stable = utf8_stable_prefix(pending_);
  std::string text = utf8_lossy(std::string_view(pending_).substr(0, stable));
  pending_.erase(0, stable);
  return text;
}

std::string stream_detokenizer::finish() {
  std::string text = utf8_lossy(pending_);
  pending_.clear();
  return text;
}

}  // namespace shoal::runtime
