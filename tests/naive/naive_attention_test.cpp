#include <gtest/gtest.h>

#include <cmath>
#include <string>

#include "support/reference.hpp"
#include "support/tensors.hpp"

namespace pflash::testing {
namespace {

struct Problem {
  HostTensor q, k, v, o, lse;
  Problem(DType dtype, std::int64_t b, std::int64_t hq, std::int64_t hkv, std::int64_t nq, std::int64_t nk,
          std::int64_t d, Layout layout = Layout::kBhnd)
      : q(dtype, {b, hq, nq, d}, layout),
        k(dtype, {b, hkv, nk, d}, layout),
        v(dtype, {b, hkv, nk, d}, layout),
        o(dtype, {b, hq, nq, d}, layout),
        lse(DType::kFloat32, {b, hq, nq}) {
    auto rng = make_rng();
    q.fill_normal(rng);
    k.fill_normal(rng);
    v.fill_normal(rng);
    o.poison();
    lse.poison();
  }
  AttentionParams params(bool causal) {
    AttentionParams p;
    p.q = q.view();
    p.k = k.view();
    p.v = v.view();
    p.o = o.mutable_view();
    p.lse = lse.mutable_view();
    p.mask.causal = causal;
    return p;
  }
};

TEST(NaiveAttention, MatchesFloat64Reference) {
  for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    for (bool causal : {false, true}) {
      for (Layout layout : {Layout::kBhnd, Layout::kBnhd}) {
        Problem pr(dtype, 2, 4, 2, 57, 41, 96, layout);  // Nq > Nk: causal rows with no visible key
        naive_attention(pr.params(causal));
        ASSERT_TRUE(pr.o.all_finite_or_neg_inf());
        const ReferenceOutput ref = reference_attention(pr.q, pr.k, pr.v, causal, 1.0 / std::sqrt(96.0));
        EXPECT_LT(relative_l2_error(pr.o, ref.o), dtype == DType::kFloat32 ? 1e-5 : 1e-2);
        for (std::int64_t h = 0; h < 4; ++h) {
          const double want = ref.lse[static_cast<std::size_t>((1 * 4 + h) * 57 + 3)];
          EXPECT_TRUE(lse_near(pr.lse.at(1, h, 3), want, 1e-5)) << "head " << h;
        }
      }
    }
  }
}

TEST(NaiveAttention, AgreesWithFlash) {
  Problem naive(DType::kBFloat16, 1, 8, 2, 130, 200, 64);
  Problem flash = naive;
  naive_attention(naive.params(true));
  flash_attention_forward(flash.params(true));
  const ReferenceOutput ref = reference_attention(naive.q, naive.k, naive.v, true, 1.0 / 8.0);
  EXPECT_LT(relative_l2_error(naive.o, ref.o), 1e-2);
  EXPECT_LT(relative_l2_error(flash.o, ref.o), 1e-2);
  std::vector<double> flash_o;
  for (std::int64_t h = 0; h < 8; ++h)
    for (std::int64_t i = 0; i < 130; ++i)
      for (std::int64_t d = 0; d < 64; ++d) flash_o.push_back(flash.o.at(0, h, i, d));
  // Both round O to bf16 from fp32 sums taken in different orders: a few bf16 ulps apart at most.
  EXPECT_LT(relative_l2_error(naive.o, flash_o), 1e-2);
}

// One query row (a decode-like call) may come with any row stride, 2^40 included: the library never
// steps it, and BLAS, which takes leading dimensions as int and wants them >= D, must not see it
// (found by the fuzzer: OpenBLAS printed "parameter number 13 had an illegal value" and computed nothing).
TEST(NaiveAttention, OneRowWithAnyRowStride) {
  Problem pr(DType::kFloat32, 1, 2, 1, 1, 30, 16);
  AttentionParams p = pr.params(false);
  for (std::int64_t row_stride : {std::int64_t{0}, std::int64_t{3}, std::int64_t{1} << 40}) {
    pr.o.poison();
    p.q.strides[2] = row_stride;
    p.o.strides[2] = row_stride;
    naive_attention(p);
    ASSERT_TRUE(pr.o.all_finite_or_neg_inf()) << row_stride;
    const ReferenceOutput ref = reference_attention(pr.q, pr.k, pr.v, false, 0.25);
    EXPECT_LT(relative_l2_error(pr.o, ref.o), 1e-5) << "row stride " << row_stride;
  }
}

TEST(NaiveAttention, OutOfMemoryUnderBudgetBeforeAllocating) {
  // A view that claims Nq = Nk = 32768 over 8 heads: the scores alone are 32 GiB. Only the budget
  // check runs, so the tiny buffers behind the views are never read.
  HostTensor small(DType::kFloat32, {1, 1, 1, 1});
  AttentionParams p;
  p.q = TensorView::strided(small.view().data, DType::kFloat32, {1, 8, 32768, 128}, {0, 0, 0, 1});
  p.k = p.q;
  p.v = p.q;
  HostTensor o(DType::kFloat32, {1, 8, 32768, 128});
  p.o = o.mutable_view();
  const std::uint64_t scores = 8ull * 32768 * 32768 * 4;
  EXPECT_GE(naive_attention_bytes(p), scores);
  const std::uint64_t before = memory_stats().current_bytes;
  reset_peak_memory_stats();
  try {
    naive_attention(p, {.memory_budget = 16ull << 30});
    FAIL() << "expected OutOfMemoryError";
  } catch (const OutOfMemoryError& e) {
    EXPECT_EQ(e.code(), ErrorCode::kOutOfMemory);
    EXPECT_EQ(e.bytes_needed(), naive_attention_bytes(p));
    const std::string message = e.what();
    EXPECT_NE(message.find("needs " + std::to_string(naive_attention_bytes(p)) + " bytes"), std::string::npos)
        << message;
    EXPECT_NE(message.find("memory budget 17179869184 bytes (16.00 GiB)"), std::string::npos) << message;
  }
  EXPECT_EQ(memory_stats().peak_bytes, before) << "nothing may be allocated before the budget check";
}

TEST(NaiveAttention, ReportsTheBytesItAllocates) {
  for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    Problem pr(dtype, 1, 4, 4, 100, 120, 32);
    const std::uint64_t before = memory_stats().current_bytes;
    reset_peak_memory_stats();
    naive_attention(pr.params(false), {.memory_budget = naive_attention_bytes(pr.params(false))});
    EXPECT_EQ(memory_stats().peak_bytes - before, naive_attention_bytes(pr.params(false)));
    const std::uint64_t scores = 4ull * 100 * 120 * 4;
    if (dtype == DType::kFloat32) {
      EXPECT_EQ(naive_attention_bytes(pr.params(false)), scores);  // fp32 inputs are read in place
    } else {
      EXPECT_EQ(naive_attention_bytes(pr.params(false)), scores + 4ull * (2 * 4 * 100 * 32 + 2 * 4 * 120 * 32));
    }
  }
}

}  // namespace
}  // namespace pflash::testing
