// sharded_flash_decode over however many ranks mpirun started (1, 2 or 4 in CI): each rank holds
// only its shard of a cache every rank can rebuild from the shared seed, and the result on every rank
// must equal the single-device decode of the whole cache and the float64 reference. Checks come after
// every collective, so a failing rank never leaves the others waiting.
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "distributed/world.hpp"
#include "pflash/distributed/sharded_decode.hpp"
#include "pflash/pflash.hpp"
#include "support/kv_cache.hpp"
#include "support/reference.hpp"
#include "support/tensors.hpp"

namespace pflash::testing {
namespace {

enum class Shards { kEven, kEmptySecond };  // kEmptySecond: shard 1 owns nothing and passes no storage

struct Case {
  std::int64_t heads_q, heads_kv, tokens, dim;
  std::int64_t page_size;  // of every rank's shard; 0: contiguous
  std::vector<std::int32_t> lengths;
  std::int64_t capacity;   // the layout's
  DType cache_dtype, q_dtype;
  CombineAlgorithm combine;
  Shards shards = Shards::kEven;
};

std::string describe(const Case& c) {
  std::ostringstream s;
  s << "Hq" << c.heads_q << " Hkv" << c.heads_kv << " T" << c.tokens << " D" << c.dim << " page" << c.page_size
    << " capacity " << c.capacity << " cache " << to_string(c.cache_dtype) << " q " << to_string(c.q_dtype)
    << (c.combine == CombineAlgorithm::kAllReduce ? " allreduce" : c.combine == CombineAlgorithm::kAllGather ? " allgather" : " auto")
    << (c.shards == Shards::kEmptySecond ? " empty-second-shard" : "") << " lengths";
  for (std::int32_t l : c.lengths) s << " " << l;
  return s.str();
}

ShardLayout layout_for(const Case& c, int p) {
  if (c.shards == Shards::kEmptySecond && p >= 2) {
    std::vector<std::int64_t> bounds = ShardLayout::even(c.capacity, p - 1).bounds();
    bounds.insert(bounds.begin() + 1, bounds[1]);
    return ShardLayout(bounds);
  }
  return ShardLayout::even(c.capacity, p);
}

void run_case(const Case& c) {
  SCOPED_TRACE(describe(c));
  const Mesh mesh(MPI_COMM_WORLD, {1, world_size()});
  const int rank = mesh.rank();
  auto rng = make_rng();
  const auto batch = static_cast<std::int64_t>(c.lengths.size());
  TestCache whole(CacheSpec{c.cache_dtype, batch, c.heads_kv, c.dim, c.capacity, 0}, rng);
  whole.fill(c.lengths, rng);
  HostTensor q(c.q_dtype, {batch, c.heads_q, c.tokens, c.dim});
  q.fill_normal(rng);

  const ShardLayout layout = layout_for(c, mesh.size());
  std::vector<std::int32_t> held;
  for (std::int32_t length : c.lengths) held.push_back(layout.extent(rank, length).held);
  TestCache local(CacheSpec{c.cache_dtype, batch, c.heads_kv, c.dim, std::max<std::int64_t>(layout.size(rank), 1), c.page_size},
                  rng);
  local.fill_from(whole, layout.begin(rank), held);
  std::vector<std::int32_t> seq_lens = c.lengths;

  ShardedDecodeParams p;
  p.q = q.view();
  p.cache = KVCacheShardView{local.view(), seq_lens, layout, rank};
  if (layout.size(rank) == 0) p.cache.local.k = p.cache.local.v = TensorView{};
  HostTensor o(c.q_dtype, {batch, c.heads_q, c.tokens, c.dim}), lse(DType::kFloat32, {batch, c.heads_q, c.tokens});
  o.poison();
  lse.poison();
  p.o = o.mutable_view();
  p.lse = lse.mutable_view();
  p.combine = c.combine;
  p.num_threads = 1;
  const ShardedDecodeTimes times = sharded_flash_decode(mesh, p);
  EXPECT_GE(times.local_s, 0.0);
  EXPECT_GE(times.combine_s, 0.0);

  // The single-device decode of the whole cache, and the float64 reference.
  HostTensor o_one(c.q_dtype, {batch, c.heads_q, c.tokens, c.dim}), lse_one(DType::kFloat32, {batch, c.heads_q, c.tokens});
  DecodeParams one;
  one.q = q.view();
  one.cache = whole.view();
  one.o = o_one.mutable_view();
  one.lse = lse_one.mutable_view();
  flash_decode(one);
  const ReferenceOutput ref = reference_decode(whole, q, 1.0 / std::sqrt(static_cast<double>(c.dim)));
  const bool exact = c.cache_dtype == DType::kFloat32 && c.q_dtype == DType::kFloat32;
  EXPECT_LT(relative_l2_error(o, ref.o), exact ? 1e-5 : 1e-2);
  EXPECT_TRUE(o.all_finite_or_neg_inf());
  std::vector<double> o_single(static_cast<std::size_t>(o_one.numel()));
  for (std::int64_t i = 0; i < o_one.numel(); ++i) {
    o_single[static_cast<std::size_t>(i)] = o_one.at(i / (c.heads_q * c.tokens * c.dim), i / (c.tokens * c.dim) % c.heads_q,
                                                    i / c.dim % c.tokens, i % c.dim);
  }
  EXPECT_LT(relative_l2_error(o, o_single), exact ? 1e-6 : 1e-2) << "against the single-device decode";
  for (std::int64_t b = 0; b < batch; ++b) {
    for (std::int64_t h = 0; h < c.heads_q; ++h) {
      for (std::int64_t t = 0; t < c.tokens; ++t) {
        const double expected = ref.lse[static_cast<std::size_t>((b * c.heads_q + h) * c.tokens + t)];
        EXPECT_TRUE(lse_near(lse.at(b, h, t), expected, 1e-4)) << "sequence " << b << " head " << h << " token " << t;
      }
    }
  }
}

TEST(ShardedDecode, EqualsSingleDeviceDecode) {
  const DType bf16 = DType::kBFloat16, fp32 = DType::kFloat32;
  const CombineAlgorithm reduce = CombineAlgorithm::kAllReduce, gather = CombineAlgorithm::kAllGather,
                         automatic = CombineAlgorithm::kAuto;
  const std::vector<Case> cases = {
      {8, 2, 1, 64, 0, {1000, 333}, 1001, fp32, fp32, reduce},           // capacity not divisible by 2 or 4
      {8, 2, 1, 64, 0, {1000, 333}, 1001, fp32, fp32, gather},
      {32, 8, 1, 128, 64, {2047}, 2050, bf16, bf16, automatic},         // the benchmark's heads, paged shards
      {8, 1, 3, 96, 16, {700, 5, 0}, 800, bf16, fp32, reduce},          // MQA, 3 tokens, an empty sequence
      {4, 2, 16, 40, 0, {301, 17}, 310, fp32, bf16, gather},            // 16 tokens that cross shard boundaries
      {4, 4, 2, 32, 8, {90, 3}, 400, fp32, fp32, reduce},               // later shards empty (short sequences)
      {8, 2, 1, 64, 0, {500, 77}, 600, fp32, fp32, gather, Shards::kEmptySecond},
      {8, 2, 4, 64, 16, {500, 77}, 600, bf16, bf16, reduce, Shards::kEmptySecond},
  };
  for (const Case& c : cases) run_case(c);
}

// A generation loop: each step appends a token's K/V to the owning shard only and decodes it over
// the mesh; every step equals single-device append + decode of the whole cache.
TEST(ShardedDecode, GenerationLoopWithShardedAppends) {
  const Mesh mesh(MPI_COMM_WORLD, {1, world_size()});
  const int rank = mesh.rank();
  for (const std::int64_t page_size : {0, 8}) {
    auto rng = make_rng();
    const std::int64_t batch = 2, heads_q = 4, heads_kv = 2, dim = 32, steps = 40, capacity = 100;
    TestCache whole(CacheSpec{DType::kFloat32, batch, heads_kv, dim, capacity, 0}, rng);
    whole.fill({50, 0}, rng);
    const ShardLayout layout = ShardLayout::even(capacity, mesh.size());
    std::vector<std::int32_t> seq_lens = whole.seq_lens(), held;
    for (std::int32_t length : seq_lens) held.push_back(layout.extent(rank, length).held);
    TestCache local(CacheSpec{DType::kFloat32, batch, heads_kv, dim, layout.size(rank), page_size}, rng);
    local.fill_from(whole, layout.begin(rank), held);
    double worst = 0.0;
    for (std::int64_t step = 0; step < steps; ++step) {
      HostTensor q(DType::kFloat32, {batch, heads_q, 1, dim}), k_new(DType::kFloat32, {batch, heads_kv, 1, dim}),
          v_new(DType::kFloat32, {batch, heads_kv, 1, dim}), o(DType::kFloat32, {batch, heads_q, 1, dim}),
          o_one(DType::kFloat32, {batch, heads_q, 1, dim});
      q.fill_normal(rng);
      k_new.fill_normal(rng);
      v_new.fill_normal(rng);
      o.poison();
      append_kv(whole.mutable_view(), k_new.view(), v_new.view());
      sharded_append_kv(MutableKVCacheShard{local.mutable_view(), seq_lens, layout, rank}, k_new.view(), v_new.view());
      ShardedDecodeParams p;
      p.q = q.view();
      p.cache = KVCacheShardView{local.view(), seq_lens, layout, rank};
      p.o = o.mutable_view();
      p.combine = step % 2 ? CombineAlgorithm::kAllReduce : CombineAlgorithm::kAllGather;
      sharded_flash_decode(mesh, p);
      DecodeParams one;
      one.q = q.view();
      one.cache = whole.view();
      one.o = o_one.mutable_view();
      flash_decode(one);
      std::vector<double> expected;
      for (std::int64_t i = 0; i < batch * heads_q * dim; ++i) expected.push_back(o_one.at(i / (heads_q * dim), i / dim % heads_q, 0, i % dim));
      worst = std::max(worst, relative_l2_error(o, expected));
    }
    EXPECT_LT(worst, 1e-6) << "page size " << page_size;
    EXPECT_EQ(seq_lens, whole.seq_lens());
  }
}

struct ErrorSeen {
  std::optional<ErrorCode> code;
  std::string message;
};

template <class Call>
ErrorSeen error_of(Call&& call) {
  try {
    call();
  } catch (const Error& e) {
    return {e.code(), e.what()};
  }
  return {};
}

// Bad arguments on one rank: that rank gets its own error, every other rank an error naming it, and
// nobody waits forever.
TEST(ShardedDecode, OneRankBadArgumentsFailEveryRank) {
  const Mesh mesh(MPI_COMM_WORLD, {1, world_size()});
  const int rank = mesh.rank(), last = mesh.size() - 1;
  auto rng = make_rng();
  const ShardLayout layout = ShardLayout::even(64, mesh.size());
  TestCache local(CacheSpec{DType::kFloat32, 1, 2, 16, std::max<std::int64_t>(layout.size(rank), 1), 0}, rng);
  std::vector<std::int32_t> seq_lens = {40}, held = {layout.extent(rank, 40).held};
  local.fill(held, rng);
  HostTensor q(DType::kFloat32, {1, 4, 1, 16}), o(DType::kFloat32, {1, 4, 1, 16}), o_bad(DType::kFloat32, {1, 4, 1, 15});
  q.fill_normal(rng);
  ShardedDecodeParams p;
  p.q = q.view();
  p.cache = KVCacheShardView{local.view(), seq_lens, layout, rank};
  p.o = rank == last ? o_bad.mutable_view() : o.mutable_view();
  const ErrorSeen seen = error_of([&] { sharded_flash_decode(mesh, p); });
  ASSERT_TRUE(seen.code.has_value()) << "rank " << rank << " returned normally";
  if (rank == last) {
    EXPECT_EQ(*seen.code, ErrorCode::kInvalidArgument);
    EXPECT_EQ(seen.message.rfind("sharded_flash_decode: argument 'o': expected shape [1, 4, 1, 16]", 0), 0u) << seen.message;
  } else {
    EXPECT_EQ(*seen.code, ErrorCode::kPeerFailed);
    EXPECT_NE(seen.message.find("rank " + std::to_string(last) + " of the mesh failed: sharded_flash_decode: argument 'o'"),
              std::string::npos)
        << seen.message;
  }

  // The shard index and the layout must match the mesh.
  p.o = o.mutable_view();
  p.cache.shard = (rank + 1) % (mesh.size() + 1);
  const ErrorSeen wrong_shard = error_of([&] { sharded_flash_decode(mesh, p); });
  EXPECT_TRUE(wrong_shard.code.has_value());
  EXPECT_NE(wrong_shard.message.find("argument 'cache.shard': expected this rank's index in the mesh"), std::string::npos)
      << wrong_shard.message;
  p.cache = KVCacheShardView{local.view(), seq_lens, ShardLayout::even(64, mesh.size() + 1), rank};
  const ErrorSeen wrong_layout = error_of([&] { sharded_flash_decode(mesh, p); });
  ASSERT_TRUE(wrong_layout.code.has_value());
  EXPECT_EQ(*wrong_layout.code, ErrorCode::kInvalidArgument) << "every rank failed on its own";
  EXPECT_NE(wrong_layout.message.find("argument 'cache.layout': expected one shard per rank"), std::string::npos)
      << wrong_layout.message;
  p.cache = KVCacheShardView{local.view(), seq_lens, layout, rank};
  p.combine = static_cast<CombineAlgorithm>(7);
  const ErrorSeen wrong_combine = error_of([&] { sharded_flash_decode(mesh, p); });
  ASSERT_TRUE(wrong_combine.code.has_value());
  EXPECT_EQ(*wrong_combine.code, ErrorCode::kInvalidArgument);
  EXPECT_NE(wrong_combine.message.find("argument 'combine': expected kAuto, kAllReduce or kAllGather"), std::string::npos)
      << wrong_combine.message;
}

TEST(ShardedDecode, RanksMustAgreeOnTheProblemSize) {
  const Mesh mesh(MPI_COMM_WORLD, {1, world_size()});
  if (mesh.size() < 2) GTEST_SKIP() << "needs two ranks";
  const int rank = mesh.rank();
  auto rng = make_rng();
  const ShardLayout layout = ShardLayout::even(64, mesh.size());
  TestCache local(CacheSpec{DType::kFloat32, 1, 2, 16, layout.size(rank), 0}, rng);
  std::vector<std::int32_t> seq_lens = {64}, held = {static_cast<std::int32_t>(layout.size(rank))};
  local.fill(held, rng);
  const std::int64_t tokens = rank == 0 ? 1 : 2;
  HostTensor q(DType::kFloat32, {1, 4, tokens, 16}), o(DType::kFloat32, {1, 4, tokens, 16});
  q.fill_normal(rng);
  ShardedDecodeParams p;
  p.q = q.view();
  p.cache = KVCacheShardView{local.view(), seq_lens, layout, rank};
  p.o = o.mutable_view();
  const ErrorSeen seen = error_of([&] { sharded_flash_decode(mesh, p); });
  ASSERT_TRUE(seen.code.has_value());
  EXPECT_NE(seen.message.find("expected the same shape on every rank"), std::string::npos) << seen.message;
}

}  // namespace
}  // namespace pflash::testing
