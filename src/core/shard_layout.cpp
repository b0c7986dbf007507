// The position-sharding rule of a KV cache, and appending to one rank's shard.
#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/checker.hpp"
#include "core/params.hpp"
#include "core/shard.hpp"
#include "cpu/backend.hpp"
#include "pflash/error.hpp"
#include "pflash/shard_layout.hpp"

namespace pflash {

ShardLayout ShardLayout::even(std::int64_t capacity, int shards) {
  const detail::Checker check("ShardLayout::even");
  if (shards < 1) check.fail("shards", "at least 1", std::to_string(shards));
  if (capacity < 0) check.fail("capacity", "at least 0", std::to_string(capacity));
  std::vector<std::int64_t> bounds(static_cast<std::size_t>(shards) + 1, 0);
  const std::int64_t base = capacity / shards, longer = capacity % shards;
  for (int s = 0; s < shards; ++s) bounds[static_cast<std::size_t>(s) + 1] = bounds[static_cast<std::size_t>(s)] + base + (s < longer ? 1 : 0);
  return ShardLayout(std::move(bounds));
}

ShardLayout::ShardLayout(std::vector<std::int64_t> bounds) : bounds_(std::move(bounds)) {
  const detail::Checker check("ShardLayout");
  if (bounds_.size() < 2) {
    check.fail("bounds", "at least two entries (one shard: {0, capacity})", std::to_string(bounds_.size()) + " entries");
  }
  if (bounds_.front() != 0) check.fail("bounds", "bounds[0] = 0", std::to_string(bounds_.front()));
  for (std::size_t i = 1; i < bounds_.size(); ++i) {
    if (bounds_[i] < bounds_[i - 1]) {
      check.fail("bounds", "non-decreasing boundaries",
                 "bounds[" + std::to_string(i) + "] = " + std::to_string(bounds_[i]) + " < bounds[" +
                     std::to_string(i - 1) + "] = " + std::to_string(bounds_[i - 1]));
    }
  }
  if (bounds_.back() > INT32_MAX) check.fail("bounds", "a capacity that fits a sequence length (int32)", std::to_string(bounds_.back()));
}

int ShardLayout::owner(std::int64_t position) const {
  // The last shard whose range starts at or before the position and is not empty.
  const auto it = std::upper_bound(bounds_.begin(), bounds_.end() - 1, position);
  return static_cast<int>(it - bounds_.begin()) - 1;
}

ShardExtent ShardLayout::extent(int shard, std::int64_t length) const {
  const std::int64_t held = std::clamp<std::int64_t>(length - begin(shard), 0, size(shard));
  const std::int64_t after = std::max<std::int64_t>(length - end(shard), 0);
  return {static_cast<std::int32_t>(held), static_cast<std::int32_t>(after)};
}

namespace detail {

std::vector<ShardExtent> check_shard(const Checker& check, const KVCacheShardView& shard) {
  const ShardLayout& layout = shard.layout;
  if (shard.shard < 0 || shard.shard >= layout.shards()) {
    check.fail("shard.shard", "a shard of the layout, 0.." + std::to_string(layout.shards() - 1),
               std::to_string(shard.shard));
  }
  if (shard.seq_lens.size() != shard.local.seq_lens.size()) {
    check.fail("shard.seq_lens", "one whole-sequence length per sequence of the local cache (" +
                                     std::to_string(shard.local.seq_lens.size()) + ")",
               std::to_string(shard.seq_lens.size()) + " entries");
  }
  std::vector<ShardExtent> extents(shard.seq_lens.size());
  for (std::size_t b = 0; b < extents.size(); ++b) {
    const std::int32_t length = shard.seq_lens[b];
    if (length < 0 || length > layout.capacity()) {
      check.fail("shard.seq_lens", "lengths from 0 to the layout's capacity " + std::to_string(layout.capacity()),
                 "seq_lens[" + std::to_string(b) + "] = " + std::to_string(length));
    }
    extents[b] = layout.extent(shard.shard, length);
    if (shard.local.seq_lens[b] != extents[b].held) {
      check.fail("shard.local.seq_lens",
                 "the positions shard " + std::to_string(shard.shard) + " holds of each sequence, here " +
                     std::to_string(extents[b].held) + " of positions [" + std::to_string(layout.begin(shard.shard)) +
                     ", " + std::to_string(layout.end(shard.shard)) + ") for sequence " + std::to_string(b) +
                     " of length " + std::to_string(length),
                 "local.seq_lens[" + std::to_string(b) + "] = " + std::to_string(shard.local.seq_lens[b]));
    }
  }
  return extents;
}

}  // namespace detail

namespace {

// Sequence b of a cache, as a cache of one sequence.
MutableKVCache one_sequence(const MutableKVCache& cache, std::size_t b) {
  MutableKVCache one = cache;
  one.seq_lens = cache.seq_lens.subspan(b, 1);
  if (cache.paged()) {
    const auto pages = static_cast<std::size_t>(cache.pages_per_seq());
    one.block_table = cache.block_table.subspan(b * pages, pages);
  } else {
    const auto offset = static_cast<std::int64_t>(b) * cache.k.stride(0);
    one.k.data = static_cast<char*>(cache.k.data) + offset * static_cast<std::int64_t>(size_of(cache.k.dtype));
    one.v.data = static_cast<char*>(cache.v.data) +
                 static_cast<std::int64_t>(b) * cache.v.stride(0) * static_cast<std::int64_t>(size_of(cache.v.dtype));
    one.k.shape[0] = one.v.shape[0] = 1;
  }
  return one;
}

// Rows [first, first + count) of sequence b of a [B, Hkv, T, D] tensor.
TensorView rows_of(TensorView t, std::int64_t b, std::int64_t first, std::int64_t count) {
  t.data = static_cast<const char*>(t.data) +
           (b * t.stride(0) + first * t.stride(2)) * static_cast<std::int64_t>(size_of(t.dtype));
  t.shape[0] = 1;
  t.shape[2] = count;
  return t;
}

}  // namespace

void sharded_append_kv(const MutableKVCacheShard& shard, TensorView k_new, TensorView v_new) {
  const detail::Checker check("sharded_append_kv");
  detail::check_shard(check, shard);
  check.tensor("k_new", k_new, 4, "[B, Hkv, T, D]");
  check.tensor("v_new", v_new, 4, "[B, Hkv, T, D]");
  const std::int64_t batch = shard.local.batch(), tokens = k_new.size(2);
  if (k_new.size(0) != batch) check.fail("k_new", "batch (dimension 0) equal to the cache's " + std::to_string(batch) + " sequences", detail::shape_string(k_new));
  check.shape_is("v_new", v_new, {k_new.size(0), k_new.size(1), k_new.size(2), k_new.size(3)}, "(the shape of k_new)");
  const ShardLayout& layout = shard.layout;
  for (std::int64_t b = 0; b < batch; ++b) {
    const std::int64_t length = shard.seq_lens[static_cast<std::size_t>(b)];
    if (length + tokens > layout.capacity()) {
      check.fail("shard.seq_lens", "room for " + std::to_string(tokens) + " more positions within the layout's capacity " +
                                       std::to_string(layout.capacity()),
                 "seq_lens[" + std::to_string(b) + "] = " + std::to_string(length));
    }
  }

  // Every sequence's part is checked before the first row is written, so the call appends all or nothing.
  std::vector<detail::AppendParams> appends;
  for (std::int64_t b = 0; b < batch; ++b) {
    const std::int64_t length = shard.seq_lens[static_cast<std::size_t>(b)];
    const std::int64_t first = std::max(length, layout.begin(shard.shard)) - length;
    const std::int64_t last = std::min(length + tokens, layout.end(shard.shard)) - length;
    if (last <= first) continue;
    const MutableKVCache one = one_sequence(shard.local, static_cast<std::size_t>(b));
    appends.push_back(detail::make_append_params(one, rows_of(k_new, b, first, last - first),
                                                 rows_of(v_new, b, first, last - first), "sharded_append_kv"));
  }
  for (const detail::AppendParams& p : appends) cpu::append_kv(p);
  for (std::int32_t& length : shard.seq_lens) length += static_cast<std::int32_t>(tokens);
}

}  // namespace pflash
