// flash_decode's and append_kv's argument checks: every bad argument is an error naming it, and a
// rejected append writes nothing.
#include <gtest/gtest.h>

#include <algorithm>
#include <span>
#include <string>
#include <vector>

#include "support/errors.hpp"
#include "support/kv_cache.hpp"
#include "support/tensors.hpp"

namespace pflash::testing {
namespace {

// B = 2 sequences, Hq = 4, Hkv = 2, T = 1, D = 16; the cache holds 20 positions per sequence,
// in pages of 8 when paged (3 pages per sequence, 9 pages in the pool).
struct Fixture {
  explicit Fixture(std::int64_t page_size) : rng(make_rng()), cache(CacheSpec{DType::kFloat32, 2, 2, 16, 20, page_size}, rng) {
    cache.fill({5, 17}, rng);
    q.fill_normal(rng);
  }
  DecodeParams params() {
    DecodeParams p;
    p.q = q.view();
    p.cache = cache.view();
    p.o = o.mutable_view();
    p.lse = lse.mutable_view();
    return p;
  }
  std::mt19937_64 rng;
  TestCache cache;
  HostTensor q{DType::kFloat32, {2, 4, 1, 16}};
  HostTensor o{DType::kFloat32, {2, 4, 1, 16}};
  HostTensor lse{DType::kFloat32, {2, 4, 1}};
};

void expect_decode_invalid(const DecodeParams& p, const std::string& argument, const std::string& expected,
                           const std::string& got = "") {
  expect_invalid_argument([&] { flash_decode(p); }, "flash_decode", argument, expected, got);
}

TEST(ValidateDecode, ValidArgumentsPass) {
  for (std::int64_t page_size : {0, 8}) {
    Fixture f(page_size);
    EXPECT_NO_THROW(flash_decode(f.params()));
  }
}

TEST(ValidateDecode, QueryShape) {
  Fixture f(0);
  HostTensor q17(DType::kFloat32, {2, 4, 17, 16}), q_b3(DType::kFloat32, {3, 4, 1, 16}), q_d8(DType::kFloat32, {2, 4, 1, 8}),
      q_h3(DType::kFloat32, {2, 3, 1, 16});
  auto p = f.params();
  p.q = q17.view();
  expect_decode_invalid(p, "q", "1 to 16 query tokens T", "T = 17");
  p.q = q_b3.view();
  expect_decode_invalid(p, "q", "batch (dimension 0) equal to the cache's 2 sequences", "[3, 4, 1, 16]");
  p.q = q_d8.view();
  expect_decode_invalid(p, "cache.k", "head_dim (dimension 3) equal to q's D = 8", "[2, 2, 20, 16]");
  p.q = q_h3.view();
  expect_decode_invalid(p, "cache.k", "a head count Hkv (dimension 1) dividing Hq = 3", "Hkv = 2");
}

TEST(ValidateDecode, OutputDtypeShapeAndOverlap) {
  Fixture f(0);
  HostTensor o_bf16(DType::kBFloat16, {2, 4, 1, 16}), o_small(DType::kFloat32, {2, 4, 1, 15});
  auto p = f.params();
  p.o = o_bf16.mutable_view();
  expect_decode_invalid(p, "o", "dtype fp32 (o has q's dtype or fp32)", "bf16");
  p.o = o_small.mutable_view();
  expect_decode_invalid(p, "o", "shape [2, 4, 1, 16]", "[2, 4, 1, 15]");
  p.o = MutableTensorView::contiguous(const_cast<void*>(f.cache.k().view().data), DType::kFloat32, {2, 4, 1, 16});
  expect_decode_invalid(p, "o", "memory disjoint from input 'cache.k'");
  p = f.params();
  p.num_splits = 257;
  expect_decode_invalid(p, "num_splits", "0 (automatic) or 1..256", "257");
}

// The lengths, the block table and positions_after are inputs too: an output over any of them is
// rejected (o written over the lengths would change what the rows after it read).
TEST(ValidateDecode, OutputOverTheIndexArrays) {
  for (std::int64_t page_size : {0, 8}) {
    Fixture f(page_size);
    std::vector<std::int32_t> storage(2 * 4 * 16 + 64);  // room for o, with the index array at its start
    auto o_over = [&] {
      return MutableTensorView::contiguous(storage.data(), DType::kFloat32, {2, 4, 1, 16});
    };
    auto p = f.params();
    std::copy(f.cache.seq_lens().begin(), f.cache.seq_lens().end(), storage.begin());
    p.cache.seq_lens = std::span<const std::int32_t>(storage.data(), 2);
    p.o = o_over();
    expect_decode_invalid(p, "o", "memory disjoint from input 'cache.seq_lens'");
    p = f.params();
    p.lse = MutableTensorView::contiguous(storage.data(), DType::kFloat32, {2, 4, 1});
    p.cache.seq_lens = std::span<const std::int32_t>(storage.data() + 3, 2);
    std::copy(f.cache.seq_lens().begin(), f.cache.seq_lens().end(), storage.begin() + 3);
    expect_decode_invalid(p, "lse", "memory disjoint from input 'cache.seq_lens'");
    if (page_size) {
      p = f.params();
      std::copy(f.cache.block_table().begin(), f.cache.block_table().end(), storage.begin() + 5);
      p.cache.block_table = std::span<const std::int32_t>(storage.data() + 5, f.cache.block_table().size());
      p.o = o_over();
      expect_decode_invalid(p, "o", "memory disjoint from input 'cache.block_table'");
    }
    p = f.params();
    storage.assign(storage.size(), 0);
    p.positions_after = std::span<const std::int32_t>(storage.data() + 7, 2);
    p.o = o_over();
    expect_decode_invalid(p, "o", "memory disjoint from input 'positions_after'");
  }
}

TEST(ValidateDecode, Fp32OutputForBf16QueriesAndPositionsAfter) {
  Fixture f(0);
  HostTensor q_bf16(DType::kBFloat16, {2, 4, 1, 16});
  q_bf16.fill_normal(f.rng);
  auto p = f.params();
  p.q = q_bf16.view();
  EXPECT_NO_THROW(flash_decode(p)) << "an fp32 o keeps a bf16 decode's partial result exact";
  const std::vector<std::int32_t> one = {3}, negative = {0, -1}, fine = {0, 40};
  p = f.params();
  p.positions_after = one;
  expect_decode_invalid(p, "positions_after", "empty or one count per sequence (2)", "1 entries");
  p.positions_after = negative;
  expect_decode_invalid(p, "positions_after", "counts >= 0", "positions_after[1] = -1");
  p.positions_after = fine;
  EXPECT_NO_THROW(flash_decode(p));
}

TEST(ValidateDecode, LengthsBeyondTheCache) {
  for (std::int64_t page_size : {0, 8}) {
    Fixture f(page_size);
    f.cache.seq_lens()[1] = page_size ? 25 : 21;
    expect_decode_invalid(f.params(), "cache.seq_lens", page_size ? "lengths from 0 to the capacity 24" : "capacity 20",
                          page_size ? "seq_lens[1] = 25" : "seq_lens[1] = 21");
    f.cache.seq_lens()[1] = -1;
    expect_decode_invalid(f.params(), "cache.seq_lens", "lengths from 0", "seq_lens[1] = -1");
  }
}

TEST(ValidateDecode, PagedCacheTableAndPageSize) {
  Fixture f(8);
  // Sequence 1 uses 3 pages (17 positions): an id outside the 9-page pool is an error...
  f.cache.block_table()[1 * 3 + 2] = 9;
  expect_decode_invalid(f.params(), "cache.block_table", "page ids in [0, 9)", "block_table[1 * 3 + 2] = 9");
  // ...and an unused entry may hold anything (vLLM pads tables with -1).
  f.cache.block_table()[1 * 3 + 2] = 4;
  f.cache.block_table()[0 * 3 + 2] = -1;
  EXPECT_NO_THROW(flash_decode(f.params()));

  auto p = f.params();
  p.cache.block_table = std::span<const std::int32_t>(f.cache.block_table().data(), 5);
  expect_decode_invalid(p, "cache.block_table", "B * pages_per_seq entries for B = 2", "5 entries");

  HostTensor pool24(DType::kFloat32, {9, 2, 24, 16});
  p = f.params();
  p.cache.k = pool24.view();
  p.cache.v = pool24.view();
  expect_decode_invalid(p, "cache.k", "a page size (dimension 2) that is a power of two from 8 to 512", "24");
}

TEST(ValidateDecode, CacheViewsAgree) {
  Fixture f(0);
  HostTensor v_bf16(DType::kBFloat16, {2, 2, 20, 16}), v_short(DType::kFloat32, {2, 2, 19, 16}),
      k_b3(DType::kFloat32, {3, 2, 20, 16});
  auto p = f.params();
  p.cache.v = v_bf16.view();
  expect_decode_invalid(p, "cache.v", "dtype fp32 (k and v of a cache share one dtype)", "bf16");
  p.cache.v = v_short.view();
  expect_decode_invalid(p, "cache.v", "shape [2, 2, 20, 16]", "[2, 2, 19, 16]");
  p = f.params();
  p.cache.k = k_b3.view();
  p.cache.v = k_b3.view();
  expect_decode_invalid(p, "cache.k", "batch (dimension 0) equal to the number of sequence lengths, 2");
  p = f.params();
  p.cache.seq_lens = {};
  expect_decode_invalid(p, "cache.seq_lens", "one length per sequence (B >= 1)");
}

void expect_append_invalid(Fixture& f, const HostTensor& k_new, const HostTensor& v_new, const std::string& argument,
                           const std::string& expected, const std::string& got = "") {
  const std::vector<unsigned char> k_before = f.cache.k().bytes(), v_before = f.cache.v().bytes();
  const std::vector<std::int32_t> lengths_before = f.cache.seq_lens();
  expect_invalid_argument([&] { append_kv(f.cache.mutable_view(), k_new.view(), v_new.view()); }, "append_kv",
                          argument, expected, got);
  EXPECT_EQ(f.cache.k().bytes(), k_before) << "a rejected append wrote to the cache";
  EXPECT_EQ(f.cache.v().bytes(), v_before) << "a rejected append wrote to the cache";
  EXPECT_EQ(f.cache.seq_lens(), lengths_before) << "a rejected append changed the lengths";
}

TEST(ValidateAppend, RejectsWithoutWriting) {
  for (std::int64_t page_size : {0, 8}) {
    Fixture f(page_size);
    HostTensor k8(DType::kFloat32, {2, 2, 8, 16}), k_bf16(DType::kBFloat16, {2, 2, 1, 16}),
        k_h4(DType::kFloat32, {2, 4, 1, 16}), k1(DType::kFloat32, {2, 2, 1, 16});
    // 17 + 8 positions do not fit in 20 (contiguous) or 3 pages of 8 (paged).
    expect_append_invalid(f, k8, k8, "cache.seq_lens", page_size ? "capacity 24 - 8 appended" : "capacity 20 - 8 appended",
                          "seq_lens[1] = 17");
    expect_append_invalid(f, k_bf16, k_bf16, "k_new", "dtype fp32 (the cache's dtype)", "bf16");
    expect_append_invalid(f, k_h4, k_h4, "k_new", "shape [2, 2, 1, 16]", "[2, 4, 1, 16]");
    expect_append_invalid(f, k1, k8, "v_new", "shape [2, 2, 1, 16] (the shape of k_new)", "[2, 2, 8, 16]");
  }
}

TEST(ValidateAppend, PagedSequencesMayNotAppendToOneAnotherPage) {
  Fixture f(8);
  HostTensor k1(DType::kFloat32, {2, 2, 1, 16});
  // Sequence 0 (5 positions) appends to its page 0, sequence 1 (17) to its page 2: make them one.
  f.cache.block_table()[0] = f.cache.block_table()[1 * 3 + 2];
  expect_append_invalid(f, k1, k1, "cache.block_table", "every page a sequence appends to used once",
                        "at block_table[0 * 3 + 0] and block_table[1 * 3 + 2]");
  // A page the append needs that is outside the pool.
  Fixture g(8);
  g.cache.seq_lens()[0] = 16;
  g.cache.block_table()[0 * 3 + 2] = -1;
  expect_append_invalid(g, k1, k1, "cache.block_table", "page ids in [0, 9)", "block_table[0 * 3 + 2] = -1");
}

TEST(ValidateAppend, PagesAppendedToAreUsedOnceInTheTable) {
  HostTensor k1(DType::kFloat32, {2, 2, 1, 16});
  {  // Sequence 1 (17 positions) appends to its page 2, which also holds its positions 0-7.
    Fixture f(8);
    f.cache.block_table()[1 * 3 + 2] = f.cache.block_table()[1 * 3 + 0];
    expect_append_invalid(f, k1, k1, "cache.block_table", "every page a sequence appends to used once",
                          "at block_table[1 * 3 + 0] and block_table[1 * 3 + 2]");
  }
  {  // Sequence 0 appends to its page 0, which sequence 1 reads as its page 0.
    Fixture f(8);
    f.cache.block_table()[1 * 3 + 0] = f.cache.block_table()[0];
    expect_append_invalid(f, k1, k1, "cache.block_table", "every page a sequence appends to used once",
                          "at block_table[0 * 3 + 0] and block_table[1 * 3 + 0]");
  }
  {  // Pages only read may be shared (a common prefix): sequence 0 at 12 positions appends to its page 1.
    Fixture f(8);
    f.cache.seq_lens()[0] = 12;
    f.cache.block_table()[0] = f.cache.block_table()[1 * 3 + 0];
    EXPECT_NO_THROW(append_kv(f.cache.mutable_view(), k1.view(), k1.view()));
  }
}

// What append_kv reads to place the rows (lengths, block table) must not lie under the rows it
// writes, and the new rows must not lie under the lengths it advances (a row written over the
// table would move every later write).
TEST(ValidateAppend, RowsWrittenDisjointFromWhatPlacesThem) {
  HostTensor k1(DType::kFloat32, {2, 2, 1, 16});
  for (std::int64_t page_size : {0, 8}) {
    Fixture f(page_size);
    MutableKVCache cache = f.cache.mutable_view();
    auto* k_bytes = static_cast<std::int32_t*>(cache.k.data);
    std::copy(f.cache.seq_lens().begin(), f.cache.seq_lens().end(), k_bytes + 3);  // valid lengths, inside cache.k
    cache.seq_lens = std::span<std::int32_t>(k_bytes + 3, 2);
    expect_invalid_argument([&] { append_kv(cache, k1.view(), k1.view()); }, "append_kv", "cache.seq_lens",
                            "memory disjoint from the cache rows it places");
    if (page_size) {
      cache = f.cache.mutable_view();
      std::copy(f.cache.block_table().begin(), f.cache.block_table().end(), k_bytes);
      cache.block_table = std::span<const std::int32_t>(k_bytes, f.cache.block_table().size());
      expect_invalid_argument([&] { append_kv(cache, k1.view(), k1.view()); }, "append_kv", "cache.block_table",
                              "memory disjoint from the cache rows it places");
    }
    std::vector<float> rows(2 * 2 * 16);
    cache = f.cache.mutable_view();
    const TensorView k_new = TensorView::contiguous(rows.data(), DType::kFloat32, {2, 2, 1, 16});
    auto* lengths_in_rows = reinterpret_cast<std::int32_t*>(rows.data()) + 5;
    std::copy(f.cache.seq_lens().begin(), f.cache.seq_lens().end(), lengths_in_rows);
    cache.seq_lens = std::span<std::int32_t>(lengths_in_rows, 2);
    expect_invalid_argument([&] { append_kv(cache, k_new, k1.view()); }, "append_kv", "cache.seq_lens",
                            "memory disjoint from 'k_new' (the lengths are written)");
  }
}

TEST(AppendKv, WritesOnlyTheNewRowsAndAdvancesLengths) {
  for (std::int64_t page_size : {0, 8}) {
    Fixture f(page_size);
    auto rng = make_rng();
    HostTensor k_new(DType::kFloat32, {2, 2, 3, 16}), v_new(DType::kFloat32, {2, 2, 3, 16});
    k_new.fill_normal(rng);
    v_new.fill_normal(rng);
    const HostTensor k0_before = f.cache.dense_k(0), v1_before = f.cache.dense_v(1);
    append_kv(f.cache.mutable_view(), k_new.view(), v_new.view());
    EXPECT_EQ(f.cache.seq_lens(), (std::vector<std::int32_t>{8, 20}));
    const HostTensor k0 = f.cache.dense_k(0), v1 = f.cache.dense_v(1);
    for (std::int64_t h = 0; h < 2; ++h)
      for (std::int64_t d = 0; d < 16; ++d) {
        for (std::int64_t p = 0; p < 5; ++p) ASSERT_EQ(k0.at(0, h, p, d), k0_before.at(0, h, p, d));
        for (std::int64_t p = 0; p < 17; ++p) ASSERT_EQ(v1.at(0, h, p, d), v1_before.at(0, h, p, d));
        for (std::int64_t t = 0; t < 3; ++t) {
          ASSERT_EQ(k0.at(0, h, 5 + t, d), k_new.at(0, h, t, d));
          ASSERT_EQ(v1.at(0, h, 17 + t, d), v_new.at(1, h, t, d));
        }
      }
    // Positions past the new lengths are still the NaN poison: nothing else was written.
    if (page_size == 0) {
      HostTensor after = f.cache.k();
      EXPECT_TRUE(std::isnan(after.at(0, 0, 8, 0)));
    }
  }
}

}  // namespace
}  // namespace pflash::testing
