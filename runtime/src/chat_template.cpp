#include "shoal/runtime/chat_template.hpp"

#include "shoal/base/error.hpp"

#include <minja/minja.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <ctime>

namespace shoal::runtime {
namespace {

using ojson = nlohmann::ordered_json;

// Bounds on one render. DeepSeek's templates take a few dozen steps per message, and a prompt
// fits a context of at most a few hundred thousand tokens; these leave room for the longest
// conversations (tested: 20000 messages) and stop a template that loops away or recurses.
constexpr std::size_t kMaxRenderSteps = 1'000'000;
constexpr std::size_t kMaxRenderDepth = 256;
constexpr std::size_t kMaxRenderBytes = 32u << 20;

// minja appends " at row R, column C:" and the source lines around it to every error, once per
// enclosing node. Keep the message and the innermost position only: chat templates are often
// one line of several kilobytes.
std::string short_error(std::string_view what) {
  constexpr std::string_view kAt = " at row ";
  const auto at = what.find(kAt);
  if (at == std::string_view::npos) return std::string(what);
  std::string message(what.substr(0, at));
  const auto colon = what.find(':', at);
  const auto where = what.substr(at + kAt.size(), colon == std::string_view::npos ? std::string_view::npos : colon - at - kAt.size());
  // "R, column C" -> "line R, column C"
  return message + " (line " + std::string(where) + ")";
}

ojson message_json(const chat_message& m) {
  ojson j = ojson::object();
  j["role"] = m.role;
  j["content"] = m.content ? ojson(*m.content) : ojson(nullptr);
  if (m.reasoning_content) j["reasoning_content"] = *m.reasoning_content;
  if (!m.tool_calls.empty()) {
    ojson calls = ojson::array();
    for (const auto& c : m.tool_calls) {
      ojson call = ojson::object();
      if (!c.id.empty()) call["id"] = c.id;
      call["type"] = c.type;
      call["function"] = ojson{{"name", c.name}, {"arguments", c.arguments}};
      calls.push_back(std::move(call));
    }
    j["tool_calls"] = std::move(calls);
  }
  if (!m.tool_call_id.empty()) j["tool_call_id"] = m.tool_call_id;
  return j;
}

ojson parse_option(const std::string& text, const char* what, bool object) {
  ojson v;
  try {
    v = ojson::parse(text);
  } catch (const nlohmann::json::exception& e) {
    shoal::fail(errc::invalid_argument, "{} is not valid JSON: {}", what, e.what());
  }
  if (object ? !v.is_object() : !v.is_array())
    shoal::fail(errc::invalid_argument, "{} must be a JSON {}", what, object ? "object" : "array");
  return v;
}

// Sets minja's per-render limits for the current thread and clears them on every exit.
struct limits_scope {
  minja::RenderLimits limits{kMaxRenderSteps, kMaxRenderDepth, kMaxRenderBytes};
  minja::RenderLimits* previous = minja::render_limits;
  limits_scope() { minja::render_limits = &limits; }
  ~limits_scope() { minja::render_limits = previous; }
  limits_scope(const limits_scope&) = delete;
  limits_scope& operator=(const limits_scope&) = delete;
};

}  // namespace

struct chat_template::impl {
  std::string source;
  std::string bos, eos;
  std::shared_ptr<minja::TemplateNode> root;
};

std::vector<chat_message> parse_chat_messages(std::string_view json) {
  nlohmann::json root;
  try {
    root = nlohmann::json::parse(json);
  } catch (const nlohmann::json::exception& e) {
    shoal::fail(errc::invalid_argument, "chat messages are not valid JSON: {}", e.what());
  }
  if (root.is_object() && root.contains("messages")) root = root["messages"];
  if (!root.is_array()) shoal::fail(errc::invalid_argument, "chat messages: expected a JSON array of messages");
  std::vector<chat_message> messages;
  for (std::size_t i = 0; i < root.size(); ++i) {
    const auto& m = root[i];
    auto bad = [&](std::string_view what) { shoal::fail(errc::invalid_argument, "chat message {}: {}", i, what); };
    if (!m.is_object() || !m.contains("role") || !m["role"].is_string()) bad("expected an object with a string \"role\"");
    chat_message out{m["role"].get<std::string>(), std::nullopt};
    if (m.contains("content") && !m["content"].is_null()) {
      const auto& c = m["content"];
      if (c.is_string()) {
        out.content = c.get<std::string>();
      } else if (c.is_array()) {
        std::string text;
        for (const auto& part : c)
          if (part.is_object() && part.value("type", "") == "text" && part.contains("text") && part["text"].is_string())
            text += part["text"].get<std::string>();
        out.content = std::move(text);
      } else {
        bad("\"content\" must be a string, null or an array of parts");
      }
    }
    if (m.contains("reasoning_content") && !m["reasoning_content"].is_null()) {
      if (!m["reasoning_content"].is_string()) bad("\"reasoning_content\" must be a string");
      out.reasoning_content = m["reasoning_content"].get<std::string>();
    }
    if (m.contains("tool_call_id") && !m["tool_call_id"].is_null()) {
      if (!m["tool_call_id"].is_string()) bad("\"tool_call_id\" must be a string");
      out.tool_call_id = m["tool_call_id"].get<std::string>();
    }
    if (m.contains("tool_calls") && !m["tool_calls"].is_null()) {
      if (!m["tool_calls"].is_array()) bad("\"tool_calls\" must be an array");
      for (const auto& call : m["tool_calls"]) {
        if (!call.is_object() || !call.contains("function") || !call["function"].is_object() ||
            !call["function"].contains("name") || !call["function"]["name"].is_string())
          bad("a tool call needs \"function\": {\"name\": ..., \"arguments\": ...}");
        const auto& fn = call["function"];
        chat_tool_call tc;
        tc.type = call.value("type", "function");
        tc.name = fn["name"].get<std::string>();
        if (fn.contains("arguments"))
          tc.arguments = fn["arguments"].is_string() ? fn["arguments"].get<std::string>() : fn["arguments"].dump();
        if (call.contains("id") && call["id"].is_string()) tc.id = call["id"].get<std::string>();
        out.tool_calls.push_back(std::move(tc));
      }
    }
    messages.push_back(std::move(out));
  }
  return messages;
}

chat_template chat_template::from_source(std::string_view source, std::string bos_token, std::string eos_token) {
  if (source.empty())
    shoal::fail(errc::failed_precondition, "the tokenizer has no chat_template (tokenizer_config.json); use a plain "
                "prompt instead of chat messages");
  auto p = std::make_shared<impl>();
  p->source = std::string(source);
  p->bos = std::move(bos_token);
  p->eos = std::move(eos_token);
  // As Hugging Face's apply_chat_template: trim_blocks and lstrip_blocks, and Jinja2's default
  // of dropping one trailing newline.
  const minja::Options options{/*trim_blocks=*/true, /*lstrip_blocks=*/true, /*keep_trailing_newline=*/false};
  try {
    p->root = minja::Parser::parse(p->source, options);
  } catch (const std::exception& e) {
    shoal::fail(errc::failed_precondition, "the checkpoint's chat_template cannot be parsed: {}. Fix chat_template in "
                "tokenizer_config.json, or use plain prompts", short_error(e.what()));
  }
  return chat_template(std::move(p));
}

chat_template chat_template::for_tokenizer(const tokenizer& tok) {
  return from_source(tok.chat_template_source(), tok.bos_token(), tok.eos_token());
}

const std::string& chat_template::source() const { return impl_->source; }

std::string chat_template::render(std::span<const chat_message> messages, bool add_generation_prompt) const {
  chat_render_options options;
  options.add_generation_prompt = add_generation_prompt;
  return render(messages, options);
}

std::string chat_template::render(std::span<const chat_message> messages, const chat_render_options& options) const {
  // The variables apply_chat_template passes: the special tokens, then the caller's kwargs
  // (which may replace them), then messages, tools, documents and add_generation_prompt.
  ojson vars = ojson::object();
  vars["bos_token"] = impl_->bos;
  vars["eos_token"] = impl_->eos;
  if (!options.kwargs_json.empty()) {
    const ojson kwargs = parse_option(options.kwargs_json, "chat_template_kwargs", true);
    for (const auto& [key, value] : kwargs.items()) {
      if (key == "messages" || key == "tools" || key == "documents" || key == "add_generation_prompt")
        shoal::fail(errc::invalid_argument, "chat_template_kwargs may not set '{}'", key);
      vars[key] = value;
    }
  }
  ojson list = ojson::array();
  for (const auto& m : messages) list.push_back(message_json(m));
  vars["messages"] = std::move(list);
  vars["tools"] = options.tools_json.empty() ? ojson(nullptr) : parse_option(options.tools_json, "tools", false);
  vars["documents"] = nullptr;
  vars["add_generation_prompt"] = options.add_generation_prompt;

  limits_scope limits;
  try {
    auto context = minja::Context::make(minja::Value(vars));
    // Hugging Face's other global (Llama 3's templates print today's date with it).
    context->set("strftime_now", minja::Value::callable([](const std::shared_ptr<minja::Context>&, minja::ArgumentsValue& args) {
      args.expectArgs("strftime_now", {1, 1}, {0, 0});
      const auto format = args.args[0].get<std::string>();
      const std::time_t now = std::time(nullptr);
      std::tm local{};
      localtime_r(&now, &local);
      char text[256];
      const auto n = std::strftime(text, sizeof text, format.c_str(), &local);
      return minja::Value(std::string(text, n));
    }));
    return impl_->root->render(context);
  } catch (const std::exception& e) {
    const std::string what = e.what();
    if (what.starts_with("shoal-limit: "))
      shoal::fail(errc::invalid_argument, "the chat template exceeded a bound while rendering this conversation: {}",
                  short_error(std::string_view(what).substr(13)));
    shoal::fail(errc::invalid_argument, "the chat template refused this conversation: {}", short_error(what));
  }
}

}  // namespace shoal::runtime
