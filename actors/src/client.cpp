#include "shoal/actors/client.hpp"

#include "client_impl.hpp"
#include "cluster_impl.hpp"
#include "remote.hpp"

#include <caf/exit_reason.hpp>
#include <caf/scoped_actor.hpp>
#include <caf/typed_event_based_actor.hpp>

#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>

namespace shoal {

actors::token_sink_actor::behavior_type make_client_sink(actors::token_sink_actor::pointer self,
                                                         std::shared_ptr<client_inbox> box) {
  (void)self;
  return {
      [box](actors::token_chunk& chunk) {
        std::shared_ptr<std::function<void(const actors::token_chunk&)>> callback;
        {
          std::lock_guard lock(box->mutex);
          if (auto it = box->callbacks.find(chunk.request); it != box->callbacks.end()) {
            callback = it->second;
            if (chunk.finish != actors::finish_reason::none) box->callbacks.erase(it);
          } else {
            box->chunks[chunk.request].push_back(std::move(chunk));
          }
        }
        // One sink actor per client: callbacks of a request run one at a time, in order.
        if (callback)
          (*callback)(chunk);
        else
          box->arrived.notify_all();
      },
  };
}

client::client(actors::local_cluster& cluster) : impl_(std::make_unique<impl>()) {
  auto& c = cluster.internals();
  impl_->system = c.system.get();
  impl_->router = c.router;
  impl_->supervisor = c.supervisor;
  impl_->sink = impl_->system->spawn(make_client_sink, impl_->box);
}

client::client(std::unique_ptr<impl> state) : impl_(std::move(state)) {}

std::string client::admin(const std::string& command, const std::vector<std::string>& args, const std::string& token,
                          std::chrono::milliseconds timeout) {
  caf::scoped_actor self{*impl_->system};
  std::string out;
  std::optional<shoal::error> failure;
  self->request(impl_->supervisor, timeout, actors::admin_atom::value,
                actors::admin_request{.command = command, .args = args, .token = token})
      .receive([&](std::string& s) { out = std::move(s); },
               [&](caf::error& e) { failure = actors::from_caf_error(e); });
  if (failure) throw *failure;
  return out;
}

std::string client::status(std::chrono::milliseconds timeout) {
  caf::scoped_actor self{*impl_->system};
  std::string out;
  std::optional<shoal::error> failure;
  self->request(impl_->supervisor, timeout, actors::status_atom::value)
      .receive([&](std::string& s) { out = std::move(s); },
               [&](caf::error& e) { failure = actors::from_caf_error(e); });
  if (failure) throw *failure;
  return out;
}

client::impl::~impl() {
  if (sink) caf::anon_send_exit(sink, caf::exit_reason::user_shutdown);
  sink = nullptr;
  router = nullptr;
  if (remote) remote->stop();
  remote.reset();
}

client::~client() = default;

std::uint64_t client::submit(const generate_options& options) { return submit(options, nullptr); }

std::uint64_t client::submit(const generate_options& options, std::function<void(const token_event&)> on_chunk) {
  std::uint64_t id;
  {
    std::lock_guard lock(impl_->ids_mutex);
    id = impl_->next_id++;
  }
  if (on_chunk) {
    std::lock_guard lock(impl_->box->mutex);
    impl_->box->callbacks.emplace(id, std::make_shared<std::function<void(const token_event&)>>(std::move(on_chunk)));
  }
  actors::generate_request request{.request = id, .prompt = options.prompt, .sampling = options.sampling,
                                   .max_tokens = options.max_tokens, .stop_tokens = options.stop_tokens,
                                   .want_logits = options.want_logits, .deadline_unix_ms = 0};
  if (options.deadline.count() > 0)
    request.deadline_unix_ms = static_cast<std::uint64_t>(
        std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch() +
                                                              options.deadline)
            .count());
  caf::anon_send(impl_->router, std::move(request), impl_->sink);
  return id;
}

std::optional<token_event> client::next(std::uint64_t id, std::chrono::milliseconds timeout) {
  std::unique_lock lock(impl_->box->mutex);
  auto& queue = impl_->box->chunks[id];
  if (!impl_->box->arrived.wait_for(lock, timeout, [&] { return !queue.empty(); })) return std::nullopt;
  auto chunk = std::move(queue.front());
  queue.pop_front();
  if (chunk.finish != actors::finish_reason::none && queue.empty()) impl_->box->chunks.erase(id);
  return chunk;
}

void client::cancel(std::uint64_t id) { caf::anon_send(impl_->router, actors::cancel_atom::value, id, impl_->sink); }

generate_result client::generate(const generate_options& options, std::chrono::milliseconds timeout) {
  const auto id = submit(options);
  generate_result result;
  while (true) {
    auto chunk = next(id, timeout);
    if (!chunk) {
      cancel(id);
      shoal::fail(errc::deadline_exceeded, "no tokens from the router for {} ms (request {}, {} tokens so far)",
                  timeout.count(), id, result.tokens.size());
    }
    if (chunk->finish == actors::finish_reason::error)
      throw shoal::error(static_cast<errc>(chunk->error_code), chunk->error);
    result.tokens.insert(result.tokens.end(), chunk->tokens.begin(), chunk->tokens.end());
    result.logits.insert(result.logits.end(), chunk->logits.begin(), chunk->logits.end());
    if (chunk->finish != actors::finish_reason::none) {
      result.finish = chunk->finish;
      return result;
    }
  }
}

}  // namespace shoal
