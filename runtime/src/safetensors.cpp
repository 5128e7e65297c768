#include "shoal/runtime/safetensors.hpp"

#include "shoal/base/error.hpp"

#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>

namespace shoal::runtime {
namespace {

using json = nlohmann::json;

// Refuse absurd headers before allocating for them (real ones are well under 10 MB).
constexpr std::uint64_t kMaxHeaderBytes = 100ull << 20;

std::optional<kernels::dtype> compute_dtype(std::string_view name) {
  if (name == "F32") return kernels::dtype::f32;
  if (name == "BF16") return kernels::dtype::bf16;
  if (name == "F16") return kernels::dtype::f16;
  if (name == "F8_E4M3") return kernels::dtype::f8_e4m3;
  return std::nullopt;
}

std::uint64_t storage_size(std::string_view name) {
  static const std::map<std::string_view, std::uint64_t> sizes = {
      {"BOOL", 1}, {"U8", 1}, {"I8", 1}, {"F8_E4M3", 1}, {"F8_E5M2", 1}, {"I16", 2}, {"U16", 2},
      {"F16", 2}, {"BF16", 2}, {"I32", 4}, {"U32", 4}, {"F32", 4}, {"I64", 8}, {"U64", 8},
      {"F64", 8}};
  auto it = sizes.find(name);
  return it == sizes.end() ? 0 : it->second;
}

}  // namespace

std::uint64_t tensor_entry::elements() const noexcept {
  std::uint64_t count = 1;
  for (auto d : shape) count *= static_cast<std::uint64_t>(d);
  return count;
}

std::vector<tensor_entry> parse_safetensors_header(const std::byte* data, std::size_t size,
                                                   std::string_view source) {
  const auto bad = [&](std::string_view what) {
    shoal::fail(errc::invalid_argument, "{}: corrupt safetensors header: {}", source, what);
  };
  if (size < 8) bad(fmt::format("file is {} bytes, shorter than the 8-byte header length", size));
  std::uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<std::uint8_t>(data[i]);
  if (header_len > kMaxHeaderBytes)
    bad(fmt::format("header length {} exceeds the {}-byte limit", header_len, kMaxHeaderBytes));
  if (header_len > size - 8)
    bad(fmt::format("header length {} runs past the end of the file ({} bytes): truncated?",
                    header_len, size));
  const std::uint64_t data_size = size - 8 - header_len;
  json header;
  try {
    header = json::parse(reinterpret_cast<const char*>(data) + 8,
                         reinterpret_cast<const char*>(data) + 8 + header_len);
  } catch (const json::exception& e) {
    bad(fmt::format("header is not valid JSON ({})", e.what()));
  }
  if (!header.is_object()) bad("header is not a JSON object");
  std::vector<tensor_entry> entries;
  for (const auto& item : header.items()) {
    const std::string& name = item.key();
    const json& value = item.value();
    if (name == "__metadata__") continue;
    const auto bad_tensor = [&](std::string_view what) {
      shoal::fail(errc::invalid_argument, "{}: tensor '{}': {}", source, name, what);
    };
    if (!value.is_object()) bad_tensor("entry is not an object");
    tensor_entry entry;
    entry.name = name;
    const auto dtype_it = value.find("dtype");
    if (dtype_it == value.end() || !dtype_it->is_string()) bad_tensor("missing string 'dtype'");
    entry.dtype_name = dtype_it->get<std::string>();
    const std::uint64_t element_size = storage_size(entry.dtype_name);
    if (element_size == 0) bad_tensor(fmt::format("unknown dtype '{}'", entry.dtype_name));
    entry.type = compute_dtype(entry.dtype_name);
    const auto shape_it = value.find("shape");
    if (shape_it == value.end() || !shape_it->is_array()) bad_tensor("missing array 'shape'");
    std::uint64_t elements = 1;
    for (const auto& dim : *shape_it) {
      if (!dim.is_number_unsigned()) bad_tensor(fmt::format("shape {} has a non-integer or negative dimension", shape_it->dump()));
      const std::uint64_t d = dim.get<std::uint64_t>();
      if (d != 0 && elements > std::numeric_limits<std::uint64_t>::max() / element_size / d)
        bad_tensor(fmt::format("shape {} overflows", shape_it->dump()));
      elements *= d;
      entry.shape.push_back(static_cast<std::int64_t>(d));
    }
    const auto offsets_it = value.find("data_offsets");
    if (offsets_it == value.end() || !offsets_it->is_array() || offsets_it->size() != 2 ||
        !(*offsets_it)[0].is_number_unsigned() || !(*offsets_it)[1].is_number_unsigned())
      bad_tensor("missing 'data_offsets' [begin, end]");
    entry.begin = (*offsets_it)[0].get<std::uint64_t>();
    entry.end = (*offsets_it)[1].get<std::uint64_t>();
    if (entry.end < entry.begin) bad_tensor(fmt::format("data_offsets [{}, {}] are reversed", entry.begin, entry.end));
    if (entry.end > data_size)
      bad_tensor(fmt::format("data_offsets [{}, {}] run past the data area ({} bytes): truncated file?",
                             entry.begin, entry.end, data_size));
    if (entry.end - entry.begin != elements * element_size)
      bad_tensor(fmt::format("{} bytes at data_offsets [{}, {}] but dtype {} with shape {} needs {}",
                             entry.end - entry.begin, entry.begin, entry.end, entry.dtype_name,
                             shape_it->dump(), elements * element_size));
    entries.push_back(std::move(entry));
  }
  std::vector<const tensor_entry*> by_offset;
  for (const auto& e : entries) by_offset.push_back(&e);
  std::sort(by_offset.begin(), by_offset.end(),
            [](const tensor_entry* a, const tensor_entry* b) { return a->begin < b->begin; });
  for (std::size_t i = 1; i < by_offset.size(); ++i)
    if (by_offset[i]->begin < by_offset[i - 1]->end && by_offset[i]->end > by_offset[i]->begin)
      shoal::fail(errc::invalid_argument, "{}: tensors '{}' and '{}' overlap", source,
                  by_offset[i - 1]->name, by_offset[i]->name);
  return entries;
}

std::unique_ptr<safetensors_file> safetensors_file::open(const std::filesystem::path& path, const weights_key* key) {
  const bool encrypted = is_encrypted_weights_file(path);
  if (encrypted && !key)
    shoal::fail(errc::invalid_argument,
                "{}: the weights are encrypted (shoal encrypt-weights); give their key with --key-file FILE or "
                "SHOAL_WEIGHTS_KEY_FILE",
                path.string());
  if (!encrypted && key)
    shoal::fail(errc::invalid_argument,
                "{}: not encrypted, but a weights key was given: every shard of an encrypted checkpoint must be "
                "encrypted (a plain file may have replaced one)",
                path.string());
  if (encrypted) {
    std::unique_ptr<safetensors_file> file(new safetensors_file());
    file->path_ = path;
    file->reader_ = std::make_unique<encrypted_weights_reader>(path, *key);
    const auto size = file->reader_->plain_size();
    if (size < 8)
      shoal::fail(errc::invalid_argument, "{}: corrupt safetensors file: only {} bytes", path.string(), size);
    // Pages cost memory only once a chunk is decrypted into them.
    void* memory = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (memory == MAP_FAILED)
      shoal::fail(errc::resource_exhausted, "{}: cannot reserve {} bytes to decrypt into: {}", path.string(), size,
                  std::strerror(errno));
    file->base_ = static_cast<const std::byte*>(memory);
    file->size_ = file->mapped_size_ = static_cast<std::size_t>(size);
    file->decrypted_.assign(file->reader_->chunks(), false);
    file->decrypt_range(0, 8);
    std::uint64_t header_len = 0;
    for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<std::uint8_t>(file->base_[i]);
    if (header_len > kMaxHeaderBytes || header_len > size - 8)
      shoal::fail(errc::invalid_argument, "{}: corrupt safetensors file: header length {} in a file of {} bytes",
                  path.string(), header_len, size);
    file->decrypt_range(0, 8 + header_len);
    file->index_header(path.string());
    return file;
  }
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) shoal::fail(errc::not_found, "{}: cannot open: {}", path.string(), std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    shoal::fail(errc::invalid_argument, "{}: cannot stat", path.string());
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    shoal::fail(errc::invalid_argument, "{}: not a regular file", path.string());
  }
  const auto size = static_cast<std::size_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    shoal::fail(errc::invalid_argument, "{}: corrupt safetensors file: only {} bytes", path.string(), size);
  }
  void* mapping = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (mapping == MAP_FAILED) shoal::fail(errc::unavailable, "{}: mmap failed: {}", path.string(), std::strerror(errno));
  std::unique_ptr<safetensors_file> file(new safetensors_file());
  file->path_ = path;
  file->base_ = static_cast<const std::byte*>(mapping);
  file->size_ = file->mapped_size_ = size;
  file->index_header(path.string());
  return file;
}

std::unique_ptr<safetensors_file> safetensors_file::from_memory(std::span<const std::byte> bytes,
                                                                const std::string& label) {
  if (bytes.size() < 8)
    shoal::fail(errc::invalid_argument, "{}: corrupt safetensors file: only {} bytes", label, bytes.size());
  std::unique_ptr<safetensors_file> file(new safetensors_file());
  file->path_ = label;
  void* memory = std::aligned_alloc(64, ((bytes.size() + 63) / 64) * 64);
  if (!memory) shoal::fail(errc::resource_exhausted, "{}: out of memory for {} bytes", label, bytes.size());
  file->owned_ = {static_cast<std::byte*>(memory), &std::free};
  std::memcpy(memory, bytes.data(), bytes.size());
  file->base_ = file->owned_.get();
  file->size_ = bytes.size();
  file->index_header(label);
  return file;
}

void safetensors_file::index_header(const std::string& source) {
  auto entries = parse_safetensors_header(base_, size_, source);
  std::uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<std::uint8_t>(base_[i]);
  data_ = base_ + 8 + header_len;
  for (auto& e : entries) {
    std::string name = e.name;
    entries_.emplace(std::move(name), std::move(e));
  }
}

safetensors_file::~safetensors_file() {
  if (base_ && !owned_) ::munmap(const_cast<std::byte*>(base_), mapped_size_);
}

const std::byte* safetensors_file::data(const tensor_entry& entry) const {
  if (reader_ && entry.end > entry.begin) {
    const auto offset = static_cast<std::uint64_t>(data_ - base_);
    decrypt_range(offset + entry.begin, offset + entry.end);
  }
  return data_ + entry.begin;
}

void safetensors_file::decrypt_range(std::uint64_t begin, std::uint64_t end) const {
  if (end <= begin) return;
  const std::uint64_t chunk = reader_->chunk_bytes();
  std::lock_guard lock(decrypt_mutex_);
  for (std::uint64_t c = begin / chunk; c <= (end - 1) / chunk; ++c) {
    if (decrypted_[c]) continue;
    reader_->decrypt_chunk(c, const_cast<std::byte*>(base_) + c * chunk);
    decrypted_[c] = true;
  }
}

checkpoint checkpoint::open(const std::filesystem::path& dir,
                            const std::function<void(std::size_t, std::size_t, const std::filesystem::path&)>& progress,
                            const weights_key* key) {
  checkpoint result;
  result.dir_ = dir;
  const auto index_path = dir / "model.safetensors.index.json";
  const auto single_path = dir / "model.safetensors";
  if (std::filesystem::exists(index_path)) {
    std::ifstream in(index_path);
    std::stringstream text;
    text << in.rdbuf();
    json index;
    try {
      index = json::parse(text.str());
    } catch (const json::exception& e) {
      shoal::fail(errc::invalid_argument, "{}: not valid JSON: {}", index_path.string(), e.what());
    }
    if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object())
      shoal::fail(errc::invalid_argument, "{}: missing object 'weight_map'", index_path.string());
    std::map<std::string, std::vector<std::string>> shard_tensors;
    for (const auto& [name, shard] : index["weight_map"].items()) {
      if (!shard.is_string())
        shoal::fail(errc::invalid_argument, "{}: weight_map['{}'] is not a file name", index_path.string(), name);
      const std::string shard_name = shard.get<std::string>();
      // A shard is a plain file name inside the directory: no path, no way up or out.
      if (shard_name.empty() || shard_name == "." || shard_name == ".." ||
          shard_name.find_first_of(std::string_view("/\\\0", 3)) != std::string::npos)
        shoal::fail(errc::invalid_argument, "{}: weight_map['{}'] = '{}' leaves the model directory",
                    index_path.string(), name, shard_name);
      shard_tensors[shard_name].push_back(name);
    }
    // Nor through a symbolic link: every shard must resolve to a file under the directory.
    std::error_code ec;
    const auto real_dir = std::filesystem::canonical(dir, ec);
    for (const auto& [shard_name, names] : shard_tensors) {
      const auto path = dir / shard_name;
      if (!std::filesystem::is_symlink(path)) continue;
      const auto target = std::filesystem::weakly_canonical(path, ec);
      const auto relative = target.lexically_relative(real_dir);
      if (ec || relative.empty() || *relative.begin() == "..")
        shoal::fail(errc::invalid_argument,
                    "{}: weight_map['{}'] = '{}' is a symbolic link to {}, outside the model directory",
                    index_path.string(), names.front(), shard_name, target.string());
    }
    std::size_t done = 0;
    for (const auto& [shard_name, names] : shard_tensors) {
      auto file = safetensors_file::open(dir / shard_name, key);
      for (const auto& name : names) {
        auto it = file->entries().find(name);
        if (it == file->entries().end())
          shoal::fail(errc::invalid_argument, "{}: tensor '{}' is listed in {} but missing from this shard",
                      file->path().string(), name, index_path.filename().string());
        result.tensors_[name] = tensor_ref{&it->second, file.get()};
      }
      for (const auto& [name, entry] : file->entries())
        if (!result.tensors_.contains(name))
          shoal::fail(errc::invalid_argument, "{}: tensor '{}' is not listed in {}",
                      file->path().string(), name, index_path.filename().string());
      result.files_.push_back(std::move(file));
      if (progress) progress(++done, shard_tensors.size(), dir / shard_name);
    }
  } else if (std::filesystem::exists(single_path)) {
    auto file = safetensors_file::open(single_path, key);
    for (const auto& [name, entry] : file->entries()) result.tensors_[name] = tensor_ref{&entry, file.get()};
    result.files_.push_back(std::move(file));
    if (progress) progress(1, 1, single_path);
  } else {
    shoal::fail(errc::not_found, "{}: no model.safetensors or model.safetensors.index.json", dir.string());
  }
  return result;
}

checkpoint checkpoint::from_files(const std::filesystem::path& label,
                                  std::vector<std::unique_ptr<safetensors_file>> files) {
  checkpoint result;
  result.dir_ = label;
  for (auto& file : files) {
    for (const auto& [name, entry] : file->entries()) {
      const auto [it, added] = result.tensors_.emplace(name, tensor_ref{&entry, file.get()});
      if (!added)
        shoal::fail(errc::invalid_argument, "{}: tensor '{}' is in both {} and {}", label.string(), name,
                    it->second.file->path().string(), file->path().string());
    }
    result.files_.push_back(std::move(file));
  }
  return result;
}

tensor_ref checkpoint::find(std::string_view name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? tensor_ref{} : it->second;
}

std::vector<std::string> checkpoint::names() const {
  std::vector<std::string> result;
  for (const auto& [name, ref] : tensors_) result.push_back(name);
  return result;
}

void write_safetensors(const std::filesystem::path& path, const std::vector<const tensor_blob*>& tensors) {
  std::vector<const tensor_blob*> sorted = tensors;
  std::sort(sorted.begin(), sorted.end(), [](auto* a, auto* b) { return a->name < b->name; });
  json header = json::object();
  std::uint64_t offset = 0;
  for (const auto* t : sorted) {
    header[t->name] = {{"dtype", std::string(kernels::dtype_name(t->type))},
                       {"shape", t->shape},
                       {"data_offsets", {offset, offset + t->bytes.size()}}};
    offset += t->bytes.size();
  }
  header["__metadata__"] = {{"format", "pt"}};
  std::string text = header.dump();
  while ((text.size() + 8) % 8 != 0) text.push_back(' ');
  const auto tmp = path.string() + ".partial";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) shoal::fail(errc::unavailable, "{}: cannot write", tmp);
    std::uint64_t len = text.size();
    char len_bytes[8];
    for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<char>((len >> (8 * i)) & 0xff);
    out.write(len_bytes, 8);
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
    for (const auto* t : sorted)
      out.write(reinterpret_cast<const char*>(t->bytes.data()), static_cast<std::streamsize>(t->bytes.size()));
    if (!out) shoal::fail(errc::unavailable, "{}: write failed (disk full?)", tmp);
  }
  std::filesystem::rename(tmp, path);
}

std::vector<std::uint8_t> encode_safetensors(std::span<const tensor_bytes> tensors) {
  constexpr std::uint64_t kAlign = 64;
  auto aligned = [](std::uint64_t n) { return (n + kAlign - 1) / kAlign * kAlign; };
  json header = json::object();
  std::vector<std::uint64_t> offsets;
  std::uint64_t offset = 0;
  for (const auto& t : tensors) {
    std::uint64_t elements = 1;
    for (auto d : t.shape) elements *= static_cast<std::uint64_t>(d);
    if (elements * kernels::dtype_size(t.type) != t.bytes.size())
      shoal::fail(errc::invalid_argument, "tensor '{}': {} bytes for {} elements of {}", t.name, t.bytes.size(),
                  elements, kernels::dtype_name(t.type));
    offset = aligned(offset);
    offsets.push_back(offset);
    header[t.name] = {{"dtype", std::string(kernels::dtype_name(t.type))},
                      {"shape", t.shape},
                      {"data_offsets", {offset, offset + t.bytes.size()}}};
    offset += t.bytes.size();
  }
  header["__metadata__"] = {{"format", "pt"}};
  std::string text = header.dump();
  // The data area then starts at a 64-byte boundary of the file, as the offsets inside it do.
  while ((text.size() + 8) % kAlign != 0) text.push_back(' ');
  std::vector<std::uint8_t> out(8 + text.size() + offset);
  const std::uint64_t len = text.size();
  for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = static_cast<std::uint8_t>((len >> (8 * i)) & 0xff);
  std::memcpy(out.data() + 8, text.data(), text.size());
  std::uint8_t* data = out.data() + 8 + text.size();
  for (std::size_t i = 0; i < tensors.size(); ++i)
    if (!tensors[i].bytes.empty()) std::memcpy(data + offsets[i], tensors[i].bytes.data(), tensors[i].bytes.size());
  return out;
}

}  // namespace shoal::runtime
