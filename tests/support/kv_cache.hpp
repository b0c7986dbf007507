// A KV cache for tests: contiguous or paged (pages handed out in a shuffled order, with spare pages
// in the pool), every position past a sequence's length poisoned with NaN so that a kernel reading
// one shows up in its output, and dense per-sequence copies for the float64 reference.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "support/reference.hpp"
#include "support/tensors.hpp"

namespace pflash::testing {

struct CacheSpec {
  DType dtype = DType::kBFloat16;
  std::int64_t batch = 1, heads_kv = 1, dim = 64;
  std::int64_t capacity = 256;   // positions per sequence (paged: rounded up to whole pages)
  std::int64_t page_size = 0;    // 0: contiguous
  Layout layout = Layout::kBhnd; // kBnhd: pages (or batch entries) stored [.., N, Hkv, D], as vLLM does
};

class TestCache {
 public:
  TestCache(const CacheSpec& spec, std::mt19937_64& rng);

  KVCacheView view() const;
  MutableKVCache mutable_view();

  // Sets every length, writing random values (normal, stddev) at every position below it.
  void fill(const std::vector<std::int32_t>& lengths, std::mt19937_64& rng, double stddev = 1.0);

  // Sets every length; position p < lengths[b] of sequence b becomes whole's position first + p (a
  // window of another cache with the same heads, dim and dtype: one shard of a sharded cache).
  void fill_from(const TestCache& whole, std::int64_t first, const std::vector<std::int32_t>& lengths);

  // Element d of KV head h at position p of sequence b, in K or (value = true) in V.
  void set(bool value, double x, std::int64_t b, std::int64_t h, std::int64_t p, std::int64_t d) {
    const auto [i0, i2] = locate(b, p);
    (value ? v_ : k_).set(x, i0, h, i2, d);
  }

  // Sequence b's positions [0, seq_lens[b]) as a dense [1, Hkv, seq_lens[b], D] tensor.
  HostTensor dense_k(std::int64_t b) const { return dense(k_, b); }
  HostTensor dense_v(std::int64_t b) const { return dense(v_, b); }

  const CacheSpec& spec() const { return spec_; }
  std::vector<std::int32_t>& seq_lens() { return seq_lens_; }
  std::vector<std::int32_t>& block_table() { return block_table_; }
  std::int64_t pages_per_seq() const { return pages_per_seq_; }
  const HostTensor& k() const { return k_; }
  const HostTensor& v() const { return v_; }

 private:
  // The storage index (i0, i2) of position p of sequence b in the k/v tensors.
  std::pair<std::int64_t, std::int64_t> locate(std::int64_t b, std::int64_t p) const;
  HostTensor dense(const HostTensor& t, std::int64_t b) const;

  CacheSpec spec_;
  std::int64_t pages_per_seq_ = 0;
  HostTensor k_, v_;
  std::vector<std::int32_t> seq_lens_;
  std::vector<std::int32_t> block_table_;
};

// Rows [b] of a [B, H, N, D] tensor as a [1, H, N, D] tensor.
HostTensor slice_batch(const HostTensor& t, std::int64_t b);

// The float64 decode of q [B, Hq, T, D] against the cache, sequence by sequence: query token t of
// sequence b is position L_b - T + t, the bottom-right causal alignment of reference_attention over
// that sequence's dense K/V (an empty sequence: O = 0, LSE = -inf).
// The decode's rules beyond causality (pflash::DecodeParams), for the reference.
struct DecodeOptions {
  std::int64_t window_left = -1;  // -1: unbounded
  std::int64_t chunk_size = 0;
  double soft_cap = 0.0;
  std::vector<double> sinks;  // [Hq] or empty
};

ReferenceOutput reference_decode(const TestCache& cache, const HostTensor& q, double scale,
                                 const DecodeOptions& options = {});

}  // namespace pflash::testing
