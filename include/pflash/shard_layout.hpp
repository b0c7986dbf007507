// A KV cache sharded by position over P shards (the ranks of a mesh, in rank order), and one rank's
// part of it.
//
// The rule: shard s owns positions [bounds[s], bounds[s+1]) of every sequence, contiguous ranges in
// shard order. ShardLayout::even(capacity, P) cuts [0, capacity) into P ranges of ceil or floor
// (capacity / P) positions, the longer ones first. A sequence shorter than the capacity therefore
// fills the first shards and leaves the later ones partly or wholly empty, and a new token is written
// only by the shard that owns its position. Each shard stores its positions from row 0 of its own
// (contiguous or paged) cache: global position p of shard s is its local position p - bounds[s].
#pragma once

#include <cstdint>
#include <span>
#include <type_traits>
#include <vector>

#include "pflash/kv_cache.hpp"
#include "pflash/tensor.hpp"

namespace pflash {

// What one shard holds of a sequence of some length: `held` positions, with `after` more of the
// sequence's positions past its range (the decode's positions_after).
struct ShardExtent {
  std::int32_t held = 0;
  std::int32_t after = 0;
};

class ShardLayout {
 public:
  // P contiguous ranges covering [0, capacity); throws pflash::Error for shards < 1 or capacity < 0.
  static ShardLayout even(std::int64_t capacity, int shards);
  // Explicit boundaries: bounds[0] = 0, non-decreasing, one more entry than there are shards.
  explicit ShardLayout(std::vector<std::int64_t> bounds);

  int shards() const { return static_cast<int>(bounds_.size()) - 1; }
  std::int64_t capacity() const { return bounds_.back(); }
  std::int64_t begin(int shard) const { return bounds_[static_cast<std::size_t>(shard)]; }
  std::int64_t end(int shard) const { return bounds_[static_cast<std::size_t>(shard) + 1]; }
  std::int64_t size(int shard) const { return end(shard) - begin(shard); }
  int owner(std::int64_t position) const;  // the shard that holds a position < capacity()
  ShardExtent extent(int shard, std::int64_t length) const;
  const std::vector<std::int64_t>& bounds() const { return bounds_; }

 private:
  std::vector<std::int64_t> bounds_;
};

// One rank's part of a sharded cache: `local` holds this shard's positions of each sequence, from
// row 0, and local.seq_lens[b] = layout.extent(shard, seq_lens[b]).held; seq_lens are the whole
// sequences' lengths, the same on every rank.
template <class Pointer, class Length>
struct BasicKVCacheShard {
  BasicKVCache<Pointer, Length> local;
  std::span<Length> seq_lens;  // [B]
  ShardLayout layout = ShardLayout::even(0, 1);
  int shard = 0;

  // A writable shard is readable.
  operator BasicKVCacheShard<const void*, const std::int32_t>() const  // NOLINT(google-explicit-constructor)
    requires(!std::is_same_v<Pointer, const void*>)
  {
    return {local, seq_lens, layout, shard};
  }
};

using KVCacheShardView = BasicKVCacheShard<const void*, const std::int32_t>;
using MutableKVCacheShard = BasicKVCacheShard<void*, std::int32_t>;

// Appends T new positions to every sequence, as append_kv does for a whole cache: k_new, v_new
// ([B, Hkv, T, D], identical on every rank) hold the new rows; this rank writes only the rows whose
// positions it owns, then every rank advances seq_lens[b] by T (and its local lengths by what it
// wrote). Throws pflash::Error, writing nothing, when a sequence would pass the layout's capacity or
// the shard's arguments disagree with the layout.
void sharded_append_kv(const MutableKVCacheShard& shard, TensorView k_new, TensorView v_new);

}  // namespace pflash
