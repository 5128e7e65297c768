#include "shoal/gateway/backend.hpp"

namespace shoal::gateway {
namespace {

class engine_backend final : public backend {
 public:
  explicit engine_backend(runtime::engine& engine) : engine_(engine) {}
  std::uint64_t submit(runtime::generation_request request) override { return engine_.submit(std::move(request)); }
  void cancel(std::uint64_t request_id) override { engine_.cancel(request_id); }
  runtime::engine_stats stats() const override { return engine_.stats(); }
  std::int64_t max_sequence_tokens() const override { return engine_.max_sequence_tokens(); }

 private:
  runtime::engine& engine_;
};

}  // namespace

std::unique_ptr<backend> make_engine_backend(runtime::engine& engine) {
  return std::make_unique<engine_backend>(engine);
}

}  // namespace shoal::gateway
