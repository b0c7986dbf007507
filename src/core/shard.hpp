// Checks shared by the sharded entry points (sharded_append_kv here, sharded_flash_decode in the MPI
// layer): the shard's arguments against its layout.
#pragma once

#include <vector>

#include "core/checker.hpp"
#include "pflash/shard_layout.hpp"

namespace pflash::detail {

// Throws (through check) unless shard.shard names a shard of the layout, seq_lens has one entry per
// sequence of the local cache, and every local length is what the layout gives this shard of that
// sequence. Returns each sequence's extent on this shard.
std::vector<ShardExtent> check_shard(const Checker& check, const KVCacheShardView& shard);

}  // namespace pflash::detail
