// A key/value cache for incremental decoding, in one of two layouts:
//   contiguous: k, v are [B, Hkv, capacity, D]; sequence b's position p is row p of batch entry b.
//   paged:      k, v are a pool of pages [num_pages, Hkv, page_size, D], page_size a power of two
//               from 8 to 512, and block_table[b * pages_per_seq + i] is the page that holds
//               sequence b's positions [i * page_size, (i + 1) * page_size) (vLLM's layout; its
//               [num_pages, page_size, Hkv, D] memory order is the same view with other strides).
// seq_lens[b] is the number of positions sequence b holds. The views are non-owning, like TensorView.
#pragma once

#include <cstdint>
#include <span>
#include <type_traits>

#include "pflash/tensor.hpp"

namespace pflash {

inline constexpr std::int64_t kMinPageSize = 8;
inline constexpr std::int64_t kMaxPageSize = 512;

template <class Pointer, class Length>
struct BasicKVCache {
  BasicTensorView<Pointer> k;
  BasicTensorView<Pointer> v;
  std::span<Length> seq_lens;                 // [B]
  std::span<const std::int32_t> block_table;  // paged: [B * pages_per_seq] page ids; empty: contiguous

  bool paged() const { return !block_table.empty(); }
  std::int64_t batch() const { return static_cast<std::int64_t>(seq_lens.size()); }
  std::int64_t pages_per_seq() const { return batch() > 0 ? static_cast<std::int64_t>(block_table.size()) / batch() : 0; }

  // A writable cache is readable.
  operator BasicKVCache<const void*, const std::int32_t>() const  // NOLINT(google-explicit-constructor)
    requires(!std::is_same_v<Pointer, const void*>)
  {
    return {k, v, seq_lens, block_table};
  }
};

using KVCacheView = BasicKVCache<const void*, const std::int32_t>;  // what decoding reads
using MutableKVCache = BasicKVCache<void*, std::int32_t>;           // what appending writes

// Appends T new positions to every sequence: k_new, v_new are [B, Hkv, T, D] in the cache's dtype;
// row t goes to position seq_lens[b] + t, then seq_lens[b] += T. Writes only those rows and the
// lengths. Throws pflash::Error (nothing written) when a sequence would pass its capacity (contiguous)
// or its block table (paged), or a page id it needs is outside the pool.
void append_kv(const MutableKVCache& cache, TensorView k_new, TensorView v_new);

}  // namespace pflash
