#include "shoal/runtime/tokenizer.hpp"

#include "shoal/base/error.hpp"
#include "shoal/runtime/detokenizer.hpp"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <bit>
#include <cstdint>
#include <fstream>
#include <mutex>
#include <sstream>
#include <unordered_map>

namespace shoal::runtime {
namespace {

// GPT-2's byte-to-character table: printable bytes stand for themselves, the others are
// shifted to U+0100 and up so that every token is printable text in tokenizer.json.
std::array<char32_t, 256> byte_to_char_table() {
  std::array<char32_t, 256> table{};
  char32_t next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    table[static_cast<std::size_t>(b)] = printable ? static_cast<char32_t>(b) : next++;
  }
  return table;
}

// Decodes one code point of valid UTF-8 (the JSON parser guarantees validity).
char32_t next_code_point(std::string_view s, std::size_t& i) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  int extra = b0 < 0x80 ? 0 : b0 < 0xE0 ? 1 : b0 < 0xF0 ? 2 : 3;
  char32_t cp = extra == 0 ? b0 : extra == 1 ? (b0 & 0x1F) : extra == 2 ? (b0 & 0x0F) : (b0 & 0x07);
  ++i;
  while (extra-- > 0 && i < s.size()) cp = (cp << 6) | (static_cast<unsigned char>(s[i++]) & 0x3F);
  return cp;
}

// A token string of tokenizer.json turned into raw bytes the way the ByteLevel decoder does:
// when every character is in the byte table, the bytes it stands for; otherwise (added tokens
// such as "<｜User｜>") the string's own UTF-8 bytes.
std::string byte_level_to_bytes(std::string_view token, const std::unordered_map<char32_t, unsigned char>& char_to_byte) {
  std::string out;
  out.reserve(token.size());
  for (std::size_t i = 0; i < token.size();) {
    const auto it = char_to_byte.find(next_code_point(token, i));
    if (it == char_to_byte.end()) return std::string(token);
    out.push_back(static_cast<char>(it->second));
  }
  return out;
}

struct pcre2_code_deleter {
  void operator()(pcre2_code* code) const { pcre2_code_free(code); }
};
struct pcre2_match_data_deleter {
  void operator()(pcre2_match_data* data) const { pcre2_match_data_free(data); }
};
using pcre2_code_ptr = std::unique_ptr<pcre2_code, pcre2_code_deleter>;
using pcre2_match_data_ptr = std::unique_ptr<pcre2_match_data, pcre2_match_data_deleter>;

std::string pcre2_message(int code) {
  std::array<PCRE2_UCHAR, 256> buffer{};
  pcre2_get_error_message(code, buffer.data(), buffer.size());
  return reinterpret_cast<const char*>(buffer.data());
}

// Merge table: (left id, right id) -> (rank, merged id). The lookup is the inner loop of BPE
// and mostly a cache miss, so slots are one packed 64-bit word (pair and rank; the merged id
// comes from a rank-indexed array only when a merge happens) in open addressing: half the
// memory of a struct slot and several times less pointer chasing than std::unordered_map.
class merge_table {
 public:
  struct entry {
    std::int32_t rank;
    token_id merged;
  };

  // `ids` and `ranks` bound the values that will be inserted.
  void reserve(std::size_t n, std::uint64_t ids, std::uint64_t ranks) {
    id_bits_ = std::bit_width(ids);
    rank_bits_ = std::bit_width(ranks);
    if (2 * id_bits_ + rank_bits_ > 63)
      shoal::fail(errc::invalid_argument, "vocabulary ({} ids) and merges ({}) too large for the merge table", ids, ranks);
    std::size_t size = 16;
    while (size < n * 2) size *= 2;
    slots_.assign(size, kEmpty);
    mask_ = size - 1;
    merged_.assign(n, 0);
  }
  // Keeps the first (best-ranked) merge of a pair, as Hugging Face does for duplicates.
  void insert(token_id a, token_id b, std::int32_t rank, token_id merged) {
    const auto k = key(a, b);
    for (std::size_t i = hash(k);; i = (i + 1) & mask_) {
      if (slots_[i] == kEmpty) {
        slots_[i] = (k << rank_bits_) | static_cast<std::uint64_t>(rank);
        merged_[static_cast<std::size_t>(rank)] = merged;
        return;
      }
      if ((slots_[i] >> rank_bits_) == k) return;
    }
  }
  std::optional<entry> find(token_id a, token_id b) const {
    const auto k = key(a, b);
    for (std::size_t i = hash(k);; i = (i + 1) & mask_) {
      const std::uint64_t slot = slots_[i];
      if (slot == kEmpty) return std::nullopt;
      if ((slot >> rank_bits_) == k) {
        const auto rank = static_cast<std::int32_t>(slot & ((std::uint64_t{1} << rank_bits_) - 1));
        return entry{rank, merged_[static_cast<std::size_t>(rank)]};
      }
    }
  }

 private:
  static constexpr std::uint64_t kEmpty = ~std::uint64_t{0};
  std::uint64_t key(token_id a, token_id b) const {
    return (static_cast<std::uint64_t>(static_cast<std::uint32_t>(a)) << id_bits_) | static_cast<std::uint32_t>(b);
  }
  std::size_t hash(std::uint64_t k) const { return static_cast<std::size_t>((k * 0x9E3779B97F4A7C15ull) >> 24) & mask_; }
  std::vector<std::uint64_t> slots_;
  std::vector<token_id> merged_;  // rank -> merged id
  std::size_t mask_ = 0;
  int id_bits_ = 0, rank_bits_ = 0;
};

// Byte trie of the added tokens' contents for leftmost-longest matching in raw text.
struct added_trie {
  struct node {
    std::vector<std::pair<unsigned char, std::int32_t>> children;  // sorted by byte
    token_id token = -1;
  };
  std::vector<node> nodes{1};
  std::array<bool, 256> first_byte{};

  void insert(std::string_view s, token_id id) {
    if (s.empty()) return;
    first_byte[static_cast<unsigned char>(s[0])] = true;
    std::int32_t at = 0;
    for (const char c : s) {
      const auto b = static_cast<unsigned char>(c);
      auto& kids = nodes[static_cast<std::size_t>(at)].children;
      auto it = std::lower_bound(kids.begin(), kids.end(), b, [](const auto& kid, unsigned char v) { return kid.first < v; });
      if (it != kids.end() && it->first == b) {
        at = it->second;
      } else {
        const auto fresh = static_cast<std::int32_t>(nodes.size());
        kids.insert(it, {b, fresh});
        nodes.emplace_back();
        at = fresh;
      }
    }
    nodes[static_cast<std::size_t>(at)].token = id;
  }

  // Longest added token starting at `text[pos]`: (id, length) or (-1, 0).
  std::pair<token_id, std::size_t> match(std::string_view text, std::size_t pos) const {
    std::pair<token_id, std::size_t> best{-1, 0};
    std::int32_t at = 0;
    for (std::size_t i = pos; i < text.size(); ++i) {
      const auto b = static_cast<unsigned char>(text[i]);
      const auto& kids = nodes[static_cast<std::size_t>(at)].children;
      auto it = std::lower_bound(kids.begin(), kids.end(), b, [](const auto& kid, unsigned char v) { return kid.first < v; });
      if (it == kids.end() || it->first != b) break;
      at = it->second;
      if (nodes[static_cast<std::size_t>(at)].token >= 0) best = {nodes[static_cast<std::size_t>(at)].token, i + 1 - pos};
    }
    return best;
  }
};

std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) shoal::fail(errc::not_found, "cannot open {}", path.string());
  std::ostringstream buffer;
  buffer << in.rdbuf();
  return std::move(buffer).str();
}

// tokenizer_config.json writes special tokens either as a string or as an AddedToken object.
std::string token_text(const nlohmann::json& value) {
  if (value.is_string()) return value.get<std::string>();
  if (value.is_object() && value.contains("content") && value["content"].is_string())
    return value["content"].get<std::string>();
  return {};
}

}  // namespace

// Lets the piece cache be probed with a string_view, without building a std::string per piece.
struct string_hash {
  using is_transparent = void;
  std::size_t operator()(std::string_view s) const noexcept { return std::hash<std::string_view>{}(s); }
};

struct tokenizer::impl {
  std::vector<std::string> bytes;  // id -> raw bytes
  std::vector<char> special;       // id -> special added token
  std::unordered_map<std::string, token_id> bytes_to_id;
  std::array<token_id, 256> byte_id{};
  merge_table merges;
  std::vector<added_token> added;
  added_trie trie;
  std::vector<pcre2_code_ptr> splits;  // applied in order, each with "Isolated" behaviour
  std::string bos, eos, chat_template;
  bool add_bos = false;

  static constexpr std::size_t kCacheLimit = 1 << 16;
  static constexpr std::size_t kShortPiece = 96;  // bytes; longer pieces use the heap version
  static constexpr std::size_t kCachedPiece = 24;  // bytes; longer pieces are not cached
  mutable std::mutex cache_mutex;
  mutable std::unordered_map<std::string, std::vector<token_id>, string_hash, std::equal_to<>> cache;

  void bpe(std::string_view piece, std::vector<token_id>& out) const;
  void bpe_short(std::string_view piece, std::vector<token_id>& out) const;
  void bpe_cached(std::string_view piece, std::vector<token_id>& out) const;
  void split(std::size_t level, std::string_view text, pcre2_match_data* md, std::vector<token_id>& out) const;
};

// The same merge order as `bpe` (best rank first, leftmost on ties) with the ranks of
// adjacent pairs kept in a flat array: for short pieces a linear scan for the minimum beats a
// heap, and the scratch buffers are reused instead of allocated per piece.
void tokenizer::impl::bpe_short(std::string_view piece, std::vector<token_id>& out) const {
  constexpr std::int32_t kNone = INT32_MAX;
  thread_local std::vector<token_id> ids, merged;
  thread_local std::vector<std::int32_t> ranks;
  ids.resize(piece.size());
  for (std::size_t i = 0; i < piece.size(); ++i) ids[i] = byte_id[static_cast<unsigned char>(piece[i])];
  ranks.resize(piece.size() - 1);
  merged.resize(piece.size() - 1);
  auto lookup = [&](std::size_t i) {
    if (const auto m = merges.find(ids[i], ids[i + 1])) {
      ranks[i] = m->rank;
      merged[i] = m->merged;
    } else {
      ranks[i] = kNone;
    }
  };
  for (std::size_t i = 0; i + 1 < ids.size(); ++i) lookup(i);
  while (!ranks.empty()) {
    const auto best = static_cast<std::size_t>(std::min_element(ranks.begin(), ranks.end()) - ranks.begin());
    if (ranks[best] == kNone) break;
    ids[best] = merged[best];
    ids.erase(ids.begin() + static_cast<std::ptrdiff_t>(best) + 1);
    ranks.erase(ranks.begin() + static_cast<std::ptrdiff_t>(best));
    merged.erase(merged.begin() + static_cast<std::ptrdiff_t>(best));
    if (best > 0) lookup(best - 1);
    if (best < ranks.size()) lookup(best);
  }
  out.insert(out.end(), ids.begin(), ids.end());
}

void tokenizer::impl::bpe(std::string_view piece, std::vector<token_id>& out) const {
  struct symbol {
    token_id id;
    std::int32_t prev, next;
    bool alive;
  };
  std::vector<symbol> symbols(piece.size());
  for (std::size_t i = 0; i < piece.size(); ++i)
    symbols[i] = {byte_id[static_cast<unsigned char>(piece[i])], static_cast<std::int32_t>(i) - 1,
                  i + 1 < piece.size() ? static_cast<std::int32_t>(i) + 1 : -1, true};
  // Candidate merges ordered by rank, then position: the leftmost occurrence of the best
  // ranked pair merges first, exactly as Hugging Face's BPE word merge does.
  struct candidate {
    std::int32_t rank, pos;
    token_id merged;
    bool operator>(const candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::vector<candidate> heap;
  auto consider = [&](std::int32_t pos) {
    if (pos < 0) return;
    const auto next = symbols[static_cast<std::size_t>(pos)].next;
    if (next < 0) return;
    if (const auto m = merges.find(symbols[static_cast<std::size_t>(pos)].id, symbols[static_cast<std::size_t>(next)].id)) {
      heap.push_back({m->rank, pos, m->merged});
      std::push_heap(heap.begin(), heap.end(), std::greater<>{});
    }
  };
  for (std::size_t i = 0; i + 1 < piece.size(); ++i) consider(static_cast<std::int32_t>(i));
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), std::greater<>{});
    const candidate top = heap.back();
    heap.pop_back();
    auto& left = symbols[static_cast<std::size_t>(top.pos)];
    if (!left.alive || left.next < 0) continue;
    auto& right = symbols[static_cast<std::size_t>(left.next)];
    const auto m = merges.find(left.id, right.id);
    if (!m || m->merged != top.merged) continue;  // stale: a neighbour merged first
    left.id = top.merged;
    right.alive = false;
    left.next = right.next;
    if (right.next >= 0) symbols[static_cast<std::size_t>(right.next)].prev = top.pos;
    consider(left.prev);
    consider(top.pos);
  }
  for (std::int32_t i = 0; i >= 0; i = symbols[static_cast<std::size_t>(i)].next) out.push_back(symbols[static_cast<std::size_t>(i)].id);
}

void tokenizer::impl::bpe_cached(std::string_view piece, std::vector<token_id>& out) const {
  if (piece.size() == 1) {
    out.push_back(byte_id[static_cast<unsigned char>(piece[0])]);
    return;
  }
  // Long pieces (runs of CJK text, long identifiers) rarely repeat: caching them only churns
  // the cache and the allocator.
  if (piece.size() > kCachedPiece) {
    if (piece.size() <= kShortPiece)
      bpe_short(piece, out);
    else
      bpe(piece, out);
    return;
  }
  {
    std::lock_guard lock(cache_mutex);
    if (const auto it = cache.find(piece); it != cache.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  const auto first = out.size();
  if (piece.size() <= kShortPiece)
    bpe_short(piece, out);
  else
    bpe(piece, out);
  std::vector<token_id> ids(out.begin() + static_cast<std::ptrdiff_t>(first), out.end());
  std::lock_guard lock(cache_mutex);
  // TODO(perf): an LRU would keep hot entries across the reset; rare enough not to matter yet.
  if (cache.size() >= kCacheLimit) cache.clear();
  cache.emplace(std::string(piece), std::move(ids));
}

void tokenizer::impl::split(std::size_t level, std::string_view text, pcre2_match_data* md, std::vector<token_id>& out) const {
  if (text.empty()) return;
  if (level == splits.size()) {
    bpe_cached(text, out);
    return;
  }
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(md);
  std::size_t gap_start = 0;
  std::size_t at = 0;
  while (at < text.size()) {
    const int rc = pcre2_jit_match(splits[level].get(), subject, text.size(), at, PCRE2_NO_UTF_CHECK, md, nullptr);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) shoal::fail(errc::internal, "tokenizer regex failed: {}", pcre2_message(rc));
    const std::size_t begin = ovector[0], end = ovector[1];
    if (end == begin) {
      // An empty match isolates nothing; step over one whole character.
      at = begin + 1;
      while (at < text.size() && (static_cast<unsigned char>(text[at]) & 0xC0) == 0x80) ++at;
      continue;
    }
    split(level + 1, text.substr(gap_start, begin - gap_start), md, out);
    split(level + 1, text.substr(begin, end - begin), md, out);
    gap_start = at = end;
  }
  split(level + 1, text.substr(gap_start), md, out);
}

tokenizer::tokenizer(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
tokenizer::tokenizer(tokenizer&&) noexcept = default;
tokenizer& tokenizer::operator=(tokenizer&&) noexcept = default;
tokenizer::~tokenizer() = default;

tokenizer tokenizer::load(const std::filesystem::path& dir) {
  const auto json_path = dir / "tokenizer.json";
  if (!std::filesystem::exists(json_path))
    shoal::fail(errc::not_found, "{} not found: the model directory has no tokenizer (text needs tokenizer.json "
                "and tokenizer_config.json from the checkpoint)", json_path.string());
  const auto config_path = dir / "tokenizer_config.json";
  std::string config_text;
  if (std::filesystem::exists(config_path)) config_text = read_file(config_path);
  return from_json(read_file(json_path), config_text, json_path.string());
}

tokenizer tokenizer::from_json(std::string_view tokenizer_json, std::string_view tokenizer_config_json, std::string_view origin) {
  auto p = std::make_unique<impl>();
  nlohmann::json root;
  try {
    root = nlohmann::json::parse(tokenizer_json);
  } catch (const nlohmann::json::exception& e) {
    shoal::fail(errc::invalid_argument, "{}: not valid JSON: {}", origin, e.what());
  }
  auto bad = [&](std::string_view what) { shoal::fail(errc::invalid_argument, "{}: {}", origin, what); };
  try {
    const auto& model = root.at("model");
    if (model.value("type", "") != "BPE") bad("only BPE models are supported (model.type)");
    if (model.value("byte_fallback", false)) bad("byte_fallback BPE is not supported");
    if (model.contains("ignore_merges") && model["ignore_merges"].is_boolean() && model["ignore_merges"].get<bool>())
      bad("ignore_merges BPE is not supported");
    if (root.contains("normalizer") && !root["normalizer"].is_null()) {
      const auto& n = root["normalizer"];
      if (!(n.value("type", "") == "Sequence" && n.value("normalizers", nlohmann::json::array()).empty()))
        bad("normalizers are not supported (only an empty Sequence)");
    }

    const auto table = byte_to_char_table();
    std::unordered_map<char32_t, unsigned char> char_to_byte;
    for (int b = 0; b < 256; ++b) char_to_byte[table[static_cast<std::size_t>(b)]] = static_cast<unsigned char>(b);

    std::unordered_map<std::string, token_id> vocab;  // tokenizer.json spelling -> id
    token_id max_id = -1;
    for (const auto& [text, id_json] : model.at("vocab").items()) {
      const auto id = id_json.get<token_id>();
      if (id < 0) bad("negative token id in model.vocab");
      vocab.emplace(text, id);
      max_id = std::max(max_id, id);
    }
    for (const auto& a : root.at("added_tokens")) max_id = std::max(max_id, a.at("id").get<token_id>());
    p->bytes.resize(static_cast<std::size_t>(max_id) + 1);
    p->special.assign(static_cast<std::size_t>(max_id) + 1, 0);
    for (const auto& [text, id] : vocab) {
      p->bytes[static_cast<std::size_t>(id)] = byte_level_to_bytes(text, char_to_byte);
      p->bytes_to_id.emplace(p->bytes[static_cast<std::size_t>(id)], id);
    }
    for (int b = 0; b < 256; ++b) {
      std::string ch;
      const char32_t cp = table[static_cast<std::size_t>(b)];
      if (cp < 0x80) {
        ch.push_back(static_cast<char>(cp));
      } else {  // all table entries are below U+0800
        ch.push_back(static_cast<char>(0xC0 | (cp >> 6)));
        ch.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
      }
      const auto it = vocab.find(ch);
      if (it == vocab.end()) bad(fmt::format("byte 0x{:02x} has no token; byte-level BPE needs all 256", b));
      p->byte_id[static_cast<std::size_t>(b)] = it->second;
    }

    const auto& merges = model.at("merges");
    p->merges.reserve(merges.size(), static_cast<std::uint64_t>(max_id), merges.size());
    std::int32_t rank = 0;
    for (const auto& m : merges) {
      std::string left, right;
      if (m.is_string()) {
        const auto s = m.get<std::string>();
        const auto space = s.find(' ');
        if (space == std::string::npos) bad(fmt::format("merge '{}' has no space", s));
        left = s.substr(0, space);
        right = s.substr(space + 1);
      } else if (m.is_array() && m.size() == 2) {
        left = m[0].get<std::string>();
        right = m[1].get<std::string>();
      } else {
        bad("a merge is neither \"a b\" nor [\"a\", \"b\"]");
      }
      const auto l = vocab.find(left), r = vocab.find(right), merged = vocab.find(left + right);
      if (l == vocab.end() || r == vocab.end() || merged == vocab.end())
        bad(fmt::format("merge '{} {}' refers to a token missing from the vocabulary", left, right));
      p->merges.insert(l->second, r->second, rank++, merged->second);
    }

    for (const auto& a : root.at("added_tokens")) {
      if (a.value("single_word", false) || a.value("lstrip", false) || a.value("rstrip", false))
        bad("added tokens with single_word/lstrip/rstrip are not supported");
      added_token t{a.at("id").get<token_id>(), a.at("content").get<std::string>(), a.value("special", false)};
      // The normalizer is empty, so "normalized" and raw matching are the same; the ByteLevel
      // decoder still maps an added token through the byte table when it can.
      p->bytes[static_cast<std::size_t>(t.id)] = byte_level_to_bytes(t.content, char_to_byte);
      p->special[static_cast<std::size_t>(t.id)] = t.special ? 1 : 0;
      p->trie.insert(t.content, t.id);
      p->bytes_to_id[t.content] = t.id;
      p->added.push_back(std::move(t));
    }
    std::sort(p->added.begin(), p->added.end(), [](const auto& x, const auto& y) { return x.id < y.id; });

    // Pre-tokenizer: Split stages (Isolated) followed by a ByteLevel that only maps bytes.
    const auto& pre = root.at("pre_tokenizer");
    std::vector<nlohmann::json> stages;
    if (pre.value("type", "") == "Sequence") {
      for (const auto& s : pre.at("pretokenizers")) stages.push_back(s);
    } else {
      stages.push_back(pre);
    }
    for (const auto& s : stages) {
      const auto type = s.value("type", "");
      if (type == "ByteLevel") {
        if (s.value("use_regex", true) || s.value("add_prefix_space", false))
          bad("ByteLevel pre-tokenizer with use_regex or add_prefix_space is not supported");
        continue;
      }
      if (type != "Split") bad(fmt::format("pre-tokenizer '{}' is not supported", type));
      if (s.value("behavior", "") != "Isolated" || s.value("invert", false))
        bad("only Split pre-tokenizers with behavior Isolated and invert false are supported");
      const auto& pattern = s.at("pattern");
      std::string source;
      std::uint32_t flags = PCRE2_UTF | PCRE2_UCP;
      if (pattern.contains("Regex")) {
        source = pattern["Regex"].get<std::string>();
      } else {
        source = pattern.at("String").get<std::string>();
        flags |= PCRE2_LITERAL;
      }
      int error_code = 0;
      PCRE2_SIZE error_offset = 0;
      pcre2_code_ptr code(pcre2_compile(reinterpret_cast<PCRE2_SPTR>(source.data()), source.size(), flags, &error_code,
                                        &error_offset, nullptr));
      if (!code) bad(fmt::format("pre-tokenizer regex does not compile at offset {}: {}", error_offset, pcre2_message(error_code)));
      if (const int rc = pcre2_jit_compile(code.get(), PCRE2_JIT_COMPLETE); rc != 0)
        shoal::fail(errc::failed_precondition, "PCRE2 JIT is unavailable ({}); the tokenizer needs it for speed",
                    pcre2_message(rc));
      p->splits.push_back(std::move(code));
    }
    if (root.contains("decoder") && !root["decoder"].is_null() && root["decoder"].value("type", "") != "ByteLevel")
      bad("only the ByteLevel decoder is supported");
  } catch (const nlohmann::json::exception& e) {
    shoal::fail(errc::invalid_argument, "{}: unexpected structure: {}", origin, e.what());
  }

  if (!tokenizer_config_json.empty()) {
    try {
      const auto config = nlohmann::json::parse(tokenizer_config_json);
      if (config.contains("bos_token")) p->bos = token_text(config["bos_token"]);
      if (config.contains("eos_token")) p->eos = token_text(config["eos_token"]);
      p->add_bos = config.value("add_bos_token", false);
      if (config.contains("chat_template")) {
        const auto& t = config["chat_template"];
        if (t.is_string()) {
          p->chat_template = t.get<std::string>();
        } else if (t.is_array()) {  // named templates: use "default"
          for (const auto& named : t)
            if (named.value("name", "") == "default") p->chat_template = named.value("template", "");
        }
      }
    } catch (const nlohmann::json::exception& e) {
      shoal::fail(errc::invalid_argument, "tokenizer_config.json beside {}: {}", origin, e.what());
    }
  }
  return tokenizer(std::move(p));
}

void tokenizer::encode_into(std::string_view text, std::vector<token_id>& out) const {
  if (!utf8_valid(text)) shoal::fail(errc::invalid_argument, "text to encode is not valid UTF-8");
  pcre2_match_data_ptr md(pcre2_match_data_create(1, nullptr));
  if (!md) throw std::bad_alloc();
  const auto& p = *impl_;
  std::size_t span_start = 0;
  for (std::size_t i = 0; i < text.size(); ++i) {
    if (!p.trie.first_byte[static_cast<unsigned char>(text[i])]) continue;
    const auto [id, length] = p.trie.match(text, i);
    if (id < 0) continue;
    p.split(0, text.substr(span_start, i - span_start), md.get(), out);
    out.push_back(id);
    i += length - 1;
    span_start = i + 1;
  }
  p.split(0, text.substr(span_start), md.get(), out);
}

std::vector<token_id> tokenizer::encode(std::string_view text) const {
  std::vector<token_id> out;
  out.reserve(text.size() / 3 + 4);
  encode_into(text, out);
  return out;
}

std::string tokenizer::decode(std::span<const token_id> ids, bool skip_special) const {
  std::string bytes;
  for (const auto id : ids) {
    if (skip_special && is_special(id)) continue;
    bytes += token_bytes(id);
  }
  return utf8_lossy(bytes);
}

std::string_view tokenizer::token_bytes(token_id id) const {
  if (id < 0 || static_cast<std::size_t>(id) >= impl_->bytes.size()) return {};
  return impl_->bytes[static_cast<std::size_t>(id)];
}

bool tokenizer::is_special(token_id id) const {
  return id >= 0 && static_cast<std::size_t>(id) < impl_->special.size() && impl_->special[static_cast<std::size_t>(id)] != 0;
}

std::optional<token_id> tokenizer::find_token(std::string_view text) const {
  const auto it = impl_->bytes_to_id.find(std::string(text));
  if (it == impl_->bytes_to_id.end()) return std::nullopt;
  return it->second;
}

std::int64_t tokenizer::id_limit() const { return static_cast<std::int64_t>(impl_->bytes.size()); }
std::span<const added_token> tokenizer::added_tokens() const { return impl_->added; }
const std::string& tokenizer::bos_token() const { return impl_->bos; }
std::optional<token_id> tokenizer::bos_id() const { return impl_->bos.empty() ? std::nullopt : find_token(impl_->bos); }
const std::string& tokenizer::eos_token() const { return impl_->eos; }
std::optional<token_id> tokenizer::eos_id() const { return impl_->eos.empty() ? std::nullopt : find_token(impl_->eos); }
bool tokenizer::add_bos_token() const { return impl_->add_bos; }
const std::string& tokenizer::chat_template_source() const { return impl_->chat_template; }

}  // namespace shoal::runtime
