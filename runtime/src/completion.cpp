#include "shoal/runtime/completion.hpp"

#include "shoal/base/error.hpp"

#include <algorithm>

namespace shoal::runtime {

std::string_view finish_reason_name(finish_reason r) {
  switch (r) {
    case finish_reason::none: return "";
    case finish_reason::stop: return "stop";
    case finish_reason::length: return "length";
  }
  return "";
}

completion_stream::completion_stream(const tokenizer& tok, completion_limits limits)
    : tok_(&tok), limits_(std::move(limits)), detok_(tok, /*skip_special=*/true) {
  if (limits_.max_tokens < 1) shoal::fail(errc::invalid_argument, "max_tokens = {} (expected >= 1)", limits_.max_tokens);
  for (const auto& s : limits_.stop) {
    if (s.empty()) shoal::fail(errc::invalid_argument, "a stop string is empty");
    longest_stop_ = std::max(longest_stop_, s.size());
  }
}

std::string completion_stream::release(std::string_view piece) {
  held_ += piece;
  if (limits_.stop.empty()) {
    std::string out = std::move(held_);
    held_.clear();
    text_ += out;
    return out;
  }
  // The earliest stop string wins; among stop strings at the same place, the longest.
  std::size_t best = std::string::npos;
  const std::string* best_stop = nullptr;
  for (const auto& s : limits_.stop) {
    const auto at = held_.find(s);
    if (at != std::string::npos && (at < best || (at == best && s.size() > best_stop->size()))) {
      best = at;
      best_stop = &s;
    }
  }
  if (best_stop != nullptr) {
    std::string out = held_.substr(0, best);
    held_.clear();
    matched_stop_ = *best_stop;
    reason_ = finish_reason::stop;
    text_ += out;
    return out;
  }
  // Hold back the longest tail that is a proper prefix of some stop string. Stop strings are
  // valid UTF-8, so such a tail starts on a character boundary.
  std::size_t hold = 0;
  const std::size_t max_hold = std::min(held_.size(), longest_stop_ - 1);
  for (std::size_t len = max_hold; len > 0 && hold == 0; --len) {
    const std::string_view tail = std::string_view(held_).substr(held_.size() - len);
    for (const auto& s : limits_.stop)
      if (s.size() > len && std::string_view(s).substr(0, len) == tail) {
        hold = len;
        break;
      }
  }
  std::string out = held_.substr(0, held_.size() - hold);
  held_.erase(0, held_.size() - hold);
  text_ += out;
  return out;
}

std::string completion_stream::finish_with(finish_reason reason) {
  std::string out = release(detok_.finish());
  if (finished()) return out;  // the flushed bytes completed a stop string
  out += held_;
  text_ += held_;
  held_.clear();
  reason_ = reason;
  return out;
}

std::string completion_stream::push(token_id id) {
  SHOAL_REQUIRE(!finished(), "token {} pushed after the completion finished", id);
  tokens_.push_back(id);
  if (std::find(limits_.stop_token_ids.begin(), limits_.stop_token_ids.end(), id) != limits_.stop_token_ids.end())
    return finish_with(finish_reason::stop);
  std::string out = release(detok_.push(id));
  if (finished()) return out;
  if (static_cast<std::int64_t>(tokens_.size()) >= limits_.max_tokens) out += finish_with(finish_reason::length);
  return out;
}

std::string completion_stream::close() {
  if (finished()) return {};
  return finish_with(finish_reason::length);
}

}  // namespace shoal::runtime
