// The CPU FlashAttention-2 forward against the float64 reference, on every instruction set this CPU
// runs, over a shape grid that covers the ragged and degenerate cases.
#include <gtest/gtest.h>

#include <cfloat>
#include <cmath>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "support/attention_cases.hpp"
#include "support/isa.hpp"
#include "support/reference.hpp"
#include "support/tensors.hpp"

namespace pflash::testing {
namespace {

struct Problem {
  HostTensor q, k, v, o, lse;
  AttentionParams params() {
    AttentionParams p;
    p.q = q.view();
    p.k = k.view();
    p.v = v.view();
    p.o = o.mutable_view();
    p.lse = lse.mutable_view();
    return p;
  }
};

Problem make_problem(const Case& c, double input_stddev = 1.0) {
  const Shape& s = c.shape;
  Problem pr{HostTensor(c.dtype, {s.batch, s.heads_q, s.seq_q, s.dim}, c.layout),
             HostTensor(c.dtype, {s.batch, s.heads_kv, s.seq_k, s.dim}, c.layout),
             HostTensor(c.dtype, {s.batch, s.heads_kv, s.seq_k, s.dim}, c.layout),
             HostTensor(c.dtype, {s.batch, s.heads_q, s.seq_q, s.dim}, c.layout),
             HostTensor(DType::kFloat32, {s.batch, s.heads_q, s.seq_q})};
  auto rng = make_rng();
  pr.q.fill_normal(rng, input_stddev);
  pr.k.fill_normal(rng, input_stddev);
  pr.v.fill_normal(rng);
  pr.o.poison();
  pr.lse.poison();
  return pr;
}

double o_tolerance(DType dtype) { return dtype == DType::kFloat32 ? 1e-5 : 1e-2; }

class FlashForward : public ::testing::TestWithParam<std::tuple<Case, CpuIsa>> {};

TEST_P(FlashForward, MatchesFloat64Reference) {
  const auto& [c, isa] = GetParam();
  if (detected_cpu_isa() < isa) GTEST_SKIP() << "this CPU has no " << to_string(isa);
  const IsaScope scope(isa);
  Problem pr = make_problem(c);
  const std::vector<unsigned char> q_before = pr.q.bytes(), k_before = pr.k.bytes(), v_before = pr.v.bytes();
  AttentionParams params = pr.params();
  params.mask.causal = c.causal;
  flash_attention_forward(params);

  EXPECT_EQ(pr.q.bytes(), q_before) << "q was modified";
  EXPECT_EQ(pr.k.bytes(), k_before) << "k was modified";
  EXPECT_EQ(pr.v.bytes(), v_before) << "v was modified";
  ASSERT_TRUE(pr.o.all_finite_or_neg_inf()) << "o not fully written (NaN poison left) or not finite";
  ASSERT_TRUE(pr.lse.all_finite_or_neg_inf()) << "lse not fully written";
  const ReferenceOutput ref = reference_attention(pr.q, pr.k, pr.v, c.causal, 1.0 / std::sqrt(double(c.shape.dim)));
  EXPECT_LT(relative_l2_error(pr.o, ref.o), o_tolerance(c.dtype));
  expect_lse_near(pr.lse, ref.lse, 1e-5);
}

INSTANTIATE_TEST_SUITE_P(Grid, FlashForward, ::testing::Combine(::testing::ValuesIn(attention_cases()),
                                                                ::testing::ValuesIn(kernel_isas())),
                         [](const auto& info) { return case_name(std::get<0>(info.param), std::get<1>(info.param)); });

class FlashForwardIsa : public PerIsaTest {};

// Logits of magnitude ~1e4: the online softmax must not overflow. In fp32, logits that large carry
// an absolute rounding error of about |logit| * FLT_EPSILON, which becomes the relative error of the
// weights; the tolerance is a small multiple of that, far below what an overflow or a lost
// rescaling would give (O(1)).
TEST_P(FlashForwardIsa, LargeLogitsStayExact) {
  for (bool causal : {false, true}) {
    const Case c{{1, 2, 1, 67, 150, 64}, causal, DType::kFloat32};
    Problem pr = make_problem(c, /*input_stddev=*/50.0);
    AttentionParams params = pr.params();
    params.mask.causal = causal;
    flash_attention_forward(params);
    ASSERT_TRUE(pr.o.all_finite_or_neg_inf());
    const double scale = 1.0 / 8.0;
    const ReferenceOutput ref = reference_attention(pr.q, pr.k, pr.v, causal, scale);
    double max_logit = 0.0;
    for (double l : ref.lse) max_logit = std::max(max_logit, std::abs(l));
    ASSERT_GT(max_logit, 5e3) << "the test inputs should produce logits near 1e4";
    EXPECT_LT(relative_l2_error(pr.o, ref.o), 8.0 * max_logit * FLT_EPSILON);
    expect_lse_near(pr.lse, ref.lse, 1e-6);
  }
}

TEST_P(FlashForwardIsa, SameBitsForOneAndTwoThreadsAndAnyBlocking) {
  // Many query blocks per KV head (threads share each packed head), and one query block per head
  // (each thread packs and finishes whole heads).
  for (const Shape& shape : {Shape{1, 4, 2, 150, 170, 64}, Shape{3, 4, 4, 20, 170, 64}}) {
    const Case c{shape, true, DType::kBFloat16};
    Problem pr = make_problem(c);
    AttentionParams params = pr.params();
    params.mask.causal = true;
    params.num_threads = 1;
    flash_attention_forward(params);
    const std::vector<unsigned char> one_thread = pr.o.bytes(), lse_one = pr.lse.bytes();
    pr.o.poison();
    pr.lse.poison();
    params.num_threads = 2;
    flash_attention_forward(params);
    EXPECT_EQ(pr.o.bytes(), one_thread);
    EXPECT_EQ(pr.lse.bytes(), lse_one);

    // Other tilings reorder the sums: equal within tolerance, not bit for bit.
    params.block_q = 7;
    params.block_k = 5;
    pr.o.poison();
    flash_attention_forward(params);
    const ReferenceOutput ref = reference_attention(pr.q, pr.k, pr.v, true, 1.0 / 8.0);
    EXPECT_LT(relative_l2_error(pr.o, ref.o), o_tolerance(c.dtype));
  }
}

TEST_P(FlashForwardIsa, CustomScaleAndNoLse) {
  const Case c{{1, 2, 2, 33, 47, 32}, false, DType::kFloat32};
  Problem pr = make_problem(c);
  AttentionParams params = pr.params();
  params.lse = {};
  params.softmax_scale = 0.37f;
  flash_attention_forward(params);
  const ReferenceOutput ref = reference_attention(pr.q, pr.k, pr.v, false, 0.37);
  EXPECT_LT(relative_l2_error(pr.o, ref.o), 1e-5);
  EXPECT_FALSE(pr.lse.all_finite_or_neg_inf()) << "lse was not requested and must stay untouched";
}

// The workspace is one head's packed K/V plus per-thread tiles: it depends on Nk and D, never on
// the batch or the number of heads.
TEST_P(FlashForwardIsa, ExtraMemoryIndependentOfBatchAndHeads) {
  std::uint64_t peaks[2];
  const Shape shapes[2] = {{1, 1, 1, 256, 512, 64}, {3, 8, 4, 256, 512, 64}};
  for (int i = 0; i < 2; ++i) {
    Problem pr = make_problem({shapes[i], false, DType::kBFloat16});
    AttentionParams params = pr.params();
    params.num_threads = 2;
    params.block_q = 64;  // the automatic choice shrinks query tiles when there are few heads
    params.block_k = 128;
    const std::uint64_t before = memory_stats().current_bytes;
    reset_peak_memory_stats();
    flash_attention_forward(params);
    peaks[i] = memory_stats().peak_bytes - before;
    EXPECT_EQ(memory_stats().current_bytes, before) << "workspace leaked";
  }
  EXPECT_GT(peaks[0], 0u);
  EXPECT_EQ(peaks[0], peaks[1]);
  EXPECT_LT(peaks[1], 2ull * 512 * 64 * 4 + (1u << 20));
}

// NaN neither vanishes nor leaks (FlashAttention's and PyTorch's rule): a row whose query, or a key
// it sees, holds a NaN gets O = NaN and LSE = NaN; a key or value a row does not see (causal mask)
// contributes exactly nothing, whatever it holds (inf, NaN). Every other row has the bits of the
// same call on inputs where those values are 0.
TEST_P(FlashForwardIsa, NanPropagatesToTheRowsThatSeeItAndNoOthers) {
  constexpr double kNan = std::numeric_limits<double>::quiet_NaN(), kInf = std::numeric_limits<double>::infinity();
  for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    const Case c{{1, 4, 2, 70, 70, 48}, true, dtype};  // GQA 2: query heads 0, 1 read KV head 0
    Problem clean = make_problem(c);
    Problem dirty = make_problem(c);
    dirty.q = clean.q;
    dirty.k = clean.k;
    dirty.v = clean.v;
    struct Planted {
      HostTensor Problem::*tensor;
      std::int64_t head, row;
      double value;
    };
    // q row 5 of head 0; key 40 of KV head 0 (rows >= 40 of heads 0, 1 see it); value 60 and key 61
    // of KV head 1 as inf / NaN, seen only by rows >= 60 (resp. 61) of heads 2, 3.
    const Planted planted[] = {{&Problem::q, 0, 5, kNan}, {&Problem::k, 0, 40, kNan}, {&Problem::v, 1, 60, kInf},
                               {&Problem::v, 1, 62, kNan}, {&Problem::k, 1, 61, kInf}};
    for (const Planted& x : planted) {
      for (std::int64_t d = 0; d < 48; d += 7) {
        (dirty.*x.tensor).set(x.value, 0, x.head, x.row, d);
        (clean.*x.tensor).set(0.0, 0, x.head, x.row, d);
      }
    }
    AttentionParams params = dirty.params();
    params.mask.causal = true;
    params.block_q = 16;  // several query blocks, and blocks that cross the diagonal
    params.block_k = 32;
    flash_attention_forward(params);
    params = clean.params();
    params.mask.causal = true;
    params.block_q = 16;
    params.block_k = 32;
    flash_attention_forward(params);
    for (std::int64_t h = 0; h < 4; ++h) {
      for (std::int64_t i = 0; i < 70; ++i) {
        const bool nan_row = (h == 0 && i == 5) || (h < 2 && i >= 40);
        const bool sees_inf = h >= 2 && i >= 60;  // not checked: inf x p is inf or NaN, either is right
        if (sees_inf) continue;
        const double lse = dirty.lse.at(0, h, i, 0);
        EXPECT_EQ(std::isnan(lse), nan_row) << to_string(dtype) << " head " << h << " row " << i << " LSE " << lse;
        if (!nan_row) {
          EXPECT_EQ(lse, clean.lse.at(0, h, i, 0)) << "head " << h << " row " << i;
        }
        for (std::int64_t d = 0; d < 48; ++d) {
          const double o = dirty.o.at(0, h, i, d);
          if (nan_row) {
            ASSERT_TRUE(std::isnan(o)) << to_string(dtype) << " head " << h << " row " << i << " d " << d << ": " << o;
          } else {
            ASSERT_EQ(o, clean.o.at(0, h, i, d)) << to_string(dtype) << " head " << h << " row " << i << " d " << d;
          }
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Isa, FlashForwardIsa, ::testing::ValuesIn(kernel_isas()), IsaName());

}  // namespace
}  // namespace pflash::testing
