// RowRanges: the segment hulls of one call.
#include "core/mask.hpp"

#include <unordered_map>

namespace pflash::detail {
namespace {

// Per row of `rows` (ids of one batch entry), the hull of the positions in `other` holding its id;
// and whether each id's positions in `other` are contiguous (so the hull holds only that id).
bool hulls(const std::int32_t* rows, std::int64_t num_rows, const std::int32_t* other, std::int64_t num_other,
           Range* out) {
  struct Span {
    std::int64_t first, end, count;
  };
  std::unordered_map<std::int32_t, Span> spans;
  spans.reserve(static_cast<std::size_t>(num_other));
  for (std::int64_t j = 0; j < num_other; ++j) {
    auto [it, inserted] = spans.try_emplace(other[j], Span{j, j + 1, 1});
    if (!inserted) {
      it->second.end = j + 1;
      ++it->second.count;
    }
  }
  bool contiguous = true;
  for (const auto& [id, span] : spans) contiguous &= span.count == span.end - span.first;
  for (std::int64_t i = 0; i < num_rows; ++i) {
    const auto it = spans.find(rows[i]);
    out[i] = it == spans.end() ? Range{} : Range{it->second.first, it->second.end};
  }
  return contiguous;
}

}  // namespace

RowRanges::RowRanges(const MaskParams& mask, std::int64_t batch, std::int64_t seq_q, std::int64_t seq_k)
    : mask_(mask), seq_q_(seq_q), seq_k_(seq_k) {
  if (!mask.has_segments()) return;
  q_hull_.resize(static_cast<std::size_t>(batch * seq_q));
  k_hull_.resize(static_cast<std::size_t>(batch * seq_k));
  bool exact = true;
  for (std::int64_t b = 0; b < batch; ++b) {
    const std::int32_t* q_ids = mask.q_segments + b * seq_q;
    const std::int32_t* kv_ids = mask.kv_segments + b * seq_k;
    exact &= hulls(q_ids, seq_q, kv_ids, seq_k, q_hull_.data() + b * seq_q);
    exact &= hulls(kv_ids, seq_k, q_ids, seq_q, k_hull_.data() + b * seq_k);
  }
  elementwise_ = !exact;
}

}  // namespace pflash::detail
