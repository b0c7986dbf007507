// The CPU FlashAttention-2 backward against the float64 reference gradient, on every instruction
// set, over the forward's shape grid; determinism; memory; the training-step convenience.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "support/attention_cases.hpp"
#include "support/errors.hpp"
#include "support/isa.hpp"
#include "support/reference.hpp"
#include "support/tensors.hpp"

namespace pflash::testing {
namespace {

struct Problem {
  HostTensor q, k, v, o, lse, dout, dq, dk, dv;

  AttentionParams forward(bool causal) {
    AttentionParams p;
    p.q = q.view();
    p.k = k.view();
    p.v = v.view();
    p.o = o.mutable_view();
    p.lse = lse.mutable_view();
    p.mask.causal = causal;
    return p;
  }
  AttentionBackwardParams backward(bool causal) {
    AttentionBackwardParams p;
    p.q = q.view();
    p.k = k.view();
    p.v = v.view();
    p.o = o.view();
    p.dout = dout.view();
    p.lse = lse.view();
    p.dq = dq.mutable_view();
    p.dk = dk.mutable_view();
    p.dv = dv.mutable_view();
    p.mask.causal = causal;
    return p;
  }
  void poison_gradients() {
    dq.poison();
    dk.poison();
    dv.poison();
  }
};

Problem make_problem(const Case& c) {
  const Shape& s = c.shape;
  const std::vector<std::int64_t> q_shape{s.batch, s.heads_q, s.seq_q, s.dim}, kv_shape{s.batch, s.heads_kv, s.seq_k, s.dim};
  Problem pr{HostTensor(c.dtype, q_shape, c.layout),  HostTensor(c.dtype, kv_shape, c.layout),
             HostTensor(c.dtype, kv_shape, c.layout), HostTensor(c.dtype, q_shape, c.layout),
             HostTensor(DType::kFloat32, {s.batch, s.heads_q, s.seq_q}),
             HostTensor(c.dtype, q_shape, c.layout),  HostTensor(c.dtype, q_shape, c.layout),
             HostTensor(c.dtype, kv_shape, c.layout), HostTensor(c.dtype, kv_shape, c.layout)};
  auto rng = make_rng();
  pr.q.fill_normal(rng);
  pr.k.fill_normal(rng);
  pr.v.fill_normal(rng);
  pr.dout.fill_normal(rng);
  pr.o.poison();
  pr.lse.poison();
  pr.poison_gradients();
  return pr;
}

double grad_tolerance(DType dtype) { return dtype == DType::kFloat32 ? 1e-4 : 2e-2; }

void expect_gradients_match(const Problem& pr, const Case& c) {
  ASSERT_TRUE(pr.dq.all_finite_or_neg_inf()) << "dq not fully written (NaN poison left)";
  ASSERT_TRUE(pr.dk.all_finite_or_neg_inf()) << "dk not fully written";
  ASSERT_TRUE(pr.dv.all_finite_or_neg_inf()) << "dv not fully written";
  const ReferenceGradients ref = reference_attention_backward(pr.q, pr.k, pr.v, pr.dout, c.causal,
                                                              1.0 / std::sqrt(static_cast<double>(c.shape.dim)));
  EXPECT_LT(relative_l2_error(pr.dq, ref.dq), grad_tolerance(c.dtype)) << "dq";
  EXPECT_LT(relative_l2_error(pr.dk, ref.dk), grad_tolerance(c.dtype)) << "dk";
  EXPECT_LT(relative_l2_error(pr.dv, ref.dv), grad_tolerance(c.dtype)) << "dv";
}

class FlashBackward : public ::testing::TestWithParam<std::tuple<Case, CpuIsa>> {};

TEST_P(FlashBackward, MatchesFloat64ReferenceGradient) {
  const auto& [c, isa] = GetParam();
  if (detected_cpu_isa() < isa) GTEST_SKIP() << "this CPU has no " << to_string(isa);
  const IsaScope scope(isa);
  Problem pr = make_problem(c);
  flash_attention_forward(pr.forward(c.causal));
  const std::vector<unsigned char> q = pr.q.bytes(), k = pr.k.bytes(), v = pr.v.bytes(), o = pr.o.bytes(),
                                   dout = pr.dout.bytes(), lse = pr.lse.bytes();
  flash_attention_backward(pr.backward(c.causal));
  EXPECT_TRUE(pr.q.bytes() == q && pr.k.bytes() == k && pr.v.bytes() == v && pr.o.bytes() == o &&
              pr.dout.bytes() == dout && pr.lse.bytes() == lse)
      << "an input was modified";
  expect_gradients_match(pr, c);
}

INSTANTIATE_TEST_SUITE_P(Grid, FlashBackward,
                         ::testing::Combine(::testing::ValuesIn(attention_cases()), ::testing::ValuesIn(kernel_isas())),
                         [](const auto& info) { return case_name(std::get<0>(info.param), std::get<1>(info.param)); });

class FlashBackwardIsa : public PerIsaTest {};

// Gradients are reduced in one fixed order: the same bits on every run and for any thread count.
TEST_P(FlashBackwardIsa, DeterministicAcrossRunsAndThreadCounts) {
  const Case c{{2, 4, 2, 130, 150, 64}, true, DType::kBFloat16};
  Problem pr = make_problem(c);
  flash_attention_forward(pr.forward(true));
  std::vector<unsigned char> first[3];
  for (int run = 0; run < 4; ++run) {
    pr.poison_gradients();
    AttentionBackwardParams p = pr.backward(true);
    p.num_threads = 1 + run % 3;
    flash_attention_backward(p);
    const std::vector<unsigned char> got[3] = {pr.dq.bytes(), pr.dk.bytes(), pr.dv.bytes()};
    for (int i = 0; i < 3; ++i) {
      if (run == 0) {
        first[i] = got[i];
      } else {
        EXPECT_EQ(got[i], first[i]) << "gradient " << i << " differs with " << p.num_threads << " threads";
      }
    }
  }
}

TEST_P(FlashBackwardIsa, TrainingStepEqualsForwardThenBackward) {
  for (bool with_lse : {true, false}) {
    const Case c{{1, 4, 1, 70, 90, 48}, true, DType::kFloat32};
    Problem pr = make_problem(c);
    AttentionParams fwd = pr.forward(true);
    if (!with_lse) fwd.lse = {};
    flash_attention_forward_backward(fwd, pr.dout.view(), pr.dq.mutable_view(), pr.dk.mutable_view(),
                                     pr.dv.mutable_view());
    const std::vector<unsigned char> o = pr.o.bytes(), dq = pr.dq.bytes(), dk = pr.dk.bytes(), dv = pr.dv.bytes();
    expect_gradients_match(pr, c);

    pr.o.poison();
    pr.poison_gradients();
    flash_attention_forward(pr.forward(true));
    flash_attention_backward(pr.backward(true));
    EXPECT_EQ(pr.o.bytes(), o);
    EXPECT_EQ(pr.dq.bytes(), dq);
    EXPECT_EQ(pr.dk.bytes(), dk);
    EXPECT_EQ(pr.dv.bytes(), dv);
  }
}

// Large logits: P = exp(s - LSE) must stay in [0, 1] however large s is.
TEST_P(FlashBackwardIsa, LargeLogitsStayFinite) {
  const Case c{{1, 2, 1, 67, 90, 32}, false, DType::kFloat32};
  Problem pr = make_problem(c);
  auto rng = make_rng();
  pr.q.fill_normal(rng, 30.0);
  pr.k.fill_normal(rng, 30.0);
  flash_attention_forward(pr.forward(false));
  flash_attention_backward(pr.backward(false));
  ASSERT_TRUE(pr.dq.all_finite_or_neg_inf() && pr.dk.all_finite_or_neg_inf() && pr.dv.all_finite_or_neg_inf());
  const ReferenceGradients ref = reference_attention_backward(pr.q, pr.k, pr.v, pr.dout, false, 1.0 / std::sqrt(32.0));
  // Logits ~ 1e3: fp32 rounding of a logit is ~1e-4 absolute, which is the relative error of P.
  EXPECT_LT(relative_l2_error(pr.dv, ref.dv), 2e-3);
}

// The workspace is O((Nq + Nk) * D) per thread: doubling N doubles it, never quadruples it.
TEST_P(FlashBackwardIsa, ExtraMemoryLinearInSequenceLength) {
  std::uint64_t peaks[2];
  for (int i = 0; i < 2; ++i) {
    const std::int64_t n = 256 << i;
    Problem pr = make_problem({{1, 2, 2, n, n, 64}, false, DType::kBFloat16});
    flash_attention_forward(pr.forward(false));
    AttentionBackwardParams p = pr.backward(false);
    p.num_threads = 2;
    const std::uint64_t before = memory_stats().current_bytes;
    reset_peak_memory_stats();
    flash_attention_backward(p);
    peaks[i] = memory_stats().peak_bytes - before;
    EXPECT_EQ(memory_stats().current_bytes, before) << "workspace leaked";
  }
  EXPECT_GT(peaks[0], 0u);
  EXPECT_LT(static_cast<double>(peaks[1]) / static_cast<double>(peaks[0]), 2.2);
  EXPECT_LT(peaks[1], 2ull * 8 * 512 * 64 * 4 + (1u << 20));  // 2 threads x 8 rows of (N x D) fp32
}

// NaN neither vanishes nor leaks in the gradients: a query row whose forward saw a NaN (its own
// query here) and a dO row holding one get NaN dq, and so do dk and dv of every key those rows see;
// an inf key or value that a row does not see (causal mask) leaves its dq alone. Every other
// gradient row has the bits of the same step on inputs with zeros there.
TEST_P(FlashBackwardIsa, NanPropagatesToTheGradientsThatSeeItAndNoOthers) {
  constexpr double kNan = std::numeric_limits<double>::quiet_NaN(), kInf = std::numeric_limits<double>::infinity();
  for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    const Case c{{1, 4, 2, 150, 150, 40}, true, dtype};  // GQA 2: query heads 0, 1 read KV head 0
    Problem clean = make_problem(c), dirty = make_problem(c);
    dirty.q = clean.q;
    dirty.k = clean.k;
    dirty.v = clean.v;
    dirty.dout = clean.dout;
    for (std::int64_t d = 0; d < 40; ++d) {  // whole rows: dv's columns follow dO's
      dirty.dout.set(kNan, 0, 1, 70, d);  // head 1, row 70
      clean.dout.set(0.0, 0, 1, 70, d);
    }
    for (std::int64_t d = 0; d < 40; d += 3) {
      dirty.q.set(kNan, 0, 0, 5, d);  // head 0, row 5: its forward is NaN
      clean.q.set(0.0, 0, 0, 5, d);
      dirty.k.set(kInf, 0, 1, 130, d);  // KV head 1 (query heads 2, 3): seen by rows >= 130 only
      clean.k.set(0.0, 0, 1, 130, d);
      dirty.v.set(kInf, 0, 1, 129, d);
      clean.v.set(0.0, 0, 1, 129, d);
    }
    for (Problem* pr : {&clean, &dirty}) {
      flash_attention_forward(pr->forward(true));
      flash_attention_backward(pr->backward(true));
    }
    const std::string name = std::string(to_string(dtype));
    auto expect_row = [&](const HostTensor& got, const HostTensor& want, std::int64_t h, std::int64_t i, bool nan,
                          const char* what) {
      for (std::int64_t d = 0; d < 40; ++d) {
        const double x = got.at(0, h, i, d);
        if (nan) {
          ASSERT_TRUE(std::isnan(x)) << name << " " << what << " head " << h << " row " << i << " d " << d << ": " << x;
        } else {
          ASSERT_EQ(x, want.at(0, h, i, d)) << name << " " << what << " head " << h << " row " << i << " d " << d;
        }
      }
    };
    for (std::int64_t i = 0; i < 150; ++i) {
      expect_row(dirty.dq, clean.dq, 0, i, i == 5, "dq");
      expect_row(dirty.dq, clean.dq, 1, i, i == 70, "dq");
      // KV head 0: keys up to 70 are seen by a NaN row.
      expect_row(dirty.dk, clean.dk, 0, i, i <= 70, "dk");
      expect_row(dirty.dv, clean.dv, 0, i, i <= 70, "dv");
      // Query heads 2, 3: rows before 129 see neither inf (rows from 129 on see them: not checked).
      if (i < 129) {
        expect_row(dirty.dq, clean.dq, 2, i, false, "dq");
        expect_row(dirty.dq, clean.dq, 3, i, false, "dq");
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Isa, FlashBackwardIsa, ::testing::ValuesIn(kernel_isas()), IsaName());

void expect_backward_invalid(const AttentionBackwardParams& p, const std::string& argument, const std::string& expected,
                             const std::string& got = "") {
  expect_invalid_argument([&] { flash_attention_backward(p); }, "flash_attention_backward", argument, expected, got);
}

TEST(ValidateBackward, BadArgumentsNameTheArgument) {
  Problem pr = make_problem({{2, 4, 2, 8, 10, 16}, false, DType::kFloat32});
  HostTensor dout_short(DType::kFloat32, {2, 4, 7, 16}), dq_bf16(DType::kBFloat16, {2, 4, 8, 16});
  auto p = pr.backward(false);
  p.lse = {};
  expect_backward_invalid(p, "lse", "the forward's LSE [B, Hq, Nq] fp32 (required)", "none");
  p = pr.backward(false);
  p.dout = dout_short.view();
  expect_backward_invalid(p, "dout", "shape [2, 4, 8, 16] (the shape of q)", "[2, 4, 7, 16]");
  p = pr.backward(false);
  p.dq = dq_bf16.mutable_view();
  expect_backward_invalid(p, "dq", "dtype fp32", "bf16");
  p = pr.backward(false);
  p.dk = MutableTensorView::contiguous(const_cast<void*>(pr.k.view().data), DType::kFloat32, {2, 2, 10, 16});
  expect_backward_invalid(p, "dk", "memory disjoint from input 'k'");
  p = pr.backward(false);
  p.dv = pr.dk.mutable_view();
  expect_backward_invalid(p, "dv", "memory disjoint from 'dk'");
  p = pr.backward(false);
  p.num_threads = -1;
  expect_backward_invalid(p, "num_threads", "0 (all) or a positive count", "-1");
}

// The training step writes o and lse before its backward reads dout: a dout under either is
// rejected before anything is written, as is every gradient over an input or an output of the forward.
TEST(ValidateBackward, TrainingStepRejectsDoutUnderItsForwardOutputs) {
  Problem pr = make_problem({{1, 2, 1, 8, 10, 16}, false, DType::kFloat32});
  HostTensor lse_and_dout(DType::kFloat32, {1, 2, 8, 16});  // lse [1, 2, 8] inside dout's memory
  const auto step = [&](AttentionParams fwd, TensorView dout, MutableTensorView dq) {
    return [=, &pr] { flash_attention_forward_backward(fwd, dout, dq, pr.dk.mutable_view(), pr.dv.mutable_view()); };
  };
  pr.o.poison();
  const std::vector<unsigned char> o_before = pr.o.bytes();
  expect_invalid_argument(step(pr.forward(false), pr.o.view(), pr.dq.mutable_view()),
                          "flash_attention_forward_backward", "dout", "memory disjoint from output 'o'");
  AttentionParams fwd = pr.forward(false);
  fwd.lse = MutableTensorView::contiguous(lse_and_dout.mutable_view().data, DType::kFloat32, {1, 2, 8});
  expect_invalid_argument(step(fwd, lse_and_dout.view(), pr.dq.mutable_view()), "flash_attention_forward_backward",
                          "dout", "memory disjoint from output 'lse'");
  expect_invalid_argument(step(pr.forward(false), pr.dout.view(), pr.o.mutable_view()),
                          "flash_attention_forward_backward", "dq", "memory disjoint from input 'o'");
  EXPECT_EQ(pr.o.bytes(), o_before) << "a rejected training step wrote o";
}

}  // namespace
}  // namespace pflash::testing
