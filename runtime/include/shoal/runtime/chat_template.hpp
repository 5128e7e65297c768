#pragma once
/// \file
/// Conversations to prompt text: the Jinja `chat_template` of a checkpoint's
/// tokenizer_config.json, rendered as Hugging Face's `apply_chat_template(tokenize=False)`
/// renders it (Jinja2 with `trim_blocks` and `lstrip_blocks`, `raise_exception`, `tojson`,
/// `strftime_now`).
/// The template is parsed once, when it is loaded: a template that cannot be parsed is
/// refused there, naming its line, rather than on each request. A render fails only when the
/// template refuses the conversation (`raise_exception`, or an operation Jinja2 fails on).
/// Rendering is bounded (steps, nesting, size) and has no access to files.

#include "shoal/runtime/tokenizer.hpp"

#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace shoal::runtime {

/// A call of a tool that the assistant asked for (OpenAI `tool_calls[i]`), passed to the
/// template as `{"id", "type", "function": {"name", "arguments"}}`.
struct chat_tool_call {
  std::string type = "function";  ///< Usually "function".
  std::string name;               ///< Function name.
  std::string arguments;          ///< Arguments as the JSON text the model wrote.
  std::string id = {};            ///< OpenAI's call id; left out of the template's view when empty.
};

/// One message of a conversation, passed to the template in OpenAI's shape.
struct chat_message {
  /// "system", "user", "assistant", "tool" or another role the template may know.
  std::string role;
  /// The text; `null` in the template when absent (an assistant message with tool calls).
  std::optional<std::string> content;
  /// Tool calls of an assistant message; the template sees `tool_calls` only when there are some.
  std::vector<chat_tool_call> tool_calls = {};
  /// The reasoning of an earlier assistant turn (`reasoning_content`), when the client sent it.
  std::optional<std::string> reasoning_content = {};
  /// The call a tool message answers (`tool_call_id`); left out when empty.
  std::string tool_call_id = {};
};

/// Messages from OpenAI-style JSON: an array of `{"role", "content", "tool_calls",
/// "reasoning_content", "tool_call_id"}` (or an object with such a "messages" array).
/// `content` may be a string, null, or an array of parts of which the "text" ones are joined;
/// a tool call is `{"id", "type", "function": {"name", "arguments"}}` with arguments as a JSON
/// string (an object is serialised). Throws `invalid_argument` naming the message at fault.
std::vector<chat_message> parse_chat_messages(std::string_view json);

/// What a render passes to the template besides the messages.
struct chat_render_options {
  /// Append the assistant turn opener (the template decides what that is).
  bool add_generation_prompt = true;
  /// `tools` as a JSON array of OpenAI tool definitions; empty: `tools` is none.
  std::string tools_json = {};
  /// Further template variables as a JSON object (`chat_template_kwargs`, e.g.
  /// `{"thinking": true}`); empty: none. They may override `bos_token` and `eos_token`, not
  /// `messages`, `tools` or `add_generation_prompt`.
  std::string kwargs_json = {};
};

/// A parsed chat template, cheap to copy and safe to render from several threads at once.
class chat_template {
 public:
  /// Parses the Jinja `source`. `bos_token` and `eos_token` are what `{{ bos_token }}` and
  /// `{{ eos_token }}` print. Throws `failed_precondition`, naming the line and column and
  /// what is wrong, when the template is empty or cannot be parsed.
  static chat_template from_source(std::string_view source, std::string bos_token, std::string eos_token = {});

  /// The template of a loaded tokenizer (tokenizer_config.json's `chat_template`), with its
  /// BOS and EOS tokens.
  static chat_template for_tokenizer(const tokenizer& tok);

  /// The Jinja source, as given.
  const std::string& source() const;

  /// The prompt text of `messages`. Throws `invalid_argument` with the template's message when
  /// the template refuses the conversation (`raise_exception`, or an operation Jinja2 would fail
  /// on, such as adding a missing content to a string), when the options are not valid JSON,
  /// or when the render exceeds its bounds.
  std::string render(std::span<const chat_message> messages, const chat_render_options& options) const;

  /// `render` with only `add_generation_prompt` set.
  std::string render(std::span<const chat_message> messages, bool add_generation_prompt) const;

 private:
  struct impl;
  explicit chat_template(std::shared_ptr<const impl> p) : impl_(std::move(p)) {}
  std::shared_ptr<const impl> impl_;
};

}  // namespace shoal::runtime
