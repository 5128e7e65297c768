#include "shoal/actors/engines.hpp"

#include "shoal/base/error.hpp"
#include "shoal/kernels/moe.hpp"
#include "shoal/kernels/thread_pool.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <fstream>
#include <span>
#include <sstream>

namespace shoal::actors {

namespace {

// Routed experts `experts` of every MoE layer, nothing else.
runtime::weight_selection experts_only(const std::vector<std::uint32_t>& experts) {
  runtime::weight_selection selection;
  selection.embedding = false;
  selection.head = false;
  selection.attention = false;
  // The filter runs before the config is known, so it checks ids against the list directly.
  selection.expert_filter = [list = experts](std::int64_t, std::int64_t e) {
    return std::binary_search(list.begin(), list.end(), static_cast<std::uint32_t>(e));
  };
  return selection;
}

std::string read_config_json(const std::filesystem::path& model) {
  std::ifstream in(model / "config.json", std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

}  // namespace

expert_engine::expert_engine(const std::filesystem::path& model, std::vector<std::uint32_t> experts, int threads,
                             std::shared_ptr<const runtime::weights_key> key)
    : experts_(std::move(experts)) {
  std::sort(experts_.begin(), experts_.end());
  weights_ = runtime::model_weights::load(model, experts_only(experts_), runtime::weight_residency::copy, {},
                                          key.get());
  // Read after the load checked the directory; kept for copies streamed from this actor.
  config_json_ = read_config_json(model);
  check_held();
  pool_ = std::make_unique<kernels::thread_pool>(threads);
}

expert_engine::expert_engine(std::vector<weights_part> parts, std::vector<std::uint32_t> experts, int threads,
                             const std::string& source)
    : experts_(std::move(experts)) {
  std::sort(experts_.begin(), experts_.end());
  if (parts.empty()) shoal::fail(errc::invalid_argument, "{}: no weights received", source);
  const auto total = parts.front().parts;
  std::vector<bool> seen(total, false);
  for (const auto& p : parts) {
    if (p.parts != total || p.part >= total || seen[p.part])
      shoal::fail(errc::invalid_argument, "{}: weights part {} of {} does not belong to a set of {} parts", source,
                  p.part + 1, p.parts, total);
    if (p.config_json != parts.front().config_json)
      shoal::fail(errc::invalid_argument, "{}: weights part {} was checked against another config.json", source,
                  p.part + 1);
    seen[p.part] = true;
  }
  if (parts.size() != total)
    shoal::fail(errc::invalid_argument, "{}: {} of {} weights parts received", source, parts.size(), total);
  config_json_ = parts.front().config_json;
  auto config = config::parse_model_config(config_json_, source + ": config.json");
  std::vector<std::unique_ptr<runtime::safetensors_file>> files;
  for (auto& p : parts) {
    files.push_back(runtime::safetensors_file::from_memory(std::as_bytes(std::span(p.tensors)),
                                                           fmt::format("{} part {}/{}", source, p.part + 1, total)));
    std::vector<std::uint8_t>().swap(p.tensors);  // one copy at a time, not two of everything
  }
  weights_ = runtime::model_weights::load(std::move(config), runtime::checkpoint::from_files(source, std::move(files)),
                                          experts_only(experts_), runtime::weight_residency::copy);
  check_held();
  pool_ = std::make_unique<kernels::thread_pool>(threads);
}

void expert_engine::check_held() {
  held_.assign(static_cast<std::size_t>(weights_->config().n_routed_experts), false);
  for (auto e : experts_) {
    if (e >= held_.size())
      shoal::fail(errc::invalid_argument, "expert {} does not exist (the model has {} routed experts)", e,
                  held_.size());
    held_[e] = true;
  }
}

std::size_t expert_engine::resident_bytes() const noexcept { return weights_->resident_bytes(); }

weights_part expert_engine::weights_part_of(const std::vector<std::uint32_t>& requested, std::uint32_t part,
                                            std::size_t part_bytes) const {
  if (requested.empty()) shoal::fail(errc::invalid_argument, "a weights request must name at least one expert");
  for (auto e : requested)
    if (!holds(e))
      shoal::fail(errc::not_found, "expert {} is not held by this actor (it holds {})", e, fmt::join(experts_, ","));
  std::vector<std::uint32_t> ids = requested;
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  const auto& c = config();
  const auto& layers = weights_->layers();
  struct layer_expert {
    std::int64_t layer;
    std::uint32_t expert;
    std::size_t bytes;
  };
  std::vector<layer_expert> pairs;
  for (std::int64_t l = 0; l < c.num_hidden_layers; ++l) {
    if (!c.is_moe_layer(l)) continue;
    for (auto e : ids) {
      const auto& w = layers[static_cast<std::size_t>(l)].experts[e];
      pairs.push_back({l, e, static_cast<std::size_t>(w.gate.bytes() + w.up.bytes() + w.down.bytes())});
    }
  }
  if (pairs.empty()) shoal::fail(errc::failed_precondition, "the model has no MoE layer: no expert weights to send");
  std::vector<std::size_t> starts{0};
  std::size_t filled = 0;
  for (std::size_t i = 0; i < pairs.size(); ++i) {
    if (filled > 0 && filled + pairs[i].bytes > part_bytes) {
      starts.push_back(i);
      filled = 0;
    }
    filled += pairs[i].bytes;
  }
  const auto parts = static_cast<std::uint32_t>(starts.size());
  if (part >= parts) shoal::fail(errc::invalid_argument, "weights part {} requested; there are {}", part, parts);
  const std::size_t end = part + 1 < parts ? starts[part + 1] : pairs.size();
  std::vector<runtime::tensor_bytes> tensors;
  for (std::size_t i = starts[part]; i < end; ++i) {
    const auto& w = layers[static_cast<std::size_t>(pairs[i].layer)].experts[pairs[i].expert];
    const std::string prefix = fmt::format("model.layers.{}.mlp.experts.{}.", pairs[i].layer, pairs[i].expert);
    for (const auto& [name, m] : {std::pair{"gate_proj", &w.gate}, std::pair{"up_proj", &w.up},
                                  std::pair{"down_proj", &w.down}}) {
      const auto* data = static_cast<const std::byte*>(m->data);
      tensors.push_back({prefix + name + ".weight", m->type, {m->rows, m->cols},
                         {data, static_cast<std::size_t>(m->rows * m->cols) * kernels::dtype_size(m->type)}});
      if (m->type == kernels::dtype::f8_e4m3)
        tensors.push_back({prefix + name + ".weight_scale_inv", kernels::dtype::f32, {m->scale_rows(), m->scale_cols()},
                           std::as_bytes(std::span(m->scale_inv,
                                                   static_cast<std::size_t>(m->scale_rows() * m->scale_cols())))});
    }
  }
  return weights_part{.part = part, .parts = parts, .config_json = config_json_,
                      .tensors = runtime::encode_safetensors(tensors)};
}

expert_engine::~expert_engine() = default;

bool expert_engine::holds(std::int64_t id) const noexcept {
  return id >= 0 && id < static_cast<std::int64_t>(held_.size()) && held_[static_cast<std::size_t>(id)];
}

void expert_engine::compute(std::int64_t layer, const float* x, const std::int32_t* ids, std::int64_t rows,
                            float* out) {
  const auto& c = config();
  if (layer < 0 || layer >= c.num_hidden_layers || !c.is_moe_layer(layer))
    shoal::fail(errc::invalid_argument, "expert dispatch for layer {}, which is not a MoE layer", layer);
  for (std::int64_t r = 0; r < rows; ++r)
    if (!holds(ids[r]))
      shoal::fail(errc::invalid_argument, "expert dispatch for layer {} names expert {}, which this actor does not hold",
                  layer, ids[r]);
  std::fill_n(out, rows * c.hidden_size, 0.0f);
  if (rows == 0) return;
  // Each row is one choice with weight 1: the kernel adds 1 * output to zero, which is the
  // output exactly, and groups rows by expert in row order like the single-process call.
  const std::vector<float> ones(static_cast<std::size_t>(rows), 1.0f);
  kernels::moe_experts_params p{.x = x, .tokens = rows, .hidden = c.hidden_size, .top_k = 1, .indices = ids,
                                .weights = ones.data(), .experts = weights_->layers()[layer].experts, .y = out};
  kernels::moe_experts(*pool_, p);
  rows_computed_.fetch_add(static_cast<std::uint64_t>(rows), std::memory_order_relaxed);
}

stage_engine::stage_engine(const options& o) : options_(o) {
  runtime::weight_selection selection;
  selection.layer_begin = o.first_layer;
  selection.layer_end = o.end_layer;
  selection.embedding = o.first;
  selection.head = o.last;
  if (!o.hold_experts) selection.expert_filter = [](std::int64_t, std::int64_t) { return false; };
  weights_ = runtime::model_weights::load(o.model, selection, runtime::weight_residency::copy, o.progress, o.key.get());
  const auto& c = weights_->config();
  if (o.first_layer < 0 || o.end_layer > c.num_hidden_layers || o.first_layer >= o.end_layer)
    shoal::fail(errc::invalid_argument, "stage layers [{}, {}) are not within the model's {} layers", o.first_layer,
                o.end_layer, c.num_hidden_layers);
  pool_ = std::make_unique<kernels::thread_pool>(o.threads);
  model_ = std::make_unique<runtime::model>(*weights_, *pool_);
  if (o.cache_blocks < 2 || o.block_tokens < 1)
    shoal::fail(errc::invalid_argument, "stage layers [{}, {}): {} cache blocks of {} tokens; at least 2 blocks are needed",
                o.first_layer, o.end_layer, o.cache_blocks, o.block_tokens);
  cache_ = std::make_unique<runtime::kv_block_pool>(c, o.cache_blocks, o.block_tokens, o.first_layer, o.end_layer);
  routed_.assign(static_cast<std::size_t>(c.num_hidden_layers * c.n_routed_experts), 0);
  model_->set_route_observer([this](std::int64_t layer, std::int64_t tokens, std::int64_t top_k,
                                    const std::int32_t* indices, const float*) {
    const auto experts = config().n_routed_experts;
    std::lock_guard lock(routed_mutex_);
    for (std::int64_t i = 0; i < tokens * top_k; ++i)
      ++routed_[static_cast<std::size_t>(layer * experts + indices[i])];
  });
}

std::vector<std::uint64_t> stage_engine::routed_tokens() const {
  std::lock_guard lock(routed_mutex_);
  return routed_;
}

stage_engine::~stage_engine() = default;

std::int64_t stage_engine::cache_blocks() const noexcept { return cache_->total_blocks(); }

void stage_engine::run(step_batch& batch, runtime::expert_backend* experts) {
  const auto& c = config();
  if (batch.next_layer != options_.first_layer)
    shoal::fail(errc::failed_precondition, "step {} arrives for layer {} but this stage starts at layer {}", batch.step,
                batch.next_layer, options_.first_layer);
  std::vector<std::unique_ptr<runtime::latent_cache>> caches;
  std::vector<runtime::sequence_step> steps;
  std::vector<std::int32_t> tokens;
  steps.reserve(batch.entries.size());
  for (const auto& entry : batch.entries) {
    if (entry.tokens.empty())
      shoal::fail(errc::invalid_argument, "step {}: request {} has no tokens", batch.step, entry.request);
    const auto end = static_cast<std::int64_t>(entry.position) + static_cast<std::int64_t>(entry.tokens.size());
    if (end > c.max_position_embeddings)
      shoal::fail(errc::invalid_argument, "step {}: request {}: position {} exceeds the model's context of {}",
                  batch.step, entry.request, end, c.max_position_embeddings);
    if (static_cast<std::int64_t>(entry.blocks.size()) * cache_->block_tokens() < end)
      shoal::fail(errc::invalid_argument, "step {}: request {}: {} cache blocks of {} tokens cannot hold {} positions",
                  batch.step, entry.request, entry.blocks.size(), cache_->block_tokens(), end);
    for (auto b : entry.blocks)
      if (b < 0 || b >= cache_->total_blocks())
        shoal::fail(errc::invalid_argument, "step {}: request {}: cache block {} is outside this stage's {} blocks",
                    batch.step, entry.request, b, cache_->total_blocks());
    caches.push_back(std::make_unique<runtime::latent_cache>(*cache_, entry.blocks, entry.position));
    steps.push_back({caches.back().get(), entry.tokens});
    tokens.insert(tokens.end(), entry.tokens.begin(), entry.tokens.end());
  }
  const auto rows = static_cast<std::int64_t>(tokens.size());
  if (options_.first) {
    batch.hidden.resize(static_cast<std::size_t>(rows * c.hidden_size));
    model_->embed(tokens, batch.hidden.data());
  } else if (static_cast<std::int64_t>(batch.hidden.size()) != rows * c.hidden_size) {
    shoal::fail(errc::invalid_argument, "step {}: {} activation values for {} tokens of width {}", batch.step,
                batch.hidden.size(), rows, c.hidden_size);
  }
  model_->run_layers(options_.first_layer, options_.end_layer, steps, batch.hidden.data(),
                     options_.hold_experts ? nullptr : experts);
  batch.next_layer = static_cast<std::uint32_t>(options_.end_layer);
}

sampled_batch stage_engine::sample(const step_batch& batch) {
  SHOAL_REQUIRE(options_.last, "only the last stage samples");
  const auto& c = config();
  std::vector<float> last_rows;
  sampled_batch out;
  out.step = batch.step;
  std::int64_t row = 0;
  for (const auto& entry : batch.entries) {
    row += static_cast<std::int64_t>(entry.tokens.size());
    // A non-greedy request's sampler needs the whole history (penalties, and the random stream
    // replayed over the tokens already generated); a fresh request starts collecting it.
    if (!(entry.sampling == sampling_spec{})) {
      if (entry.fresh) {
        samplers_.erase(entry.request);
        auto& context = contexts_[entry.request];
        context = entry.history;
        if (context.size() != entry.position)
          shoal::fail(errc::invalid_argument, "step {}: request {} is fresh at position {} but carries {} history tokens",
                      batch.step, entry.request, entry.position, context.size());
      }
      if (auto it = contexts_.find(entry.request); it != contexts_.end()) {
        it->second.resize(entry.position);
        it->second.insert(it->second.end(), entry.tokens.begin(), entry.tokens.end());
      }
    }
    if (!entry.sample_after) continue;
    last_rows.insert(last_rows.end(), batch.hidden.begin() + (row - 1) * c.hidden_size,
                     batch.hidden.begin() + row * c.hidden_size);
    out.tokens.push_back({entry.request, 0});
  }
  const auto n = static_cast<std::int64_t>(out.tokens.size());
  std::vector<float> logits(static_cast<std::size_t>(n * c.vocab_size));
  if (n > 0) model_->logits(last_rows.data(), n, logits.data());
  std::int64_t i = 0;
  for (const auto& entry : batch.entries) {
    if (!entry.sample_after) continue;
    const std::span<const float> logit_row(logits.data() + i * c.vocab_size, static_cast<std::size_t>(c.vocab_size));
    auto& token = out.tokens[static_cast<std::size_t>(i++)].token;
    if (entry.sampling == sampling_spec{}) {
      token = runtime::argmax(logit_row);
      continue;
    }
    auto it = samplers_.find(entry.request);
    if (auto context = contexts_.find(entry.request); context != contexts_.end()) {
      const auto& history = context->second;
      const auto prompt = std::min<std::size_t>(entry.prompt_tokens ? entry.prompt_tokens : history.size(), history.size());
      runtime::sampler fresh(to_sampling_params(entry.sampling), std::span(history).first(prompt), entry.sampling.id_limit);
      for (std::size_t k = prompt; k < history.size(); ++k) fresh.replay(history[k]);
      it = samplers_.insert_or_assign(entry.request, std::move(fresh)).first;
      contexts_.erase(context);
    }
    if (it == samplers_.end())
      shoal::fail(errc::failed_precondition,
                  "step {}: request {} samples but this stage has no sampler for it (its first chunk was not fresh)",
                  batch.step, entry.request);
    token = it->second.sample(logit_row);
  }
  if (batch.want_logits) out.logits = std::move(logits);
  return out;
}

void stage_engine::release(std::span<const request_id> requests) {
  for (auto id : requests) {
    samplers_.erase(id);
    contexts_.erase(id);
  }
}

runtime::sampling_params to_sampling_params(const sampling_spec& spec) {
  runtime::sampling_params p;
  p.temperature = spec.temperature;
  p.top_k = static_cast<std::int32_t>(std::min<std::uint32_t>(spec.top_k, INT32_MAX));
  p.top_p = spec.top_p;
  p.min_p = spec.min_p;
  p.repetition_penalty = spec.repetition_penalty;
  p.frequency_penalty = spec.frequency_penalty;
  p.presence_penalty = spec.presence_penalty;
  if (spec.has_seed) p.seed = spec.seed;
  return p;
}

}  // namespace shoal::actors
