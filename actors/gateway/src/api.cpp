#include "shoal/gateway/api.hpp"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <limits>

namespace shoal::gateway {
namespace {

using json = nlohmann::json;

[[noreturn]] void bad(std::string param, std::string message) {
  throw api_error(400, "invalid_request_error", std::move(message), std::move(param));
}

const char* type_name(const json& v) {
  switch (v.type()) {
    case json::value_t::null: return "null";
    case json::value_t::boolean: return "a boolean";
    case json::value_t::string: return "a string";
    case json::value_t::array: return "an array";
    case json::value_t::object: return "an object";
    case json::value_t::binary: return "binary";
    case json::value_t::discarded: return "invalid";
    default: return "a number";
  }
}

// Present and not null: OpenAI clients send null for "use the default".
const json* field(const json& obj, const char* name) {
  const auto it = obj.find(name);
  if (it == obj.end() || it->is_null()) return nullptr;
  return &*it;
}

double number(const json& obj, const char* name, double lo, double hi, double fallback) {
  const json* v = field(obj, name);
  if (!v) return fallback;
  if (!v->is_number()) bad(name, fmt::format("'{}' must be a number, not {}", name, type_name(*v)));
  const double x = v->get<double>();
  if (!std::isfinite(x) || x < lo || x > hi) bad(name, fmt::format("'{}' must be between {} and {}, got {}", name, lo, hi, x));
  return x;
}

std::optional<std::int64_t> integer(const json& obj, const char* name, std::int64_t lo, std::int64_t hi) {
  const json* v = field(obj, name);
  if (!v) return std::nullopt;
  if (!v->is_number_integer()) bad(name, fmt::format("'{}' must be an integer, not {}", name, type_name(*v)));
  // Integers beyond int64 arrive as unsigned; compare without overflow.
  if (v->is_number_unsigned() && v->get<std::uint64_t>() > static_cast<std::uint64_t>(hi))
    bad(name, fmt::format("'{}' must be between {} and {}", name, lo, hi));
  const auto x = v->get<std::int64_t>();
  if (x < lo || x > hi) bad(name, fmt::format("'{}' must be between {} and {}, got {}", name, lo, hi, x));
  return x;
}

bool boolean(const json& obj, const char* name, bool fallback) {
  const json* v = field(obj, name);
  if (!v) return fallback;
  if (!v->is_boolean()) bad(name, fmt::format("'{}' must be a boolean, not {}", name, type_name(*v)));
  return v->get<bool>();
}

// Message content: a string, or an array of {"type": "text", "text": ...} parts (concatenated).
std::optional<std::string> message_content(const json& msg, std::size_t i) {
  const std::string param = fmt::format("messages[{}].content", i);
  const json* v = field(msg, "content");
  if (!v) return std::nullopt;
  if (v->is_string()) return v->get<std::string>();
  if (!v->is_array()) bad(param, fmt::format("'{}' must be a string or an array of text parts, not {}", param, type_name(*v)));
  std::string text;
  for (const auto& part : *v) {
    if (!part.is_object()) bad(param, fmt::format("'{}' parts must be objects", param));
    const json* type = field(part, "type");
    if (!type || !type->is_string() || type->get<std::string>() != "text")
      bad(param, fmt::format("'{}': only parts of type 'text' are supported", param));
    const json* t = field(part, "text");
    if (!t || !t->is_string()) bad(param, fmt::format("'{}': a text part needs 'text' as a string", param));
    text += t->get<std::string>();
  }
  return text;
}

std::vector<runtime::chat_message> parse_messages(const json& root) {
  const json* v = field(root, "messages");
  if (!v) bad("messages", "'messages' is required");
  if (!v->is_array()) bad("messages", fmt::format("'messages' must be an array, not {}", type_name(*v)));
  if (v->empty()) bad("messages", "'messages' must not be empty");
  std::vector<runtime::chat_message> out;
  out.reserve(v->size());
  for (std::size_t i = 0; i < v->size(); ++i) {
    const json& m = (*v)[i];
    if (!m.is_object()) bad(fmt::format("messages[{}]", i), fmt::format("messages[{}] must be an object", i));
    const json* role = field(m, "role");
    if (!role || !role->is_string())
      bad(fmt::format("messages[{}].role", i), fmt::format("messages[{}].role is required and must be a string", i));
    runtime::chat_message msg;
    msg.role = role->get<std::string>();
    // "developer" is OpenAI's newer name for the system role.
    if (msg.role == "developer") msg.role = "system";
    if (msg.role != "system" && msg.role != "user" && msg.role != "assistant" && msg.role != "tool")
      bad(fmt::format("messages[{}].role", i),
          fmt::format("messages[{}].role must be system, user, assistant or tool, got '{}'", i, msg.role));
    msg.content = message_content(m, i);
    if (const json* r = field(m, "reasoning_content"); r && msg.role == "assistant") {
      if (!r->is_string())
        bad(fmt::format("messages[{}].reasoning_content", i), "'reasoning_content' must be a string");
      msg.reasoning_content = r->get<std::string>();
    }
    if (const json* id = field(m, "tool_call_id"); id && msg.role == "tool") {
      if (!id->is_string()) bad(fmt::format("messages[{}].tool_call_id", i), "'tool_call_id' must be a string");
      msg.tool_call_id = id->get<std::string>();
    }
    if (const json* calls = field(m, "tool_calls"); calls && msg.role == "assistant") {
      if (!calls->is_array()) bad(fmt::format("messages[{}].tool_calls", i), "'tool_calls' must be an array");
      for (const auto& c : *calls) {
        const json* fn = c.is_object() ? field(c, "function") : nullptr;
        const json* name = fn && fn->is_object() ? field(*fn, "name") : nullptr;
        const json* args = fn && fn->is_object() ? field(*fn, "arguments") : nullptr;
        if (!name || !name->is_string() || !args || !args->is_string())
          bad(fmt::format("messages[{}].tool_calls", i), "each tool call needs function.name and function.arguments as strings");
        runtime::chat_tool_call call;
        if (const json* t = field(c, "type"); t && t->is_string()) call.type = t->get<std::string>();
        if (const json* id = field(c, "id"); id && id->is_string()) call.id = id->get<std::string>();
        call.name = name->get<std::string>();
        call.arguments = args->get<std::string>();
        msg.tool_calls.push_back(std::move(call));
      }
    }
    if (!msg.content && msg.tool_calls.empty())
      bad(fmt::format("messages[{}].content", i), fmt::format("messages[{}] needs content", i));
    out.push_back(std::move(msg));
  }
  return out;
}

void parse_prompt(const json& root, generation_body& out) {
  const json* v = field(root, "prompt");
  if (!v) bad("prompt", "'prompt' is required");
  if (v->is_string()) {
    out.prompt = v->get<std::string>();
    return;
  }
  if (!v->is_array()) bad("prompt", fmt::format("'prompt' must be a string or an array, not {}", type_name(*v)));
  if (v->size() == 1 && (*v)[0].is_string()) {
    out.prompt = (*v)[0].get<std::string>();
    return;
  }
  if (!v->empty() && (*v)[0].is_string()) bad("prompt", "only one prompt per request is supported");
  std::vector<runtime::token_id> ids;
  ids.reserve(v->size());
  for (const auto& t : *v) {
    if (!t.is_number_integer() || t.get<std::int64_t>() < 0 || t.get<std::int64_t>() > std::numeric_limits<runtime::token_id>::max())
      bad("prompt", "'prompt' as an array must hold one string or token ids (non-negative integers)");
    ids.push_back(static_cast<runtime::token_id>(t.get<std::int64_t>()));
  }
  out.prompt_tokens = std::move(ids);
}

void parse_stop(const json& root, generation_body& out) {
  const json* v = field(root, "stop");
  if (!v) return;
  if (v->is_string()) {
    out.stop.push_back(v->get<std::string>());
  } else if (v->is_array()) {
    if (v->size() > 4) bad("stop", "'stop' may hold at most 4 strings");
    for (const auto& s : *v) {
      if (!s.is_string()) bad("stop", "'stop' must be a string or an array of strings");
      out.stop.push_back(s.get<std::string>());
    }
  } else {
    bad("stop", fmt::format("'stop' must be a string or an array of strings, not {}", type_name(*v)));
  }
  for (const auto& s : out.stop)
    if (s.empty()) bad("stop", "stop strings must not be empty");
}

}  // namespace

std::string error_body(const api_error& e) {
  json err{{"message", e.what()},
           {"type", e.type()},
           {"param", e.param().empty() ? json(nullptr) : json(e.param())},
           {"code", e.code().empty() ? json(nullptr) : json(e.code())}};
  return json{{"error", std::move(err)}}.dump(-1, ' ', false, json::error_handler_t::replace);
}

generation_body parse_request(std::string_view body, endpoint kind, std::string_view served_model) {
  json root;
  try {
    root = json::parse(body);
  } catch (const json::exception& e) {
    throw api_error(400, "invalid_request_error", fmt::format("the body is not valid JSON: {}", e.what()));
  }
  if (!root.is_object()) bad({}, fmt::format("the body must be a JSON object, not {}", type_name(root)));
  generation_body out;
  out.kind = kind;
  try {
    if (const json* m = field(root, "model")) {
      if (!m->is_string()) bad("model", fmt::format("'model' must be a string, not {}", type_name(*m)));
      out.model = m->get<std::string>();
      if (out.model != served_model)
        throw api_error(404, "invalid_request_error",
                        fmt::format("The model '{}' does not exist; this server serves '{}'", out.model, served_model),
                        "model", "model_not_found");
    }
    if (kind == endpoint::chat) {
      out.messages = parse_messages(root);
      // Passed to the chat template as variables (vLLM's and SGLang's name for it), e.g.
      // {"thinking": true} for DeepSeek-V3.1.
      if (const json* kw = field(root, "chat_template_kwargs")) {
        if (!kw->is_object())
          bad("chat_template_kwargs", fmt::format("'chat_template_kwargs' must be an object, not {}", type_name(*kw)));
        out.chat_template_kwargs = kw->dump();
      }
    } else {
      parse_prompt(root, out);
    }
    out.stream = boolean(root, "stream", false);
    if (const json* so = field(root, "stream_options")) {
      if (!so->is_object()) bad("stream_options", "'stream_options' must be an object");
      out.include_usage = boolean(*so, "include_usage", false);
    }
    constexpr std::int64_t kTokenLimit = std::int64_t{1} << 30;
    out.max_tokens = integer(root, "max_tokens", 1, kTokenLimit);
    if (auto mct = integer(root, "max_completion_tokens", 1, kTokenLimit)) out.max_tokens = mct;
    parse_stop(root, out);
    auto& s = out.sampling;
    s.temperature = static_cast<float>(number(root, "temperature", 0.0, 2.0, 1.0));
    s.top_p = static_cast<float>(number(root, "top_p", 0.0, 1.0, 1.0));
    if (s.top_p <= 0.0f) bad("top_p", "'top_p' must be greater than 0");
    if (auto k = integer(root, "top_k", -1, std::numeric_limits<std::int32_t>::max())) s.top_k = *k < 0 ? 0 : static_cast<std::int32_t>(*k);
    s.min_p = static_cast<float>(number(root, "min_p", 0.0, 1.0, 0.0));
    s.presence_penalty = static_cast<float>(number(root, "presence_penalty", -2.0, 2.0, 0.0));
    s.frequency_penalty = static_cast<float>(number(root, "frequency_penalty", -2.0, 2.0, 0.0));
    s.repetition_penalty = static_cast<float>(number(root, "repetition_penalty", 1e-3, 100.0, 1.0));
    if (const json* seed = field(root, "seed")) {
      if (!seed->is_number_integer()) bad("seed", fmt::format("'seed' must be an integer, not {}", type_name(*seed)));
      // Negative seeds are valid in OpenAI's API; any 64-bit pattern is a seed.
      s.seed = seed->is_number_unsigned() ? seed->get<std::uint64_t>() : static_cast<std::uint64_t>(seed->get<std::int64_t>());
    }
    out.n = static_cast<int>(integer(root, "n", 1, kMaxChoices).value_or(1));
    out.ignore_eos = boolean(root, "ignore_eos", false);
    // Options this server cannot honour are refused rather than silently ignored.
    if (boolean(root, "logprobs", false) || field(root, "top_logprobs"))
      bad("logprobs", "logprobs are not supported by this server");
    if (const json* tools = field(root, "tools"); tools && !(tools->is_array() && tools->empty()))
      bad("tools", "tool definitions are not supported by this server");
    if (kind == endpoint::completion) {
      if (boolean(root, "echo", false)) bad("echo", "'echo' is not supported by this server");
      if (field(root, "suffix")) bad("suffix", "'suffix' is not supported by this server");
      if (auto best_of = integer(root, "best_of", 1, kMaxChoices); best_of && *best_of != out.n)
        bad("best_of", "'best_of' other than n is not supported by this server");
    }
  } catch (const json::exception& e) {
    // Any access the checks above missed still becomes a client error, never a crash.
    throw api_error(400, "invalid_request_error", fmt::format("malformed request: {}", e.what()));
  }
  return out;
}

namespace {

json usage_json(const usage_counts& u) {
  return json{{"prompt_tokens", u.prompt_tokens},
              {"completion_tokens", u.completion_tokens},
              {"total_tokens", u.prompt_tokens + u.completion_tokens},
              {"prompt_tokens_details", {{"cached_tokens", u.cached_tokens}}}};
}

json meta_json(const response_meta& m, bool chunk) {
  const char* object = m.kind == endpoint::chat ? (chunk ? "chat.completion.chunk" : "chat.completion") : "text_completion";
  return json{{"id", m.id}, {"object", object}, {"created", m.created}, {"model", m.model}, {"system_fingerprint", "shoal"}};
}

json nullable(const std::string& s) { return s.empty() ? json(nullptr) : json(s); }

// Generated text can hold invalid UTF-8 only through bugs upstream; replace rather than throw.
std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

}  // namespace

std::string stream_chunk(const response_meta& meta, const choice_delta& d) {
  json out = meta_json(meta, true);
  json choice{{"index", d.index}, {"logprobs", nullptr}, {"finish_reason", nullable(d.finish_reason)}};
  if (meta.kind == endpoint::chat) {
    json delta = json::object();
    if (d.first) delta["role"] = "assistant";
    if (!d.content.empty() || (d.first && d.reasoning.empty())) delta["content"] = d.content;
    if (!d.reasoning.empty()) delta["reasoning_content"] = d.reasoning;
    choice["delta"] = std::move(delta);
  } else {
    choice["text"] = d.content;
  }
  out["choices"] = json::array({std::move(choice)});
  return dump(out);
}

std::string stream_usage_chunk(const response_meta& meta, const usage_counts& usage) {
  json out = meta_json(meta, true);
  out["choices"] = json::array();
  out["usage"] = usage_json(usage);
  return dump(out);
}

std::string stream_error(const api_error& e) { return error_body(e); }

std::string full_response(const response_meta& meta, std::span<const choice_result> choices, const usage_counts& usage) {
  json out = meta_json(meta, false);
  json list = json::array();
  for (const auto& c : choices) {
    json choice{{"index", c.index}, {"logprobs", nullptr}, {"finish_reason", nullable(c.finish_reason)}};
    if (meta.kind == endpoint::chat)
      choice["message"] = json{{"role", "assistant"}, {"content", c.content}, {"reasoning_content", nullable(c.reasoning)}};
    else
      choice["text"] = c.content;
    list.push_back(std::move(choice));
  }
  out["choices"] = std::move(list);
  out["usage"] = usage_json(usage);
  return dump(out);
}

std::string models_response(std::string_view model, std::int64_t created) {
  json m{{"id", model}, {"object", "model"}, {"created", created}, {"owned_by", "shoal"}};
  return dump(json{{"object", "list"}, {"data", json::array({std::move(m)})}});
}

}  // namespace shoal::gateway
