// FlashDecoding over a KV cache sharded by position across a mesh (see pflash/shard_layout.hpp): every
// rank decodes its own shard (the single-device split-KV kernel, reading only its positions), which
// gives a partial (O, LSE) per query row, and the mesh combines the partials exactly with the merge
// of pflash/merge.hpp. The result on every rank equals flash_decode over the whole cache.
//
// The combine is one collective over the mesh:
//   kAllReduce  MPI_Allreduce with a user-defined, commutative operator that merges two (O, LSE)
//               states; each rank sends and receives one state per row;
//   kAllGather  MPI_Allgather of every rank's states, then each rank merges all P of them locally;
//   kAuto       the one measured faster (kAllGather; see README, "Distributed decode").
// Before combining, the ranks agree (one small all-reduce) on whether every local decode succeeded, so
// bad arguments on one rank are an error on all of them instead of a hang.
#pragma once

#include <optional>

#include "pflash/distributed/mesh.hpp"
#include "pflash/mask.hpp"
#include "pflash/shard_layout.hpp"
#include "pflash/tensor.hpp"

namespace pflash {

enum class CombineAlgorithm { kAuto, kAllReduce, kAllGather };

struct ShardedDecodeParams {
  TensorView q;            // [B, Hq, T, D], the same on every rank
  KVCacheShardView cache;  // this rank's shard; cache.shard is the mesh rank, the layout has mesh.size() shards
  MutableTensorView o;     // [B, Hq, T, D], q's dtype or fp32
  MutableTensorView lse;   // optional [B, Hq, T] fp32

  std::optional<float> softmax_scale;  // default 1/sqrt(D)
  std::int64_t window_left = kUnboundedWindow;  // as in flash_decode (each shard reads only the window's part)
  float logits_soft_cap = 0.0f;                 // as in flash_decode
  TensorView sinks;  // optional [Hq] fp32, the same on every rank: joins the merge once (shard 0's partial)
  int num_splits = 0;   // of this rank's shard, as in flash_decode
  int num_threads = 0;  // per rank; 0: all threads
  CombineAlgorithm combine = CombineAlgorithm::kAuto;
};

// What one call cost this rank: its local decode, and the combine (agreement, collective, merge),
// which includes waiting for the slowest rank.
struct ShardedDecodeTimes {
  double local_s = 0.0;
  double combine_s = 0.0;
};

// Collective over mesh: every rank must call it with the same q (and shapes, combine). Throws
// pflash::Error on every rank when any rank's arguments are invalid (kInvalidArgument on that rank,
// kPeerFailed naming it on the others) or the communication fails.
ShardedDecodeTimes sharded_flash_decode(const Mesh& mesh, const ShardedDecodeParams& params);

}  // namespace pflash
