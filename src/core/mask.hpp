// The mask a backend receives (pflash/mask.hpp, validated): the one function every CPU kernel asks
// "which keys does this query see", as a range of key rows, and its transpose. The kernels' tiles
// take per-row ranges, so a new rule changes what produces the ranges, not the kernels.
//
// The geometry (causal, window, chunk) gives every query position one interval of key positions;
// lengths cut it; segment ids give the hull of the keys with the query's id (the interval from its
// first to its last key). Where every segment's keys and queries are contiguous (packed documents)
// the ranges are exact; otherwise (ids that recur apart) the kernels also compare ids per score
// inside the range (`elementwise()`), and a key of another segment inside a row's range adds 0 * v
// to that row rather than nothing.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace pflash::detail {

struct Range {
  std::int64_t first = 0;
  std::int64_t end = 0;  // exclusive; empty when end <= first

  bool empty() const { return end <= first; }
  std::int64_t size() const { return std::max<std::int64_t>(end - first, 0); }
  // The part of this range inside `other`: always within other's bounds, empty or not.
  Range intersect(Range other) const {
    const std::int64_t f = std::clamp(first, other.first, std::max(other.first, other.end));
    return {f, std::clamp(std::min(end, other.end), f, std::max(f, other.end))};
  }
};

inline constexpr std::int64_t kNoBound = INT64_MAX / 4;  // a band edge that does not bound

// Positions: query row i at query_offset + i, key row j at j. A query at position p sees the keys at
// positions s with lo <= s - p <= hi (the band: causal and window) in p's chunk.
struct MaskGeometry {
  std::int64_t lo = -kNoBound;
  std::int64_t hi = kNoBound;
  std::int64_t chunk = 0;  // 0: none
  std::int64_t query_offset = 0;

  bool causal() const { return hi <= 0; }
  bool full() const { return lo == -kNoBound && hi == kNoBound && chunk == 0; }

  // Key positions a query at position p sees, clipped to [0, seq_k).
  Range keys_at(std::int64_t p, std::int64_t seq_k) const {
    Range r{0, seq_k};
    if (lo != -kNoBound) r.first = std::max(r.first, p + lo);
    if (hi != kNoBound) r.end = std::min(r.end, p + hi + 1);
    if (chunk > 0) {
      const std::int64_t start = floor_div(p, chunk) * chunk;
      r.first = std::max(r.first, start);
      r.end = std::min(r.end, start + chunk);
    }
    r.first = std::clamp<std::int64_t>(r.first, 0, seq_k);
    r.end = std::clamp<std::int64_t>(r.end, r.first, seq_k);
    return r;
  }

  // Query positions that see the key at position s (unclipped).
  Range positions_seeing(std::int64_t s) const {
    Range r{-kNoBound, kNoBound};
    if (hi != kNoBound) r.first = s - hi;
    if (lo != -kNoBound) r.end = s - lo + 1;
    if (chunk > 0) {
      const std::int64_t start = floor_div(s, chunk) * chunk;
      r.first = std::max(r.first, start);
      r.end = std::min(r.end, start + chunk);
    }
    return r;
  }

  static std::int64_t floor_div(std::int64_t x, std::int64_t d) { return x >= 0 ? x / d : -((-x + d - 1) / d); }
};

struct MaskParams {
  MaskGeometry geometry;
  const std::int32_t* q_segments = nullptr;   // [B * Nq], with kv_segments
  const std::int32_t* kv_segments = nullptr;  // [B * Nk]
  const std::int32_t* q_lengths = nullptr;    // [B]
  const std::int32_t* kv_lengths = nullptr;   // [B]

  bool has_segments() const { return q_segments != nullptr; }
  // Whether every query sees every key.
  bool full() const {
    return geometry.full() && q_segments == nullptr && q_lengths == nullptr && kv_lengths == nullptr;
  }
};

// The ranges of one attention call, built once per call (the segment hulls: O(B * (Nq + Nk)) ints).
class RowRanges {
 public:
  RowRanges(const MaskParams& mask, std::int64_t batch, std::int64_t seq_q, std::int64_t seq_k);

  // Key rows query row i of batch entry b may see.
  Range keys_of_row(std::int64_t b, std::int64_t i) const {
    if (mask_.q_lengths != nullptr && i >= mask_.q_lengths[b]) return {};
    Range r = mask_.geometry.keys_at(mask_.geometry.query_offset + i, seq_k_);
    if (mask_.kv_lengths != nullptr) r = r.intersect({0, mask_.kv_lengths[b]});
    if (mask_.has_segments()) r = r.intersect(q_hull_[static_cast<std::size_t>(b * seq_q_ + i)]);
    return r;
  }

  // Query rows that may see key row j of batch entry b.
  Range rows_of_key(std::int64_t b, std::int64_t j) const {
    if (mask_.kv_lengths != nullptr && j >= mask_.kv_lengths[b]) return {};
    const Range p = mask_.geometry.positions_seeing(j);
    const std::int64_t offset = mask_.geometry.query_offset;  // |offset| < 2^62: no overflow below
    Range r = Range{0, seq_q_}.intersect({p.first - offset, p.end - offset});
    if (mask_.q_lengths != nullptr) r = r.intersect({0, mask_.q_lengths[b]});
    if (mask_.has_segments()) r = r.intersect(k_hull_[static_cast<std::size_t>(b * seq_k_ + j)]);
    return r;
  }

  // Whether ranges alone are not exact: segment ids that recur apart, to compare per score.
  bool elementwise() const { return elementwise_; }
  bool same_segment(std::int64_t b, std::int64_t i, std::int64_t j) const {
    return mask_.q_segments[b * seq_q_ + i] == mask_.kv_segments[b * seq_k_ + j];
  }
  const MaskParams& mask() const { return mask_; }

 private:
  MaskParams mask_;
  std::int64_t seq_q_, seq_k_;
  std::vector<Range> q_hull_;  // per query row: the hull of the keys with its id
  std::vector<Range> k_hull_;  // per key: the hull of the query rows with its id
  bool elementwise_ = false;
};

}  // namespace pflash::detail
