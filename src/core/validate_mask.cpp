#include "core/validate_mask.hpp"

#include <cmath>
#include <string>

namespace pflash::detail {
namespace {

constexpr std::int64_t kMaxPosition = std::int64_t{1} << 40;  // positions far below kNoBound

void check_ids(const Checker& check, const char* name, std::span<const std::int32_t> ids, std::int64_t expected,
               const char* what) {
  if (static_cast<std::int64_t>(ids.size()) != expected) {
    check.fail(name, std::string(what) + " (" + std::to_string(expected) + " values)", std::to_string(ids.size()) + " values");
  }
}

void check_lengths(const Checker& check, const char* name, std::span<const std::int32_t> lengths, std::int64_t batch,
                   std::int64_t max_length) {
  if (lengths.empty()) return;
  check_ids(check, name, lengths, batch, "empty or one length per sequence");
  for (std::size_t b = 0; b < lengths.size(); ++b) {
    if (lengths[b] < 0 || lengths[b] > max_length) {
      check.fail(name, "lengths in 0.." + std::to_string(max_length),
                 std::string(name) + "[" + std::to_string(b) + "] = " + std::to_string(lengths[b]));
    }
  }
}

}  // namespace

MaskGeometry check_geometry(const Checker& check, bool causal, std::int64_t window_left, std::int64_t window_right,
                            std::int64_t chunk_size, std::int64_t query_offset) {
  for (const auto& [name, edge] : {std::pair{"window_left", window_left}, std::pair{"window_right", window_right}}) {
    if (edge < kUnboundedWindow || edge > kMaxPosition) {
      check.fail(name, "a window edge >= 0, or kUnboundedWindow (-1)", std::to_string(edge));
    }
  }
  if (chunk_size < 0 || chunk_size > kMaxPosition) {
    check.fail("chunk_size", "0 (no chunks) or a chunk of positions > 0", std::to_string(chunk_size));
  }
  if (query_offset < -kMaxPosition || query_offset > kMaxPosition) {
    check.fail("query_offset", "a position within +-2^40", std::to_string(query_offset));
  }
  MaskGeometry g;
  if (window_left != kUnboundedWindow) g.lo = -window_left;
  if (window_right != kUnboundedWindow) g.hi = window_right;
  if (causal) g.hi = std::min<std::int64_t>(g.hi, 0);
  g.chunk = chunk_size;
  g.query_offset = query_offset;
  return g;
}

MaskParams check_mask(const Checker& check, const AttentionMask& mask, std::int64_t batch, std::int64_t seq_q,
                      std::int64_t seq_k) {
  MaskParams p;
  p.geometry = check_geometry(check, mask.causal, mask.window_left, mask.window_right, mask.chunk_size,
                              mask.query_offset.value_or(seq_k - seq_q));
  if (mask.q_segment_ids.empty() != mask.kv_segment_ids.empty()) {
    check.fail(mask.q_segment_ids.empty() ? "q_segment_ids" : "kv_segment_ids",
               "segment ids for both queries and keys, or for neither", "only the other's");
  }
  if (!mask.q_segment_ids.empty()) {
    check_ids(check, "q_segment_ids", mask.q_segment_ids, batch * seq_q, "one id per query row, [B * Nq]");
    check_ids(check, "kv_segment_ids", mask.kv_segment_ids, batch * seq_k, "one id per key row, [B * Nk]");
    p.q_segments = mask.q_segment_ids.data();
    p.kv_segments = mask.kv_segment_ids.data();
  }
  check_lengths(check, "q_lengths", mask.q_lengths, batch, seq_q);
  check_lengths(check, "kv_lengths", mask.kv_lengths, batch, seq_k);
  p.q_lengths = mask.q_lengths.empty() ? nullptr : mask.q_lengths.data();
  p.kv_lengths = mask.kv_lengths.empty() ? nullptr : mask.kv_lengths.data();
  return p;
}

float check_soft_cap(const Checker& check, float logits_soft_cap) {
  if (!(logits_soft_cap >= 0.0f) || !std::isfinite(logits_soft_cap)) {
    check.fail("logits_soft_cap", "0 (none) or a finite cap > 0", std::to_string(logits_soft_cap));
  }
  return logits_soft_cap;
}

const float* check_sinks(const Checker& check, const TensorView& sinks, std::int64_t heads_q) {
  if (sinks.empty()) return nullptr;
  check.shaped_like("sinks", sinks, DType::kFloat32, "sink logits are fp32", {heads_q}, "[Hq]",
                    "(one logit per query head)");
  return static_cast<const float*>(sinks.data);
}

}  // namespace pflash::detail
