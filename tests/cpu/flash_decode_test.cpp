// FlashDecoding on the CPU against the float64 reference, over contiguous and paged caches, single
// and multi-token queries, GQA, ragged lengths and forced split counts, on every instruction set.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "support/isa.hpp"
#include "support/kv_cache.hpp"
#include "support/merge.hpp"
#include "support/reference.hpp"
#include "support/tensors.hpp"

namespace pflash::testing {
namespace {

struct Case {
  std::int64_t heads_q, heads_kv, tokens, dim;
  std::int64_t page_size;  // 0: contiguous
  std::vector<std::int32_t> lengths;  // one per sequence
  DType cache_dtype, q_dtype;
  int num_splits;  // 0: automatic
  Layout layout = Layout::kBhnd;
};

std::string case_name(const Case& c, CpuIsa isa) {
  std::ostringstream name;
  name << "Hq" << c.heads_q << "_Hkv" << c.heads_kv << "_T" << c.tokens << "_D" << c.dim << "_"
       << (c.page_size ? "page" + std::to_string(c.page_size) : std::string("contiguous")) << "_L";
  for (std::int32_t l : c.lengths) name << l << "x";
  name << "_cache" << to_string(c.cache_dtype) << "_q" << to_string(c.q_dtype) << "_splits" << c.num_splits;
  if (c.layout == Layout::kBnhd) name << "_nhd";
  name << "_" << to_string(isa);
  return name.str();
}

// The shape grid, in one place. Lengths around a page (page-1, page, page+1), 1 and 7, and long.
std::vector<Case> decode_cases() {
  const DType bf16 = DType::kBFloat16, fp32 = DType::kFloat32;
  std::vector<Case> cases = {
      {4, 4, 1, 64, 0, {1, 7, 300}, fp32, fp32, 0},             // MHA, ragged, tiny lengths
      {8, 2, 1, 128, 0, {1000}, bf16, bf16, 0},                 // GQA 4, one long sequence
      {8, 1, 1, 96, 0, {517, 33}, bf16, fp32, 3},               // MQA (GQA 8), D = 96, 3 splits
      {8, 2, 3, 40, 0, {2, 50, 129}, fp32, bf16, 2},            // 3 query tokens, D = 40, length < T
      {4, 1, 16, 80, 0, {16, 400}, bf16, bf16, 5},              // 16 query tokens (speculative)
      {2, 2, 1, 256, 0, {333}, fp32, fp32, 16},                 // the largest head_dim, many splits
      {2, 1, 2, 1, 0, {9, 70}, fp32, fp32, 4},                  // D = 1
  };
  for (std::int64_t page : {8, 16, 64, 512}) {
    cases.push_back({8, 2, 1, 64, page, {1, 7, static_cast<std::int32_t>(page - 1)}, bf16, bf16, 0});
    cases.push_back({8, 2, 2, 64, page, {static_cast<std::int32_t>(page), static_cast<std::int32_t>(page + 1), 700},
                     fp32, fp32, 3});
  }
  cases.push_back({32, 8, 1, 128, 64, {1200, 65}, bf16, bf16, 4});                 // the benchmark's heads
  cases.push_back({8, 1, 4, 96, 16, {100, 233}, bf16, bf16, 0, Layout::kBnhd});    // vLLM's page layout
  cases.push_back({8, 2, 1, 64, 0, {250, 31}, fp32, fp32, 2, Layout::kBnhd});      // [B, N, H, D] cache
  return cases;
}

struct Problem {
  TestCache cache;
  HostTensor q, o, lse;
};

Problem make_problem(const Case& c, std::mt19937_64& rng) {
  std::int32_t max_len = 0;
  for (std::int32_t l : c.lengths) max_len = std::max(max_len, l);
  const auto batch = static_cast<std::int64_t>(c.lengths.size());
  CacheSpec spec{c.cache_dtype, batch, c.heads_kv, c.dim, max_len + 5, c.page_size, c.layout};
  Problem pr{TestCache(spec, rng), HostTensor(c.q_dtype, {batch, c.heads_q, c.tokens, c.dim}),
             HostTensor(c.q_dtype, {batch, c.heads_q, c.tokens, c.dim}),
             HostTensor(DType::kFloat32, {batch, c.heads_q, c.tokens})};
  pr.cache.fill(c.lengths, rng);
  pr.q.fill_normal(rng);
  pr.o.poison();
  pr.lse.poison();
  return pr;
}

DecodeParams params_for(Problem& pr, int num_splits) {
  DecodeParams p;
  p.q = pr.q.view();
  p.cache = pr.cache.view();
  p.o = pr.o.mutable_view();
  p.lse = pr.lse.mutable_view();
  p.num_splits = num_splits;
  return p;
}

ReferenceOutput reference_decode(const Problem& pr, double scale) { return reference_decode(pr.cache, pr.q, scale); }

double o_tolerance(const Case& c) {
  return c.cache_dtype == DType::kFloat32 && c.q_dtype == DType::kFloat32 ? 1e-5 : 1e-2;
}

class FlashDecode : public ::testing::TestWithParam<std::tuple<Case, CpuIsa>> {};

TEST_P(FlashDecode, MatchesFloat64Reference) {
  const auto& [c, isa] = GetParam();
  if (detected_cpu_isa() < isa) GTEST_SKIP() << "this CPU has no " << to_string(isa);
  const IsaScope scope(isa);
  auto rng = make_rng();
  Problem pr = make_problem(c, rng);
  const std::vector<unsigned char> k_before = pr.cache.k().bytes(), v_before = pr.cache.v().bytes(),
                                   q_before = pr.q.bytes();
  const std::vector<std::int32_t> lengths_before = pr.cache.seq_lens(), table_before = pr.cache.block_table();
  flash_decode(params_for(pr, c.num_splits));

  EXPECT_EQ(pr.cache.k().bytes(), k_before) << "the cache was modified";
  EXPECT_EQ(pr.cache.v().bytes(), v_before) << "the cache was modified";
  EXPECT_EQ(pr.q.bytes(), q_before) << "q was modified";
  EXPECT_EQ(pr.cache.seq_lens(), lengths_before);
  EXPECT_EQ(pr.cache.block_table(), table_before);
  // Positions past each length hold NaN: reading one would leave NaN in o.
  ASSERT_TRUE(pr.o.all_finite_or_neg_inf()) << "o not fully written, or a position past a length was read";
  ASSERT_TRUE(pr.lse.all_finite_or_neg_inf()) << "lse not fully written";
  const ReferenceOutput ref = reference_decode(pr, 1.0 / std::sqrt(static_cast<double>(c.dim)));
  EXPECT_LT(relative_l2_error(pr.o, ref.o), o_tolerance(c));
  expect_lse_near(pr.lse, ref.lse, 1e-5);
}

INSTANTIATE_TEST_SUITE_P(Grid, FlashDecode,
                         ::testing::Combine(::testing::ValuesIn(decode_cases()), ::testing::ValuesIn(kernel_isas())),
                         [](const auto& info) { return case_name(std::get<0>(info.param), std::get<1>(info.param)); });

// The rules beyond causality: a sliding window (read only there), chunks, the soft cap and sinks (one
// split, where the finish folds them, and several, where the merge does), contiguous and paged.
struct VariantCase {
  std::string name;
  Case shape;
  std::int64_t window_left = kUnboundedWindow, chunk_size = 0;
  float soft_cap = 0.0f;
  bool sinks = false;
};

std::vector<VariantCase> variant_cases() {
  const DType bf16 = DType::kBFloat16, fp32 = DType::kFloat32;
  return {
      {"window", {8, 2, 1, 64, 0, {0, 5, 700}, fp32, fp32, 0}, 100},
      {"window_paged_splits", {8, 2, 3, 64, 16, {40, 333}, bf16, bf16, 4}, 63},
      {"window_of_one", {4, 4, 2, 32, 0, {9, 200}, fp32, fp32, 2}, 0},
      {"chunk", {4, 1, 4, 32, 0, {3, 150, 257}, fp32, fp32, 3}, kUnboundedWindow, 64},
      {"soft_cap", {8, 2, 2, 64, 64, {130, 511}, fp32, fp32, 0}, kUnboundedWindow, 0, 2.0f},
      {"sinks_one_split", {8, 2, 2, 64, 0, {0, 100}, fp32, bf16, 1}, kUnboundedWindow, 0, 0.0f, true},
      {"sinks_merged", {8, 2, 2, 64, 0, {0, 900}, fp32, fp32, 5}, kUnboundedWindow, 0, 0.0f, true},
      {"everything", {8, 1, 3, 96, 32, {17, 600}, bf16, bf16, 3}, 128, 0, 3.0f, true},
  };
}

class FlashDecodeVariant : public ::testing::TestWithParam<std::tuple<VariantCase, CpuIsa>> {};

TEST_P(FlashDecodeVariant, MatchesFloat64Reference) {
  const auto& [v, isa] = GetParam();
  if (detected_cpu_isa() < isa) GTEST_SKIP() << "this CPU has no " << to_string(isa);
  const IsaScope scope(isa);
  auto rng = make_rng();
  Problem pr = make_problem(v.shape, rng);
  HostTensor sinks(DType::kFloat32, {v.shape.heads_q, 1, 1});
  sinks.fill_normal(rng, 2.0);
  DecodeParams p = params_for(pr, v.shape.num_splits);
  p.window_left = v.window_left;
  p.chunk_size = v.chunk_size;
  p.logits_soft_cap = v.soft_cap;
  if (v.sinks) p.sinks = TensorView::contiguous(sinks.view().data, DType::kFloat32, {v.shape.heads_q});
  flash_decode(p);

  DecodeOptions options{v.window_left, v.chunk_size, v.soft_cap, {}};
  if (v.sinks) {
    for (std::int64_t h = 0; h < v.shape.heads_q; ++h) options.sinks.push_back(sinks.at(h, 0, 0));
  }
  ASSERT_TRUE(pr.o.all_finite_or_neg_inf()) << "o not fully written, or a position past a length was read";
  ASSERT_TRUE(pr.lse.all_finite_or_neg_inf()) << "lse not fully written";
  const double scale = 1.0 / std::sqrt(static_cast<double>(v.shape.dim));
  const ReferenceOutput ref = reference_decode(pr.cache, pr.q, scale, options);
  EXPECT_LT(relative_l2_error(pr.o, ref.o), o_tolerance(v.shape));
  expect_lse_near(pr.lse, ref.lse, 1e-5);
}

INSTANTIATE_TEST_SUITE_P(Variants, FlashDecodeVariant,
                         ::testing::Combine(::testing::ValuesIn(variant_cases()), ::testing::ValuesIn(kernel_isas())),
                         [](const auto& info) {
                           return std::get<0>(info.param).name + "_" + std::string(to_string(std::get<1>(info.param)));
                         });

class FlashDecodeIsa : public PerIsaTest {};

// Every forced split count gives the unsplit result up to the merge's rounding (fp32 throughout),
// and the result does not depend on the thread count.
TEST_P(FlashDecodeIsa, SplitCountsAgreeWithNoSplit) {
  auto rng = make_rng();
  const Case c{8, 2, 2, 64, 16, {1000, 3, 250}, DType::kFloat32, DType::kFloat32, 1};
  Problem pr = make_problem(c, rng);
  flash_decode(params_for(pr, 1));
  const std::vector<double> ref = [&] {
    std::vector<double> values;
    for (std::int64_t i = 0; i < pr.o.numel(); ++i) {
      const auto& s = pr.o.shape();
      values.push_back(pr.o.at(i / (s[1] * s[2] * s[3]), i / (s[2] * s[3]) % s[1], i / s[3] % s[2], i % s[3]));
    }
    return values;
  }();
  for (int splits = 1; splits <= 16; ++splits) {
    for (int threads : {1, 2}) {
      pr.o.poison();
      DecodeParams p = params_for(pr, splits);
      p.num_threads = threads;
      flash_decode(p);
      ASSERT_TRUE(pr.o.all_finite_or_neg_inf()) << splits << " splits";
      EXPECT_LT(relative_l2_error(pr.o, ref), 1e-6) << splits << " splits, " << threads << " threads";
    }
  }
}

// Logits near 1e4 must not overflow the online softmax or the merge of splits.
TEST_P(FlashDecodeIsa, LargeLogitsStayExact) {
  auto rng = make_rng();
  const Case c{4, 1, 2, 64, 0, {300}, DType::kFloat32, DType::kFloat32, 3};
  Problem pr = make_problem(c, rng);
  pr.q.fill_normal(rng, 50.0);
  pr.cache.fill(c.lengths, rng, 50.0);
  flash_decode(params_for(pr, 3));
  const ReferenceOutput ref = reference_decode(pr, 1.0 / 8.0);
  double max_logit = 0.0;
  for (double l : ref.lse) max_logit = std::max(max_logit, std::abs(l));
  ASSERT_GT(max_logit, 5e3);
  EXPECT_LT(relative_l2_error(pr.o, ref.o), 8.0 * max_logit * 1.2e-7);
}

TEST_P(FlashDecodeIsa, AutomaticSplitsUseEveryThreadForOneSequence) {
  auto rng = make_rng();
  const Case c{8, 1, 1, 64, 0, {4096}, DType::kBFloat16, DType::kBFloat16, 0};
  Problem pr = make_problem(c, rng);
  DecodeParams p = params_for(pr, 0);
  p.num_threads = 2;
  EXPECT_EQ(decode_num_splits(p), 2) << "one (sequence, KV head) item and two threads";
  p.num_threads = 1;
  EXPECT_EQ(decode_num_splits(p), 1);
  p.num_splits = 7;
  EXPECT_EQ(decode_num_splits(p), 7) << "a forced count is kept";
}

// A decode loop written with the library alone: each step appends the new token's K/V and decodes
// it; every step must equal full causal attention recomputed from scratch over the whole history.
TEST_P(FlashDecodeIsa, GenerationLoopWithAppendsMatchesRecomputation) {
  for (std::int64_t page_size : {0, 16}) {
    auto rng = make_rng();
    const std::int64_t batch = 2, heads_q = 4, heads_kv = 2, dim = 32, steps = 64;
    TestCache cache(CacheSpec{DType::kFloat32, batch, heads_kv, dim, 160, page_size}, rng);
    cache.fill({30, 5}, rng);
    for (std::int64_t step = 0; step < steps; ++step) {
      HostTensor q(DType::kFloat32, {batch, heads_q, 1, dim}), k_new(DType::kFloat32, {batch, heads_kv, 1, dim}),
          v_new(DType::kFloat32, {batch, heads_kv, 1, dim}), o(DType::kFloat32, {batch, heads_q, 1, dim});
      q.fill_normal(rng);
      k_new.fill_normal(rng);
      v_new.fill_normal(rng);
      o.poison();
      append_kv(cache.mutable_view(), k_new.view(), v_new.view());
      ASSERT_EQ(cache.seq_lens()[0], 30 + step + 1);
      DecodeParams p;
      p.q = q.view();
      p.cache = cache.view();
      p.o = o.mutable_view();
      p.num_splits = static_cast<int>(step % 3) + 1;
      flash_decode(p);
      for (std::int64_t b = 0; b < batch; ++b) {
        const ReferenceOutput ref = reference_attention(slice_batch(q, b), cache.dense_k(b), cache.dense_v(b),
                                                        /*causal=*/true, 1.0 / std::sqrt(double(dim)));
        ASSERT_LT(relative_l2_error(slice_batch(o, b), ref.o), 1e-5) << "step " << step << ", sequence " << b;
        // The appended row is the last position of the sequence, exactly as given.
        const HostTensor k_dense = cache.dense_k(b);
        ASSERT_EQ(k_dense.at(0, 1, cache.seq_lens()[b] - 1, 3), k_new.at(b, 1, 0, 3));
      }
    }
  }
}

// A cache cut into windows of positions, each decoded on its own with positions_after (what one
// shard of a sharded cache does) into fp32 partials, then merged, equals the decode of the whole
// cache: windows that end inside the last T positions (the multi-token causal mask crosses them), an
// empty window, a one-position window.
TEST_P(FlashDecodeIsa, WindowsWithPositionsAfterMergeToTheWholeDecode) {
  auto rng = make_rng();
  const std::int64_t heads_q = 8, heads_kv = 2, tokens = 4, dim = 64;
  const std::vector<std::int32_t> lengths = {301, 6};
  const Case c{heads_q, heads_kv, tokens, dim, 0, lengths, DType::kBFloat16, DType::kBFloat16, 0};
  Problem whole = make_problem(c, rng);
  flash_decode(params_for(whole, 1));
  const ReferenceOutput ref = reference_decode(whole, 1.0 / std::sqrt(double(dim)));

  const HostTensor& k = whole.cache.k();
  const std::int64_t capacity = k.shape()[2];
  const std::vector<std::int64_t> bounds = {0, 2, 150, 150, 299, 300, capacity};  // window w: [bounds[w], bounds[w+1])
  const std::int64_t windows = static_cast<std::int64_t>(bounds.size()) - 1, batch = 2;
  HostTensor o_parts(DType::kFloat32, {windows, batch, heads_q * tokens, dim});
  HostTensor lse_parts(DType::kFloat32, {windows, batch, heads_q * tokens});
  o_parts.poison();
  lse_parts.poison();
  for (std::int64_t w = 0; w < windows; ++w) {
    std::vector<std::int32_t> window_lens(batch), after(batch);
    for (std::int64_t b = 0; b < batch; ++b) {
      const std::int64_t len = lengths[static_cast<std::size_t>(b)];
      window_lens[b] = static_cast<std::int32_t>(std::clamp(len - bounds[w], std::int64_t{0}, bounds[w + 1] - bounds[w]));
      after[b] = static_cast<std::int32_t>(std::max(len - bounds[w + 1], std::int64_t{0}));
    }
    KVCacheView window = whole.cache.view();
    const std::int64_t rows_skipped_bytes = bounds[w] * window.k.stride(2) * static_cast<std::int64_t>(size_of(window.k.dtype));
    window.k.data = static_cast<const char*>(window.k.data) + rows_skipped_bytes;
    window.v.data = static_cast<const char*>(window.v.data) + rows_skipped_bytes;
    window.k.shape[2] = window.v.shape[2] = std::max<std::int64_t>(bounds[w + 1] - bounds[w], 1);
    window.seq_lens = window_lens;
    DecodeParams p = params_for(whole, static_cast<int>(w % 2) + 1);
    p.cache = window;
    p.positions_after = after;
    // This window's slot of the parts, [B, Hq, T, D] and [B, Hq, T] fp32 (q is bf16).
    p.o = o_parts.mutable_view();
    p.o.rank = 4;
    p.o.data = static_cast<float*>(p.o.data) + w * o_parts.shape()[1] * o_parts.shape()[2] * dim;
    p.o.shape = {batch, heads_q, tokens, dim};
    p.o.strides = {heads_q * tokens * dim, tokens * dim, dim, 1};
    p.lse = lse_parts.mutable_view();
    p.lse.rank = 3;
    p.lse.data = static_cast<float*>(p.lse.data) + w * batch * heads_q * tokens;
    p.lse.shape = {batch, heads_q, tokens, 0};
    p.lse.strides = {heads_q * tokens, tokens, 1, 0};
    flash_decode(p);
  }
  const auto [o, lse] = merge_parts(o_parts, lse_parts, DType::kBFloat16);
  EXPECT_LT(relative_l2_error(o, ref.o), 1e-2);
  for (std::int64_t b = 0; b < batch; ++b) {
    for (std::int64_t r = 0; r < heads_q * tokens; ++r) {
      const double expected = ref.lse[static_cast<std::size_t>(b * heads_q * tokens + r)];
      ASSERT_TRUE(lse_near(lse.at(b, r, 0), expected, 1e-3)) << "sequence " << b << " row " << r;
      for (std::int64_t d = 0; d < dim; d += 7) {  // against the single decode: the same bf16 rounding
        ASSERT_NEAR(o.at(b, r, d), whole.o.at(b, r / tokens, r % tokens, d), 2e-2) << "sequence " << b << " row " << r;
      }
    }
  }
}

// NaN neither vanishes nor leaks, split or not, paged or not: with T = 3 query tokens (token t sees
// positions <= L - 3 + t), a NaN key at L - 2 makes tokens 1 and 2 NaN, a NaN query makes its own
// row NaN, and an inf value at L - 1 (seen by token 2 only) leaves tokens 0 and 1 alone. Every other
// row has the bits of the same call on a cache with zeros there.
TEST_P(FlashDecodeIsa, NanPropagatesToTheRowsThatSeeItAndNoOthers) {
  constexpr double kNan = std::numeric_limits<double>::quiet_NaN(), kInf = std::numeric_limits<double>::infinity();
  for (std::int64_t page : {0, 16}) {
    for (int splits : {1, 4}) {
      auto rng = make_rng();
      const Case c{4, 2, 3, 40, page, {200, 77}, DType::kBFloat16, DType::kFloat32, splits};
      Problem clean = make_problem(c, rng), dirty = make_problem(c, rng);
      dirty.q = clean.q;
      dirty.cache = clean.cache;
      for (std::int64_t d = 0; d < c.dim; d += 5) {
        dirty.cache.set(false, kNan, 0, 0, 198, d);  // sequence 0, KV head 0 (query heads 0, 1)
        clean.cache.set(false, 0.0, 0, 0, 198, d);
        dirty.cache.set(true, kInf, 1, 1, 76, d);  // sequence 1, KV head 1 (query heads 2, 3)
        clean.cache.set(true, 0.0, 1, 1, 76, d);
        dirty.q.set(kNan, 1, 3, 0, d);  // sequence 1, query head 3, token 0
        clean.q.set(0.0, 1, 3, 0, d);
      }
      flash_decode(params_for(dirty, splits));
      flash_decode(params_for(clean, splits));
      for (std::int64_t b = 0; b < 2; ++b) {
        for (std::int64_t h = 0; h < 4; ++h) {
          for (std::int64_t t = 0; t < 3; ++t) {
            const bool nan_row = (b == 0 && h < 2 && t >= 1) || (b == 1 && h == 3 && t == 0);
            if (b == 1 && h >= 2 && t == 2) continue;  // sees the inf value: inf or NaN, either is right
            const std::string where = "page " + std::to_string(page) + " splits " + std::to_string(splits) + " b " +
                                      std::to_string(b) + " h " + std::to_string(h) + " t " + std::to_string(t);
            const double lse = dirty.lse.at(b, h, t, 0);
            EXPECT_EQ(std::isnan(lse), nan_row) << where << " LSE " << lse;
            if (!nan_row) {
              EXPECT_EQ(lse, clean.lse.at(b, h, t, 0)) << where;
            }
            for (std::int64_t d = 0; d < c.dim; ++d) {
              const double o = dirty.o.at(b, h, t, d);
              if (nan_row) {
                ASSERT_TRUE(std::isnan(o)) << where << " d " << d << ": " << o;
              } else {
                ASSERT_EQ(o, clean.o.at(b, h, t, d)) << where << " d " << d;
              }
            }
          }
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Isa, FlashDecodeIsa, ::testing::ValuesIn(kernel_isas()), IsaName());

}  // namespace
}  // namespace pflash::testing
