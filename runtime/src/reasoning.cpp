#include "shoal/runtime/reasoning.hpp"

#include <algorithm>

namespace shoal::runtime {
namespace {

constexpr std::string_view kOpen = "<think>";
constexpr std::string_view kClose = "</think>";

bool is_space(char c) { return c == ' ' || c == '\n' || c == '\r' || c == '\t' || c == '\f' || c == '\v'; }

std::size_t skip_space(std::string_view s) {
  std::size_t i = 0;
  while (i < s.size() && is_space(s[i])) ++i;
  return i;
}

// Length of the longest tail of `s` that is a proper prefix of `tag`.
std::size_t partial_tag_tail(std::string_view s, std::string_view tag) {
  for (std::size_t len = std::min(s.size(), tag.size() - 1); len > 0; --len)
    if (s.substr(s.size() - len) == tag.substr(0, len)) return len;
  return 0;
}

}  // namespace

reasoning_parser::reasoning_parser(bool starts_in_reasoning)
    : state_(starts_in_reasoning ? state::reasoning : state::start) {}

void reasoning_parser::step(reasoning_split& out, bool final) {
  for (;;) {
    switch (state_) {
      case state::start: {
        const std::string_view rest = std::string_view(buffer_).substr(skip_space(buffer_));
        if (!final && rest.size() < kOpen.size() && kOpen.starts_with(rest))
          return;  // whitespace, or the beginning of "<think>": wait
        if (rest.starts_with(kOpen)) {
          buffer_.erase(0, buffer_.size() - rest.size() + kOpen.size());
          state_ = state::reasoning;
        } else {
          state_ = state::content;
        }
        continue;
      }
      case state::reasoning: {
        if (!reasoning_started_) {
          buffer_.erase(0, skip_space(buffer_));
          if (buffer_.empty()) return;
        }
        const auto close = buffer_.find(kClose);
        if (close != std::string::npos) {
          std::string_view text = std::string_view(buffer_).substr(0, close);
          while (!text.empty() && is_space(text.back())) text.remove_suffix(1);
          out.reasoning += text;
          buffer_.erase(0, close + kClose.size());
          state_ = state::content_start;
          continue;
        }
        // Hold back a possible "</think>" start and trailing whitespace (dropped if the tag
        // follows it), unless the text has ended.
        std::size_t hold = final ? 0 : partial_tag_tail(buffer_, kClose);
        while (hold < buffer_.size() && is_space(buffer_[buffer_.size() - hold - 1])) ++hold;
        out.reasoning.append(buffer_, 0, buffer_.size() - hold);
        if (buffer_.size() > hold) reasoning_started_ = true;
        buffer_.erase(0, buffer_.size() - hold);
        if (final) buffer_.clear();
        return;
      }
      case state::content_start:
        buffer_.erase(0, skip_space(buffer_));
        if (buffer_.empty()) return;
        state_ = state::content;
        continue;
      case state::content:
        out.content += buffer_;
        buffer_.clear();
        return;
    }
  }
}

reasoning_split reasoning_parser::push(std::string_view text) {
  buffer_ += text;
  reasoning_split out;
  step(out, false);
  return out;
}

reasoning_split reasoning_parser::finish() {
  reasoning_split out;
  step(out, true);
  return out;
}

bool prompt_opens_reasoning(std::string_view prompt) {
  const auto end = prompt.find_last_not_of(" \t\r\n");
  return end != std::string_view::npos && prompt.substr(0, end + 1).ends_with("<think>");
}

reasoning_split split_reasoning(std::string_view text, bool starts_in_reasoning) {
  reasoning_parser parser(starts_in_reasoning);
  reasoning_split out = parser.push(text);
  const reasoning_split rest = parser.finish();
  out.reasoning += rest.reasoning;
  out.content += rest.content;
  return out;
}

}  // namespace shoal::runtime
