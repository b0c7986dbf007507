#include "support/mask_cases.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "support/reference.hpp"
#include "support/tensors.hpp"

namespace pflash::testing {

AttentionMask geometry(bool causal, std::int64_t left, std::int64_t right, std::int64_t chunk,
                       std::optional<std::int64_t> offset) {
  AttentionMask m;
  m.causal = causal;
  m.window_left = left;
  m.window_right = right;
  m.chunk_size = chunk;
  m.query_offset = offset;
  return m;
}

std::vector<MaskCase> mask_cases() {
  constexpr std::int64_t kNone = kUnboundedWindow;
  return {
      {"window_causal", 1, 2, 1, 150, 150, 64, geometry(true, 40, kNone)},
      {"window_two_sided", 1, 2, 2, 100, 130, 48, geometry(false, 20, 13)},
      {"window_of_one", 1, 1, 1, 70, 70, 32, geometry(true, 0, 0)},
      {"window_past_the_sequence", 1, 2, 2, 60, 90, 32, geometry(true, 1000, kNone)},
      {"chunk_causal", 1, 2, 2, 100, 100, 32, geometry(true, kNone, kNone, 32)},
      {"chunk_full_nq_ne_nk", 1, 2, 1, 70, 120, 40, geometry(false, kNone, kNone, 25)},
      {"top_left_causal_nq_gt_nk", 1, 2, 2, 120, 80, 32, geometry(true, kNone, kNone, 0, 0)},
      {"documents_causal", 2, 2, 2, 130, 130, 64, geometry(true, kNone, kNone), 1},
      {"segments_random", 1, 2, 2, 90, 110, 32, geometry(false, kNone, kNone), 2},
      {"lengths", 4, 2, 1, 50, 70, 32, geometry(true, kNone, kNone, 0, 0), 0, true},
      {"soft_cap", 1, 2, 2, 100, 100, 64, geometry(true, kNone, kNone), 0, false, 3.0f, false, 3.0},
      {"sinks", 1, 4, 2, 80, 80, 32, geometry(true, kNone, kNone), 0, false, 0.0f, true},
      {"everything", 2, 4, 1, 96, 96, 96, geometry(true, 30, kNone), 1, true, 2.5f, true, 2.0},
  };
}

namespace {

// The rule's definition (pflash/mask.hpp), independently of the library's ranges.
std::function<bool(std::int64_t, std::int64_t, std::int64_t)> visibility(const MaskCase& c,
                                                                          const std::vector<std::int32_t>& q_ids,
                                                                          const std::vector<std::int32_t>& kv_ids,
                                                                          const std::vector<std::int32_t>& q_len,
                                                                          const std::vector<std::int32_t>& kv_len) {
  const AttentionMask m = c.mask;
  const std::int64_t offset = m.query_offset.value_or(c.seq_k - c.seq_q);
  return [=](std::int64_t b, std::int64_t i, std::int64_t j) {
    const std::int64_t p = offset + i, s = j;
    const auto floor_div = [](std::int64_t x, std::int64_t d) { return x >= 0 ? x / d : -((-x + d - 1) / d); };
    if (m.causal && s > p) return false;
    if (m.window_left >= 0 && s < p - m.window_left) return false;
    if (m.window_right >= 0 && s > p + m.window_right) return false;
    if (m.chunk_size > 0 && floor_div(s, m.chunk_size) != floor_div(p, m.chunk_size)) return false;
    if (!q_ids.empty() && q_ids[b * c.seq_q + i] != kv_ids[b * c.seq_k + j]) return false;
    if (!q_len.empty() && (i >= q_len[b] || j >= kv_len[b])) return false;
    return true;
  };
}

std::vector<std::int32_t> segment_ids(int kind, std::int64_t batch, std::int64_t n, std::mt19937_64& rng) {
  std::vector<std::int32_t> ids(static_cast<std::size_t>(batch * n));
  for (std::int64_t b = 0; b < batch; ++b) {
    std::int32_t id = 0, left = 1;
    for (std::int64_t i = 0; i < n; ++i) {
      if (kind == 1 && --left == 0) {  // documents of 1..n/3 tokens
        ++id;
        left = static_cast<std::int32_t>(1 + rng() % static_cast<std::uint64_t>(n / 3));
      }
      ids[static_cast<std::size_t>(b * n + i)] = kind == 1 ? id : static_cast<std::int32_t>(rng() % 3);
    }
  }
  return ids;
}

}  // namespace

KernelRunner public_kernels() {
  return {[](const AttentionParams& p) { flash_attention_forward(p); },
          [](const AttentionBackwardParams& p) { flash_attention_backward(p); }};
}

void expect_mask_case_matches_reference(const MaskCase& c, DType dtype, const KernelRunner& kernels) {
  const std::vector<std::int64_t> q_shape{c.batch, c.heads_q, c.seq_q, c.dim}, kv_shape{c.batch, c.heads_kv, c.seq_k, c.dim};
  HostTensor q(dtype, q_shape), k(dtype, kv_shape), v(dtype, kv_shape), o(dtype, q_shape), dout(dtype, q_shape),
      dq(dtype, q_shape), dk(dtype, kv_shape), dv(dtype, kv_shape);
  HostTensor lse(DType::kFloat32, {c.batch, c.heads_q, c.seq_q}), sinks(DType::kFloat32, {c.heads_q, 1, 1}),
      dsinks(DType::kFloat32, {c.heads_q, 1, 1});
  auto rng = make_rng();
  q.fill_normal(rng, c.input_stddev);
  k.fill_normal(rng, c.input_stddev);
  v.fill_normal(rng);
  dout.fill_normal(rng);
  sinks.fill_normal(rng);
  for (HostTensor* t : {&o, &lse, &dq, &dk, &dv, &dsinks}) t->poison();

  std::vector<std::int32_t> q_ids, kv_ids, q_len, kv_len;
  if (c.segments != 0) {
    q_ids = segment_ids(c.segments, c.batch, c.seq_q, rng);
    kv_ids = c.seq_q == c.seq_k && c.segments == 1 ? q_ids : segment_ids(c.segments, c.batch, c.seq_k, rng);
  }
  if (c.lengths) {
    for (std::int64_t b = 0; b < c.batch; ++b) {  // no queries, both full, no keys, then random
      q_len.push_back(b == 0 ? 0 : b == 1 ? static_cast<std::int32_t>(c.seq_q) : static_cast<std::int32_t>(rng() % c.seq_q));
      kv_len.push_back(b == 1 ? static_cast<std::int32_t>(c.seq_k) : b == 2 ? 0 : static_cast<std::int32_t>(1 + rng() % c.seq_k));
    }
  }
  AttentionMask mask = c.mask;
  mask.q_segment_ids = q_ids;
  mask.kv_segment_ids = kv_ids;
  mask.q_lengths = q_len;
  mask.kv_lengths = kv_len;
  // A 1-D view of the sinks: [Hq] fp32.
  const TensorView sinks_view = c.sinks ? TensorView::contiguous(sinks.view().data, DType::kFloat32, {c.heads_q})
                                        : TensorView{};

  AttentionParams fwd;
  fwd.q = q.view();
  fwd.k = k.view();
  fwd.v = v.view();
  fwd.o = o.mutable_view();
  fwd.lse = lse.mutable_view();
  fwd.mask = mask;
  fwd.logits_soft_cap = c.soft_cap;
  fwd.sinks = sinks_view;
  kernels.forward(fwd);

  AttentionBackwardParams bwd;
  bwd.q = q.view();
  bwd.k = k.view();
  bwd.v = v.view();
  bwd.o = o.view();
  bwd.dout = dout.view();
  bwd.lse = lse.view();
  bwd.dq = dq.mutable_view();
  bwd.dk = dk.mutable_view();
  bwd.dv = dv.mutable_view();
  bwd.mask = mask;
  bwd.logits_soft_cap = c.soft_cap;
  bwd.sinks = sinks_view;
  if (c.sinks) bwd.dsinks = MutableTensorView::contiguous(dsinks.mutable_view().data, DType::kFloat32, {c.heads_q});
  kernels.backward(bwd);

  ReferenceMask ref_mask;
  ref_mask.visible = visibility(c, q_ids, kv_ids, q_len, kv_len);
  ref_mask.soft_cap = c.soft_cap;
  if (c.sinks) {
    for (std::int64_t h = 0; h < c.heads_q; ++h) ref_mask.sinks.push_back(sinks.at(h, 0, 0));
  }
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.dim));
  const Dense dq_in = to_dense(q), dk_in = to_dense(k), dv_in = to_dense(v);
  const ReferenceOutput ref = reference_attention(dq_in, dk_in, dv_in, ref_mask, scale);
  const ReferenceGradients grads = reference_attention_backward(dq_in, dk_in, dv_in, to_dense(dout), ref_mask, scale);

  const double o_tol = dtype == DType::kFloat32 ? 1e-5 : 1e-2, grad_tol = dtype == DType::kFloat32 ? 1e-4 : 3e-2;
  ASSERT_TRUE(o.all_finite_or_neg_inf() && lse.all_finite_or_neg_inf()) << "o or lse not fully written";
  EXPECT_LT(relative_l2_error(o, ref.o), o_tol) << "o";
  expect_lse_near(lse, ref.lse, 1e-5);
  ASSERT_TRUE(dq.all_finite_or_neg_inf() && dk.all_finite_or_neg_inf() && dv.all_finite_or_neg_inf());
  EXPECT_LT(relative_l2_error(dq, grads.dq), grad_tol) << "dq";
  EXPECT_LT(relative_l2_error(dk, grads.dk), grad_tol) << "dk";
  EXPECT_LT(relative_l2_error(dv, grads.dv), grad_tol) << "dv";
  if (c.sinks) {
    std::vector<double> got;
    for (std::int64_t h = 0; h < c.heads_q; ++h) got.push_back(dsinks.at(h, 0, 0));
    for (std::int64_t h = 0; h < c.heads_q; ++h) {
      EXPECT_NEAR(got[static_cast<std::size_t>(h)], grads.dsinks[static_cast<std::size_t>(h)],
                  grad_tol * (1.0 + std::abs(grads.dsinks[static_cast<std::size_t>(h)])))
          << "dsinks[" << h << "]";
    }
  }
}

}  // namespace pflash::testing
