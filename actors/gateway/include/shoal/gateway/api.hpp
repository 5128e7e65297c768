#pragma once
/// \file
/// The OpenAI-compatible request and response bodies, apart from HTTP. Everything a client
/// sends is untrusted: `parse_request` checks every field it reads (type, range, size) and
/// reports the first problem as an `api_error` carrying the HTTP status and the OpenAI error
/// object, so the server never has to guess what went wrong.

#include "shoal/runtime/chat_template.hpp"
#include "shoal/runtime/sampling.hpp"
#include "shoal/runtime/tokenizer.hpp"

#include <cstdint>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace shoal::gateway {

/// A request the server refuses: the HTTP status and the fields of OpenAI's error object.
class api_error : public std::runtime_error {
 public:
  api_error(int status, std::string type, std::string message, std::string param = {}, std::string code = {})
      : std::runtime_error(std::move(message)), status_(status), type_(std::move(type)), param_(std::move(param)),
        code_(std::move(code)) {}
  int status() const noexcept { return status_; }                 ///< HTTP status (400, 404, 413, 429, ...).
  const std::string& type() const noexcept { return type_; }      ///< "invalid_request_error", ...
  const std::string& param() const noexcept { return param_; }    ///< The offending field; empty: null.
  const std::string& code() const noexcept { return code_; }      ///< Machine-readable code; empty: null.

 private:
  int status_;
  std::string type_, param_, code_;
};

/// `{"error": {"message", "type", "param", "code"}}` for `e`.
std::string error_body(const api_error& e);

/// Which generation endpoint a request came to.
enum class endpoint {
  chat,        ///< POST /v1/chat/completions
  completion,  ///< POST /v1/completions
};

/// Most choices (`n`) one request may ask for.
inline constexpr int kMaxChoices = 8;

/// A checked generation request.
struct generation_body {
  endpoint kind = endpoint::chat;
  std::string model;                              ///< As sent (empty when left out).
  std::vector<runtime::chat_message> messages;    ///< chat: the conversation.
  std::string chat_template_kwargs;               ///< chat: extra template variables, a JSON object (empty: none).
  std::string prompt;                             ///< completion: prompt text ...
  std::optional<std::vector<runtime::token_id>> prompt_tokens;  ///< ... or prompt token ids.
  bool stream = false;                            ///< Server-sent events.
  bool include_usage = false;                     ///< stream_options.include_usage.
  std::optional<std::int64_t> max_tokens;         ///< max_completion_tokens, else max_tokens.
  std::vector<std::string> stop;                  ///< Stop strings (at most 4, non-empty).
  runtime::sampling_params sampling;              ///< temperature, top_p, seed, penalties, ...
  int n = 1;                                      ///< Choices to generate (1..kMaxChoices).
  bool ignore_eos = false;                        ///< Extension (as vLLM): generate past EOS.
};

/// Parses and checks a request body for `kind`. `served_model` is the one model this server
/// has: another name is a 404 `model_not_found`. Throws `api_error` (400 or 404) and nothing
/// else, whatever the bytes are.
generation_body parse_request(std::string_view body, endpoint kind, std::string_view served_model);

/// What every response object of one request shares.
struct response_meta {
  endpoint kind = endpoint::chat;
  std::string id;           ///< "chatcmpl-..." or "cmpl-...".
  std::int64_t created = 0; ///< Unix seconds.
  std::string model;
};

/// Token counts of a request (all choices).
struct usage_counts {
  std::int64_t prompt_tokens = 0;
  std::int64_t completion_tokens = 0;
  std::int64_t cached_tokens = 0;  ///< Prompt tokens served from the prefix cache.
};

/// One streamed piece of a choice.
struct choice_delta {
  int index = 0;
  bool first = false;             ///< chat: carries `role: assistant`.
  std::string content;
  std::string reasoning;          ///< chat: `reasoning_content`.
  std::string finish_reason;      ///< Empty while running.
};

/// One finished choice.
struct choice_result {
  int index = 0;
  std::string content;
  std::string reasoning;          ///< Empty: `reasoning_content` is null.
  std::string finish_reason;
};

/// A `chat.completion.chunk` / `text_completion` streaming object.
std::string stream_chunk(const response_meta& meta, const choice_delta& delta);
/// The last streaming object when `include_usage`: no choices, only usage.
std::string stream_usage_chunk(const response_meta& meta, const usage_counts& usage);
/// A streamed error after the response has started.
std::string stream_error(const api_error& e);
/// A whole non-streaming response.
std::string full_response(const response_meta& meta, std::span<const choice_result> choices, const usage_counts& usage);
/// GET /v1/models.
std::string models_response(std::string_view model, std::int64_t created);

}  // namespace shoal::gateway
