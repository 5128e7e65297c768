#pragma once
/// \file
/// Conversations to prompt text, exactly as the Jinja `chat_template` of a DeepSeek-V3
/// checkpoint's tokenizer_config.json renders them (as Hugging Face's `apply_chat_template`
/// with `tokenize=False`). Instead of a general Jinja engine, Shoal carries a dedicated
/// renderer for each template it recognises and refuses templates it does not know, so a
/// checkpoint with a changed template cannot be silently mis-prompted.

#include "shoal/runtime/tokenizer.hpp"

#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace shoal::runtime {

/// A call of a tool that the assistant asked for (OpenAI `tool_calls[i]`).
struct chat_tool_call {
  std::string type = "function";  ///< The template prints it before `<｜tool▁sep｜>`.
  std::string name;               ///< Function name.
  std::string arguments;          ///< Arguments as the JSON text the model wrote.
};

/// One message of a conversation.
struct chat_message {
  /// "system", "user", "assistant" or "tool". Other roles render nothing (as in the template).
  std::string role;
  /// The text. An assistant message without content (`null`) carries `tool_calls` instead;
  /// the other roles need content.
  std::optional<std::string> content;
  /// Tool calls of an assistant message whose content is null.
  std::vector<chat_tool_call> tool_calls;
};

/// Messages from OpenAI-style JSON: an array of `{"role", "content", "tool_calls"}` (or an
/// object with such a "messages" array). `content` may be a string, null, or an array of
/// parts of which the "text" ones are joined; a tool call is `{"type", "function": {"name",
/// "arguments"}}` with arguments as a JSON string (an object is serialised). Throws
/// `invalid_argument` naming the message at fault.
std::vector<chat_message> parse_chat_messages(std::string_view json);

/// The chat templates Shoal can render.
enum class chat_template_kind {
  deepseek_v3,  ///< DeepSeek-V3 as published.
  deepseek_r1,  ///< DeepSeek-R1: V3's, but earlier answers drop their reasoning and the
                ///< generation prompt opens `<think>\n`.
};

/// A recognised chat template.
class chat_template {
 public:
  /// Recognises the Jinja `source` (compared exactly, byte for byte, with the templates Shoal
  /// knows). `bos_token` is what `{{bos_token}}` prints. Throws `failed_precondition`, saying
  /// what to do, when the template is unknown or empty.
  static chat_template from_source(std::string_view source, std::string bos_token);

  /// The template of a loaded tokenizer (tokenizer_config.json's `chat_template`).
  static chat_template for_tokenizer(const tokenizer& tok);

  /// Which template this is.
  chat_template_kind kind() const { return kind_; }

  /// The Jinja source of a known template, byte for byte (for tests, and for writing a
  /// checkpoint's tokenizer_config.json).
  static std::string known_source(chat_template_kind kind);

  /// The prompt text of `messages`; `add_generation_prompt` appends the assistant turn
  /// opener (unless the conversation ends with tool outputs, as the template does). Throws
  /// `invalid_argument` where the Jinja template would fail to render (a system, user or tool
  /// message without content). Messages of other roles render nothing, as in the template.
  std::string render(std::span<const chat_message> messages, bool add_generation_prompt) const;

 private:
  chat_template(chat_template_kind kind, std::string bos) : kind_(kind), bos_(std::move(bos)) {}
  chat_template_kind kind_;
  std::string bos_;
};

}  // namespace shoal::runtime
