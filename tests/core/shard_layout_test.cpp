// The sharding rule and sharded_append_kv, without MPI: every shard of a layout lives in this one
// process, so the union of the shards can be checked against one whole cache.
#include <gtest/gtest.h>

#include <vector>

#include "support/errors.hpp"
#include "support/kv_cache.hpp"
#include "support/tensors.hpp"

namespace pflash::testing {
namespace {

TEST(ShardLayout, EvenRangesLongerFirstAndOwners) {
  const ShardLayout layout = ShardLayout::even(10, 4);  // 3, 3, 2, 2
  EXPECT_EQ(layout.bounds(), (std::vector<std::int64_t>{0, 3, 6, 8, 10}));
  EXPECT_EQ(layout.owner(0), 0);
  EXPECT_EQ(layout.owner(5), 1);
  EXPECT_EQ(layout.owner(6), 2);
  EXPECT_EQ(layout.owner(9), 3);
  // A length shorter than the capacity fills the first shards; `after` counts what lies past a shard.
  EXPECT_EQ(layout.extent(0, 4).held, 3);
  EXPECT_EQ(layout.extent(0, 4).after, 1);
  EXPECT_EQ(layout.extent(1, 4).held, 1);
  EXPECT_EQ(layout.extent(1, 4).after, 0);
  EXPECT_EQ(layout.extent(3, 4).held, 0);
  const ShardLayout with_empty(std::vector<std::int64_t>{0, 5, 5, 9});
  EXPECT_EQ(with_empty.size(1), 0);
  EXPECT_EQ(with_empty.owner(5), 2) << "an empty shard owns no position";
  EXPECT_EQ(ShardLayout::even(3, 4).size(3), 0) << "more shards than positions";
}

TEST(ShardLayout, RejectsBadBounds) {
  expect_invalid_argument([] { ShardLayout::even(10, 0); }, "ShardLayout::even", "shards", "at least 1", "0");
  expect_invalid_argument([] { ShardLayout::even(-1, 2); }, "ShardLayout::even", "capacity", "at least 0", "-1");
  expect_invalid_argument([] { ShardLayout(std::vector<std::int64_t>{0}); }, "ShardLayout", "bounds", "at least two entries");
  expect_invalid_argument([] { ShardLayout(std::vector<std::int64_t>{1, 4}); }, "ShardLayout", "bounds", "bounds[0] = 0");
  expect_invalid_argument([] { ShardLayout(std::vector<std::int64_t>{0, 4, 3}); }, "ShardLayout", "bounds",
                          "non-decreasing", "bounds[2] = 3 < bounds[1] = 4");
}

// Three shards (one paged, one contiguous, one paged, as ranks may choose) appended to with the same
// new rows: together they hold exactly what one whole cache appended to holds, ragged lengths and
// appends of several tokens that straddle a shard boundary included.
TEST(ShardedAppendKv, ShardsTogetherEqualTheWholeCache) {
  auto rng = make_rng();
  const std::int64_t batch = 2, heads_kv = 2, dim = 8, capacity = 70, tokens = 3;
  const ShardLayout layout = ShardLayout::even(capacity, 3);  // 24, 23, 23
  TestCache whole(CacheSpec{DType::kFloat32, batch, heads_kv, dim, capacity, 0}, rng);
  whole.fill({20, 1}, rng);
  const std::int64_t page_sizes[3] = {8, 0, 16};
  std::vector<TestCache> shards;
  std::vector<std::int32_t> seq_lens = whole.seq_lens();
  std::vector<std::vector<std::int32_t>> lens_of_shard;
  for (int s = 0; s < 3; ++s) {
    shards.emplace_back(CacheSpec{DType::kFloat32, batch, heads_kv, dim, layout.size(s), page_sizes[s]}, rng);
    std::vector<std::int32_t> held;
    for (std::int32_t len : seq_lens) held.push_back(layout.extent(s, len).held);
    shards.back().fill_from(whole, layout.begin(s), held);
  }
  for (int step = 0; step < 12; ++step) {
    HostTensor k_new(DType::kFloat32, {batch, heads_kv, tokens, dim}), v_new(DType::kFloat32, {batch, heads_kv, tokens, dim});
    k_new.fill_normal(rng);
    v_new.fill_normal(rng);
    append_kv(whole.mutable_view(), k_new.view(), v_new.view());
    const std::vector<std::int32_t> before = seq_lens;
    for (int s = 0; s < 3; ++s) {
      seq_lens = before;  // every rank holds and advances its own copy of the whole lengths
      sharded_append_kv(MutableKVCacheShard{shards[static_cast<std::size_t>(s)].mutable_view(), seq_lens, layout, s},
                        k_new.view(), v_new.view());
    }
    ASSERT_EQ(seq_lens, whole.seq_lens());
  }
  for (std::int64_t b = 0; b < batch; ++b) {
    const HostTensor k = whole.dense_k(b), v = whole.dense_v(b);
    for (std::int64_t p = 0; p < k.shape()[2]; ++p) {
      const int s = layout.owner(p);
      const HostTensor ks = shards[static_cast<std::size_t>(s)].dense_k(b), vs = shards[static_cast<std::size_t>(s)].dense_v(b);
      for (std::int64_t h = 0; h < heads_kv; ++h) {
        for (std::int64_t d = 0; d < dim; ++d) {
          ASSERT_EQ(ks.at(0, h, p - layout.begin(s), d), k.at(0, h, p, d)) << "sequence " << b << " position " << p;
          ASSERT_EQ(vs.at(0, h, p - layout.begin(s), d), v.at(0, h, p, d));
        }
      }
    }
  }
}

TEST(ShardedAppendKv, RejectsWithoutWriting) {
  auto rng = make_rng();
  const ShardLayout layout = ShardLayout::even(20, 2);
  TestCache shard(CacheSpec{DType::kFloat32, 1, 1, 4, 10, 0}, rng);
  std::vector<std::int32_t> seq_lens = {18};
  shard.fill({8}, rng);  // shard 1 holds positions 10..17 of the sequence
  HostTensor k_new(DType::kFloat32, {1, 1, 3, 4}), v_new(DType::kFloat32, {1, 1, 3, 4});
  const std::vector<unsigned char> k_before = shard.k().bytes();
  expect_invalid_argument(
      [&] { sharded_append_kv({shard.mutable_view(), seq_lens, layout, 1}, k_new.view(), v_new.view()); },
      "sharded_append_kv", "shard.seq_lens", "room for 3 more positions within the layout's capacity 20", "seq_lens[0] = 18");
  EXPECT_EQ(shard.k().bytes(), k_before);
  EXPECT_EQ(seq_lens[0], 18);
  expect_invalid_argument(
      [&] { sharded_append_kv({shard.mutable_view(), seq_lens, layout, 0}, k_new.view(), v_new.view()); },
      "sharded_append_kv", "shard.local.seq_lens", "the positions shard 0 holds of each sequence, here 10",
      "local.seq_lens[0] = 8");
  expect_invalid_argument(
      [&] { sharded_append_kv({shard.mutable_view(), seq_lens, layout, 2}, k_new.view(), v_new.view()); },
      "sharded_append_kv", "shard.shard", "a shard of the layout, 0..1", "2");
}

}  // namespace
}  // namespace pflash::testing
