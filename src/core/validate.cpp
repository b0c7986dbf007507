// The attention forward's argument checks (the checks every entry point shares are in checker.hpp).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

#include "core/checker.hpp"
#include "core/params.hpp"
#include "core/validate_mask.hpp"
#include "pflash/error.hpp"
#include "pflash/runtime.hpp"

namespace pflash::detail {

namespace {

constexpr const char* kQLayout = "[B, Hq, Nq, D]";
constexpr const char* kKvLayout = "[B, Hkv, Nk, D]";
constexpr const char* kOneDtype = "all of q, k, v, o share one dtype";
constexpr const char* kLseDtype = "an LSE is fp32";

// q, k, v and the scalar options every attention pass shares; fills everything but the outputs.
FwdParams check_problem(const Checker& check, const TensorView& q, const TensorView& k, const TensorView& v,
                        std::optional<float> softmax_scale, const AttentionMask& mask, float logits_soft_cap,
                        const TensorView& sinks, int num_threads) {
  check.tensor("q", q, 4, kQLayout);
  check.tensor("k", k, 4, kKvLayout);
  check.tensor("v", v, 4, kKvLayout);
  const DType dtype = q.dtype;
  check.dtype_matches("k", k, dtype);
  check.dtype_matches("v", v, dtype);

  const std::int64_t batch = q.size(0), heads_q = q.size(1), seq_q = q.size(2), dim = q.size(3);
  const std::int64_t heads_kv = k.size(1), seq_k = k.size(2);
  if (dim > kMaxHeadDim) {
    check.fail("q", "head_dim D <= " + std::to_string(kMaxHeadDim), "D = " + std::to_string(dim));
  }
  check.shape_is("k", k, {batch, heads_kv, seq_k, dim}, "(batch and head_dim of q)");
  check.shape_is("v", v, {batch, heads_kv, seq_k, dim}, "(the shape of k)");
  if (heads_q % heads_kv != 0) {
    check.fail("k", "a head count Hkv dividing Hq = " + std::to_string(heads_q) + " (GQA/MQA)",
               "Hkv = " + std::to_string(heads_kv));
  }
  if (softmax_scale && !std::isfinite(*softmax_scale)) {
    check.fail("softmax_scale", "a finite number", std::to_string(*softmax_scale));
  }
  if (num_threads < 0) check.fail("num_threads", "0 (all) or a positive count", std::to_string(num_threads));

  FwdParams p;
  p.q = q.data;
  p.k = k.data;
  p.v = v.data;
  p.dtype = dtype;
  p.batch = batch;
  p.heads_q = heads_q;
  p.heads_kv = heads_kv;
  p.seq_q = seq_q;
  p.seq_k = seq_k;
  p.dim = dim;
  p.q_strides = head_strides(q);
  p.k_strides = head_strides(k);
  p.v_strides = head_strides(v);
  p.scale = softmax_scale.value_or(1.0f / std::sqrt(static_cast<float>(dim)));
  p.mask = check_mask(check, mask, batch, seq_q, seq_k);
  p.soft_cap = check_soft_cap(check, logits_soft_cap);
  p.sinks = check_sinks(check, sinks, heads_q);
  p.num_threads = resolve_num_threads(num_threads);
  return p;
}

}  // namespace

FwdParams make_fwd_params(const AttentionParams& params, const char* function_name) {
  const Checker check(function_name);
  FwdParams p = check_problem(check, params.q, params.k, params.v, params.softmax_scale, params.mask,
                              params.logits_soft_cap, params.sinks, params.num_threads);
  const bool has_lse = !params.lse.empty();
  check.output("o", params.o, p.dtype, kOneDtype, {p.batch, p.heads_q, p.seq_q, p.dim}, kQLayout, "(the shape of q)",
               {{"q", params.q}, {"k", params.k}, {"v", params.v}});
  if (has_lse) {
    check.output("lse", params.lse, DType::kFloat32, kLseDtype, {p.batch, p.heads_q, p.seq_q}, "[B, Hq, Nq]",
                 "(the first three dimensions of q)", {{"q", params.q}, {"k", params.k}, {"v", params.v}});
    if (overlaps(params.lse, params.o)) check.fail("lse", "memory disjoint from 'o'", "an overlap");
  }
  constexpr int kMaxBlock = 4096;
  if (params.block_q < 0 || params.block_q > kMaxBlock) {
    check.fail("block_q", "0 (automatic) or 1.." + std::to_string(kMaxBlock), std::to_string(params.block_q));
  }
  if (params.block_k < 0 || params.block_k > kMaxBlock) {
    check.fail("block_k", "0 (automatic) or 1.." + std::to_string(kMaxBlock), std::to_string(params.block_k));
  }
  p.o = params.o.data;
  p.lse = has_lse ? static_cast<float*>(params.lse.data) : nullptr;
  p.o_strides = head_strides(params.o);
  if (has_lse) p.lse_strides = head_strides(params.lse);
  p.block_q = params.block_q;
  p.block_k = params.block_k;
  return p;
}

BwdParams make_bwd_params(const AttentionBackwardParams& params, const char* function_name) {
  const Checker check(function_name);
  BwdParams p;
  p.fwd = check_problem(check, params.q, params.k, params.v, params.softmax_scale, params.mask, params.logits_soft_cap,
                        params.sinks, params.num_threads);
  const FwdParams& f = p.fwd;
  // The inputs the forward produced.
  check.shaped_like("o", params.o, f.dtype, kOneDtype, {f.batch, f.heads_q, f.seq_q, f.dim}, kQLayout, "(the shape of q)");
  check.shaped_like("dout", params.dout, f.dtype, kOneDtype, {f.batch, f.heads_q, f.seq_q, f.dim}, kQLayout,
                    "(the shape of q)");
  if (params.lse.empty()) check.fail("lse", "the forward's LSE [B, Hq, Nq] fp32 (required)", "none");
  check.shaped_like("lse", params.lse, DType::kFloat32, kLseDtype, {f.batch, f.heads_q, f.seq_q}, "[B, Hq, Nq]",
                    "(the first three dimensions of q)");

  const auto inputs = {std::pair<const char*, TensorView>{"q", params.q}, {"k", params.k}, {"v", params.v},
                       {"o", params.o}, {"dout", params.dout}, {"lse", params.lse}};
  check.output("dq", params.dq, f.dtype, kOneDtype, {f.batch, f.heads_q, f.seq_q, f.dim}, kQLayout, "(the shape of q)",
               inputs);
  check.output("dk", params.dk, f.dtype, kOneDtype, {f.batch, f.heads_kv, f.seq_k, f.dim}, kKvLayout, "(the shape of k)",
               inputs);
  check.output("dv", params.dv, f.dtype, kOneDtype, {f.batch, f.heads_kv, f.seq_k, f.dim}, kKvLayout, "(the shape of v)",
               inputs);
  if (overlaps(params.dq, params.dk)) check.fail("dk", "memory disjoint from 'dq'", "an overlap");
  if (overlaps(params.dq, params.dv)) check.fail("dv", "memory disjoint from 'dq'", "an overlap");
  if (overlaps(params.dk, params.dv)) check.fail("dv", "memory disjoint from 'dk'", "an overlap");
  if (!params.dsinks.empty()) {
    if (params.sinks.empty()) check.fail("dsinks", "the forward's sinks in 'sinks' (dsinks needs them)", "no sinks");
    check.output("dsinks", params.dsinks, DType::kFloat32, "sink gradients are fp32", {f.heads_q}, "[Hq]",
                 "(one per query head)", inputs);
    for (const auto& [name, out] : {std::pair<const char*, TensorView>{"dq", params.dq}, {"dk", params.dk}, {"dv", params.dv}}) {
      if (overlaps(params.dsinks, out)) check.fail("dsinks", std::string("memory disjoint from '") + name + "'", "an overlap");
    }
    p.dsinks = static_cast<float*>(params.dsinks.data);
  }

  p.o = params.o.data;
  p.dout = params.dout.data;
  p.lse = static_cast<const float*>(params.lse.data);
  p.dq = params.dq.data;
  p.dk = params.dk.data;
  p.dv = params.dv.data;
  p.o_strides = head_strides(params.o);
  p.dout_strides = head_strides(params.dout);
  p.lse_strides = head_strides(params.lse);
  p.dq_strides = head_strides(params.dq);
  p.dk_strides = head_strides(params.dk);
  p.dv_strides = head_strides(params.dv);
  return p;
}

}  // namespace pflash::detail
