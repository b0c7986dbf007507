#include "support/kv_cache.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace pflash::testing {
namespace {

HostTensor make_storage(const CacheSpec& s, std::int64_t pages_per_seq) {
  if (s.page_size == 0) return HostTensor(s.dtype, {s.batch, s.heads_kv, s.capacity, s.dim}, s.layout);
  const std::int64_t spare = 3;  // pages no sequence uses
  return HostTensor(s.dtype, {s.batch * pages_per_seq + spare, s.heads_kv, s.page_size, s.dim}, s.layout);
}

}  // namespace

TestCache::TestCache(const CacheSpec& spec, std::mt19937_64& rng)
    : spec_(spec),
      pages_per_seq_(spec.page_size > 0 ? (spec.capacity + spec.page_size - 1) / spec.page_size : 0),
      k_(make_storage(spec, pages_per_seq_)),
      v_(make_storage(spec, pages_per_seq_)),
      seq_lens_(static_cast<std::size_t>(spec.batch), 0) {
  k_.poison();
  v_.poison();
  if (spec.page_size > 0) {
    std::vector<std::int32_t> pages(static_cast<std::size_t>(k_.shape()[0]));
    std::iota(pages.begin(), pages.end(), 0);
    std::shuffle(pages.begin(), pages.end(), rng);
    block_table_.assign(pages.begin(), pages.begin() + spec.batch * pages_per_seq_);
  }
}

KVCacheView TestCache::view() const { return {k_.view(), v_.view(), seq_lens_, block_table_}; }

MutableKVCache TestCache::mutable_view() { return {k_.mutable_view(), v_.mutable_view(), seq_lens_, block_table_}; }

std::pair<std::int64_t, std::int64_t> TestCache::locate(std::int64_t b, std::int64_t p) const {
  if (spec_.page_size == 0) return {b, p};
  return {block_table_[static_cast<std::size_t>(b * pages_per_seq_ + p / spec_.page_size)], p % spec_.page_size};
}

void TestCache::fill(const std::vector<std::int32_t>& lengths, std::mt19937_64& rng, double stddev) {
  std::normal_distribution<double> normal(0.0, stddev);
  seq_lens_ = lengths;
  for (std::int64_t b = 0; b < spec_.batch; ++b) {
    for (std::int64_t p = 0; p < lengths[static_cast<std::size_t>(b)]; ++p) {
      const auto [i0, i2] = locate(b, p);
      for (std::int64_t h = 0; h < spec_.heads_kv; ++h) {
        for (std::int64_t d = 0; d < spec_.dim; ++d) {
          k_.set(normal(rng), i0, h, i2, d);
          v_.set(normal(rng), i0, h, i2, d);
        }
      }
    }
  }
}

void TestCache::fill_from(const TestCache& whole, std::int64_t first, const std::vector<std::int32_t>& lengths) {
  seq_lens_ = lengths;
  for (std::int64_t b = 0; b < spec_.batch; ++b) {
    for (std::int64_t p = 0; p < lengths[static_cast<std::size_t>(b)]; ++p) {
      const auto [i0, i2] = locate(b, p);
      const auto [w0, w2] = whole.locate(b, first + p);
      for (std::int64_t h = 0; h < spec_.heads_kv; ++h) {
        for (std::int64_t d = 0; d < spec_.dim; ++d) {
          k_.set(whole.k_.at(w0, h, w2, d), i0, h, i2, d);
          v_.set(whole.v_.at(w0, h, w2, d), i0, h, i2, d);
        }
      }
    }
  }
}

HostTensor TestCache::dense(const HostTensor& t, std::int64_t b) const {
  const std::int64_t length = seq_lens_[static_cast<std::size_t>(b)];
  HostTensor out(spec_.dtype, {1, spec_.heads_kv, length, spec_.dim});
  for (std::int64_t p = 0; p < length; ++p) {
    const auto [i0, i2] = locate(b, p);
    for (std::int64_t h = 0; h < spec_.heads_kv; ++h)
      for (std::int64_t d = 0; d < spec_.dim; ++d) out.set(t.at(i0, h, i2, d), 0, h, p, d);
  }
  return out;
}

HostTensor slice_batch(const HostTensor& t, std::int64_t b) {
  const auto& s = t.shape();
  HostTensor out(t.dtype(), {1, s[1], s[2], s[3]});
  for (std::int64_t h = 0; h < s[1]; ++h)
    for (std::int64_t n = 0; n < s[2]; ++n)
      for (std::int64_t d = 0; d < s[3]; ++d) out.set(t.at(b, h, n, d), 0, h, n, d);
  return out;
}

ReferenceOutput reference_decode(const TestCache& cache, const HostTensor& q, double scale, const DecodeOptions& opt) {
  ReferenceOutput out;
  const std::int64_t tokens = q.shape()[2];
  for (std::int64_t b = 0; b < q.shape()[0]; ++b) {
    const HostTensor k = cache.dense_k(b), v = cache.dense_v(b), q_b = slice_batch(q, b);
    const std::int64_t length = k.shape()[2];
    // Token t sits at position length - T + t: causal, within the window and its chunk.
    ReferenceMask mask;
    mask.visible = [=](std::int64_t, std::int64_t t, std::int64_t j) {
      const std::int64_t p = length - tokens + t;
      if (j > p || (opt.window_left >= 0 && j < p - opt.window_left)) return false;
      return opt.chunk_size == 0 || (p >= 0 && j / opt.chunk_size == p / opt.chunk_size);
    };
    mask.soft_cap = opt.soft_cap;
    mask.sinks = opt.sinks;
    const ReferenceOutput part = reference_attention(to_dense(q_b), to_dense(k), to_dense(v), mask, scale);
    out.o.insert(out.o.end(), part.o.begin(), part.o.end());
    out.lse.insert(out.lse.end(), part.lse.begin(), part.lse.end());
  }
  return out;
}

}  // namespace pflash::testing
