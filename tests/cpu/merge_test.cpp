// merge_attention_states: attention over a key set equals the merge of attention over any partition
// of it, including empty parts, in any grouping.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "support/errors.hpp"
#include "support/reference.hpp"
#include "support/merge.hpp"
#include "support/tensors.hpp"

namespace pflash::testing {
namespace {

constexpr std::int64_t kHeads = 3, kTokens = 2, kDim = 24, kKeys = 60;

struct Partitioned {
  HostTensor q, k, v;
  ReferenceOutput whole;     // attention over every key
  HostTensor o_parts, lse_parts;  // [S, Hq, T, D], [S, Hq, T]: part s over its keys only
};

// Keys are dealt to `parts` parts at random; `empty_part` (if >= 0) gets none.
Partitioned make_partitioned(std::int64_t parts, std::int64_t empty_part, DType parts_dtype, std::mt19937_64& rng) {
  Partitioned p{HostTensor(DType::kFloat32, {1, kHeads, kTokens, kDim}), HostTensor(DType::kFloat32, {1, 1, kKeys, kDim}),
                HostTensor(DType::kFloat32, {1, 1, kKeys, kDim}), {},
                HostTensor(parts_dtype, {parts, kHeads, kTokens, kDim}), HostTensor(DType::kFloat32, {parts, kHeads, kTokens})};
  p.q.fill_normal(rng, 2.0);
  p.k.fill_normal(rng);
  p.v.fill_normal(rng);
  const double scale = 1.0 / std::sqrt(double(kDim));
  p.whole = reference_attention(p.q, p.k, p.v, false, scale);

  std::uniform_int_distribution<std::int64_t> pick(0, parts - 1);
  std::vector<std::vector<std::int64_t>> keys(static_cast<std::size_t>(parts));
  for (std::int64_t j = 0; j < kKeys; ++j) {
    std::int64_t s = pick(rng);
    if (s == empty_part) s = (s + 1) % parts;
    keys[static_cast<std::size_t>(s)].push_back(j);
  }
  p.o_parts.poison();  // an empty part's O stays NaN: the merge must not read it
  for (std::int64_t s = 0; s < parts; ++s) {
    const auto& mine = keys[static_cast<std::size_t>(s)];
    if (mine.empty()) {
      for (std::int64_t h = 0; h < kHeads; ++h)
        for (std::int64_t t = 0; t < kTokens; ++t) p.lse_parts.set(-INFINITY, s, h, t);
      continue;
    }
    const auto n = static_cast<std::int64_t>(mine.size());
    HostTensor ks(DType::kFloat32, {1, 1, n, kDim}), vs(DType::kFloat32, {1, 1, n, kDim});
    for (std::int64_t i = 0; i < n; ++i)
      for (std::int64_t d = 0; d < kDim; ++d) {
        ks.set(p.k.at(0, 0, mine[static_cast<std::size_t>(i)], d), 0, 0, i, d);
        vs.set(p.v.at(0, 0, mine[static_cast<std::size_t>(i)], d), 0, 0, i, d);
      }
    const ReferenceOutput part = reference_attention(p.q, ks, vs, false, scale);
    for (std::int64_t h = 0; h < kHeads; ++h)
      for (std::int64_t t = 0; t < kTokens; ++t) {
        const std::size_t row = static_cast<std::size_t>(h * kTokens + t);
        p.lse_parts.set(part.lse[row], s, h, t);
        for (std::int64_t d = 0; d < kDim; ++d) p.o_parts.set(part.o[row * kDim + static_cast<std::size_t>(d)], s, h, t, d);
      }
  }
  return p;
}

void expect_merged_equals_whole(const Merged& m, const Partitioned& p, double tolerance) {
  ASSERT_TRUE(m.o.all_finite_or_neg_inf());
  EXPECT_LT(relative_l2_error(m.o, p.whole.o), tolerance);
  for (std::int64_t h = 0; h < kHeads; ++h)
    for (std::int64_t t = 0; t < kTokens; ++t) {
      const double want = p.whole.lse[static_cast<std::size_t>(h * kTokens + t)];
      EXPECT_TRUE(lse_near(m.lse.at(h, t, 0), want, 1e-5)) << "head " << h << " token " << t;
    }
}

TEST(MergeAttentionStates, RandomPartitionsEqualTheWholeIncludingEmptyParts) {
  auto rng = make_rng();
  for (std::int64_t parts : {1, 2, 5, 9}) {
    for (std::int64_t empty_part : {std::int64_t{-1}, parts - 1}) {
      if (parts == 1 && empty_part == 0) continue;
      const Partitioned p = make_partitioned(parts, empty_part, DType::kFloat32, rng);
      expect_merged_equals_whole(merge_parts(p.o_parts, p.lse_parts), p, 1e-6);
    }
  }
}

TEST(MergeAttentionStates, Bf16PartialsAndOutput) {
  auto rng = make_rng();
  const Partitioned p = make_partitioned(4, -1, DType::kBFloat16, rng);
  expect_merged_equals_whole(merge_parts(p.o_parts, p.lse_parts, DType::kBFloat16), p, 1e-2);
}

// (a, b, c, d) merged at once equals ((a, b), (c, d)) merged pairwise, and the order of parts does
// not matter: the merge is associative and commutative.
TEST(MergeAttentionStates, AssociativeAndCommutative) {
  auto rng = make_rng();
  const Partitioned p = make_partitioned(4, -1, DType::kFloat32, rng);
  const Merged all = merge_parts(p.o_parts, p.lse_parts);

  HostTensor pair_o(DType::kFloat32, {2, kHeads, kTokens, kDim}), pair_lse(DType::kFloat32, {2, kHeads, kTokens});
  for (std::int64_t half = 0; half < 2; ++half) {
    HostTensor o2(DType::kFloat32, {2, kHeads, kTokens, kDim}), lse2(DType::kFloat32, {2, kHeads, kTokens});
    for (std::int64_t s = 0; s < 2; ++s)
      for (std::int64_t h = 0; h < kHeads; ++h)
        for (std::int64_t t = 0; t < kTokens; ++t) {
          // The second half in reverse order.
          const std::int64_t src = half == 0 ? s : 3 - s;
          lse2.set(p.lse_parts.at(src, h, t), s, h, t);
          for (std::int64_t d = 0; d < kDim; ++d) o2.set(p.o_parts.at(src, h, t, d), s, h, t, d);
        }
    const Merged m = merge_parts(o2, lse2);
    for (std::int64_t h = 0; h < kHeads; ++h)
      for (std::int64_t t = 0; t < kTokens; ++t) {
        pair_lse.set(m.lse.at(h, t, 0), half, h, t);
        for (std::int64_t d = 0; d < kDim; ++d) pair_o.set(m.o.at(h, t, d), half, h, t, d);
      }
  }
  const Merged nested = merge_parts(pair_o, pair_lse);
  for (std::int64_t h = 0; h < kHeads; ++h)
    for (std::int64_t t = 0; t < kTokens; ++t) {
      EXPECT_TRUE(lse_near(nested.lse.at(h, t, 0), all.lse.at(h, t, 0), 1e-5)) << "head " << h << " token " << t;
      for (std::int64_t d = 0; d < kDim; ++d) EXPECT_NEAR(nested.o.at(h, t, d), all.o.at(h, t, d), 1e-6);
    }
}

TEST(MergeAttentionStates, RowWithEveryPartEmptyIsZeroWithLseMinusInfinity) {
  HostTensor o_parts(DType::kFloat32, {3, kHeads, kTokens, kDim}), lse_parts(DType::kFloat32, {3, kHeads, kTokens});
  o_parts.poison();
  for (std::int64_t s = 0; s < 3; ++s)
    for (std::int64_t h = 0; h < kHeads; ++h)
      for (std::int64_t t = 0; t < kTokens; ++t) lse_parts.set(-INFINITY, s, h, t);
  const Merged m = merge_parts(o_parts, lse_parts);
  for (std::int64_t h = 0; h < kHeads; ++h)
    for (std::int64_t t = 0; t < kTokens; ++t) {
      EXPECT_EQ(m.lse.at(h, t, 0), -INFINITY);
      for (std::int64_t d = 0; d < kDim; ++d) EXPECT_EQ(m.o.at(h, t, d), 0.0);
    }
}

// A part that saw a NaN (its LSE is NaN) makes the merged row NaN, O and LSE: fmaxf over the LSEs
// alone would drop it. The other rows are merged as ever.
TEST(MergeAttentionStates, NanPartMakesItsRowNan) {
  auto rng = make_rng();
  const Partitioned p = make_partitioned(3, -1, DType::kFloat32, rng);
  HostTensor lse_parts = p.lse_parts;
  lse_parts.set(std::numeric_limits<double>::quiet_NaN(), 1, 2, 1);  // part 1, head 2, token 1
  const Merged m = merge_parts(p.o_parts, lse_parts), clean = merge_parts(p.o_parts, p.lse_parts);
  for (std::int64_t h = 0; h < kHeads; ++h)
    for (std::int64_t t = 0; t < kTokens; ++t) {
      const bool nan_row = h == 2 && t == 1;
      EXPECT_EQ(std::isnan(m.lse.at(h, t, 0)), nan_row) << "head " << h << " token " << t;
      for (std::int64_t d = 0; d < kDim; ++d) {
        if (nan_row) {
          EXPECT_TRUE(std::isnan(m.o.at(h, t, d))) << d;
        } else {
          EXPECT_EQ(m.o.at(h, t, d), clean.o.at(h, t, d)) << "head " << h << " token " << t << " d " << d;
        }
      }
    }
}

TEST(MergeAttentionStates, BadArgumentsNameTheArgument) {
  HostTensor o_parts(DType::kFloat32, {2, kHeads, kTokens, kDim}), lse_bf16(DType::kBFloat16, {2, kHeads, kTokens}),
      lse_parts(DType::kFloat32, {2, kHeads, kTokens}), o(DType::kFloat32, {kHeads, kTokens, kDim + 1});
  MergeParams params;
  params.o_partials = o_parts.view();
  params.lse_partials = lse_bf16.view();
  params.o = o.mutable_view();
  const auto call = [&] { merge_attention_states(params); };
  expect_invalid_argument(call, "merge_attention_states", "lse_partials", "dtype fp32", "bf16");
  params.lse_partials = lse_parts.view();
  expect_invalid_argument(call, "merge_attention_states", "o", "shape [3, 2, 24]", "[3, 2, 25]");
  params.o = MutableTensorView::contiguous(const_cast<void*>(o_parts.view().data), DType::kFloat32,
                                           {kHeads, kTokens, kDim});
  expect_invalid_argument(call, "merge_attention_states", "o", "memory disjoint from input 'o_partials'");
}

}  // namespace
}  // namespace pflash::testing
