#include "shoal/runtime/chat_template.hpp"

#include "shoal/base/error.hpp"
#include "shoal/runtime/embedded_tokenizer.hpp"

#include <nlohmann/json.hpp>

namespace shoal::runtime {
namespace {

// The reference text of the DeepSeek-V3 template is the one embedded with the tokenizer.
std::string deepseek_v3_template_source() {
  return nlohmann::json::parse(deepseek_v3_tokenizer_config_json()).at("chat_template").get<std::string>();
}

constexpr std::string_view kV3AssistantTurn = "{{'<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}";
constexpr std::string_view kR1AssistantTurn =
    "{% set content = message['content'] %}{% if '</think>' in content %}{% set content = "
    "content.split('</think>')[-1] %}{% endif %}{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}";
constexpr std::string_view kV3GenerationPrompt = "{{'<｜Assistant｜>'}}{% endif %}";
constexpr std::string_view kR1GenerationPrompt = "{{'<｜Assistant｜><think>\\n'}}{% endif %}";

// DeepSeek-R1's template is V3's with two changes: earlier assistant turns lose their
// reasoning (everything up to the last </think>), and the generation prompt opens <think>.
std::string deepseek_r1_template_source() {
  std::string source = deepseek_v3_template_source();
  const auto turn = source.find(kV3AssistantTurn);
  SHOAL_REQUIRE(turn != std::string::npos, "the V3 template has no assistant turn to derive R1's from");
  source.replace(turn, kV3AssistantTurn.size(), kR1AssistantTurn);
  const auto prompt = source.rfind(kV3GenerationPrompt);
  SHOAL_REQUIRE(prompt != std::string::npos, "the V3 template has no generation prompt to derive R1's from");
  source.replace(prompt, kV3GenerationPrompt.size(), kR1GenerationPrompt);
  return source;
}

const std::string& required_content(const chat_message& m, std::size_t index) {
  if (!m.content)
    shoal::fail(errc::invalid_argument, "chat message {} ({}) has no content; only an assistant message with "
                "tool_calls may have null content", index, m.role);
  return *m.content;
}

// A line-by-line transcription of the DeepSeek-V3 (and, with `r1`, R1) Jinja template; the quirks (a single tool
// call gets no <｜tool▁calls▁end｜>, `is_first` never resets between assistant turns) are the
// template's and are kept so that prompts match what the model was trained and served with.
std::string render_deepseek(std::span<const chat_message> messages, bool add_generation_prompt, const std::string& bos,
                            bool r1) {
  bool is_first = false, is_tool = false, is_output_first = true, is_first_sp = true;
  std::string system_prompt;
  for (std::size_t i = 0; i < messages.size(); ++i) {
    const auto& m = messages[i];
    if (m.role != "system") continue;
    if (is_first_sp) {
      system_prompt += required_content(m, i);
      is_first_sp = false;
    } else {
      system_prompt += "\n\n" + required_content(m, i);
    }
  }
  std::string out = bos + system_prompt;
  for (std::size_t i = 0; i < messages.size(); ++i) {
    const auto& m = messages[i];
    if (m.role == "user") {
      is_tool = false;
      out += "<｜User｜>" + required_content(m, i);
    }
    if (m.role == "assistant" && !m.content) {
      is_tool = false;
      for (const auto& tool : m.tool_calls) {
        if (!is_first) {
          out += "<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>" + tool.type + "<｜tool▁sep｜>" + tool.name +
                 "\n```json\n" + tool.arguments + "\n```<｜tool▁call▁end｜>";
          is_first = true;
        } else {
          out += "\n<｜tool▁call▁begin｜>" + tool.type + "<｜tool▁sep｜>" + tool.name + "\n```json\n" + tool.arguments +
                 "\n```<｜tool▁call▁end｜>";
          out += "<｜tool▁calls▁end｜><｜end▁of▁sentence｜>";
        }
      }
    }
    if (m.role == "assistant" && m.content) {
      if (is_tool) {
        out += "<｜tool▁outputs▁end｜>" + *m.content + "<｜end▁of▁sentence｜>";
        is_tool = false;
      } else if (r1) {
        // Jinja's content.split('</think>')[-1]: the text after the last </think>.
        const auto close = m.content->rfind("</think>");
        const std::string_view answer =
            close == std::string::npos ? std::string_view(*m.content) : std::string_view(*m.content).substr(close + 8);
        out += "<｜Assistant｜>";
        out += answer;
        out += "<｜end▁of▁sentence｜>";
      } else {
        out += "<｜Assistant｜>" + *m.content + "<｜end▁of▁sentence｜>";
      }
    }
    if (m.role == "tool") {
      is_tool = true;
      if (is_output_first) {
        out += "<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>" + required_content(m, i) + "<｜tool▁output▁end｜>";
        is_output_first = false;
      } else {
        out += "\n<｜tool▁output▁begin｜>" + required_content(m, i) + "<｜tool▁output▁end｜>";
      }
    }
  }
  if (is_tool) out += "<｜tool▁outputs▁end｜>";
  if (add_generation_prompt && !is_tool) out += r1 ? "<｜Assistant｜><think>\n" : "<｜Assistant｜>";
  return out;
}

}  // namespace

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
    chat_message out{m["role"].get<std::string>(), std::nullopt, {}};
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
        out.tool_calls.push_back(std::move(tc));
      }
    }
    messages.push_back(std::move(out));
  }
  return messages;
}

chat_template chat_template::from_source(std::string_view source, std::string bos_token) {
  if (source.empty())
    shoal::fail(errc::failed_precondition, "the tokenizer has no chat_template (tokenizer_config.json); use a plain "
                "prompt instead of chat messages");
  if (source == deepseek_v3_template_source()) return chat_template(chat_template_kind::deepseek_v3, std::move(bos_token));
  if (source == deepseek_r1_template_source()) return chat_template(chat_template_kind::deepseek_r1, std::move(bos_token));
  shoal::fail(errc::failed_precondition,
              "the checkpoint's chat_template ({} bytes) is not one Shoal can render (known: the DeepSeek-V3 "
              "and DeepSeek-R1 templates); rendering it differently would silently change the prompt. Use a plain prompt, or "
              "replace chat_template in tokenizer_config.json with the DeepSeek-V3 one if the model uses that format",
              source.size());
}

std::string chat_template::known_source(chat_template_kind kind) {
  switch (kind) {
    case chat_template_kind::deepseek_v3: return deepseek_v3_template_source();
    case chat_template_kind::deepseek_r1: return deepseek_r1_template_source();
  }
  SHOAL_REQUIRE(false, "unhandled chat template kind {}", static_cast<int>(kind));
}

chat_template chat_template::for_tokenizer(const tokenizer& tok) {
  return from_source(tok.chat_template_source(), tok.bos_token());
}

std::string chat_template::render(std::span<const chat_message> messages, bool add_generation_prompt) const {
  switch (kind_) {
    case chat_template_kind::deepseek_v3: return render_deepseek(messages, add_generation_prompt, bos_, false);
    case chat_template_kind::deepseek_r1: return render_deepseek(messages, add_generation_prompt, bos_, true);
  }
  SHOAL_REQUIRE(false, "unhandled chat template kind {}", static_cast<int>(kind_));
}

}  // namespace shoal::runtime
