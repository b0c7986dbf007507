// The attention forward's argument checks (the checks every entry point shares are in checker.hpp).
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "core/checker.hpp"
#include "core/params.hpp"
#include "pflash/error.hpp"
#include "pflash/runtime.hpp"

namespace pflash::detail {

FwdParams make_fwd_params(const AttentionParams& params, const char* function_name) {
  const Checker check(function_name);
  constexpr const char* kQLayout = "[B, Hq, Nq, D]";
  constexpr const char* kKvLayout = "[B, Hkv, Nk, D]";
  check.tensor("q", params.q, 4, kQLayout);
  check.tensor("k", params.k, 4, kKvLayout);
  check.tensor("v", params.v, 4, kKvLayout);
  check.tensor("o", params.o, 4, kQLayout);

  const DType dtype = params.q.dtype;
  check.dtype_matches("k", params.k, dtype);
  check.dtype_matches("v", params.v, dtype);
  check.dtype_matches("o", params.o, dtype);

  const std::int64_t batch = params.q.size(0), heads_q = params.q.size(1), seq_q = params.q.size(2),
                     dim = params.q.size(3);
  const std::int64_t heads_kv = params.k.size(1), seq_k = params.k.size(2);
  if (dim > kMaxHeadDim) {
    check.fail("q", "head_dim D <= " + std::to_string(kMaxHeadDim), "D = " + std::to_string(dim));
  }
  check.shape_is("k", params.k, {batch, heads_kv, seq_k, dim}, "(batch and head_dim of q)");
  check.shape_is("v", params.v, {batch, heads_kv, seq_k, dim}, "(the shape of k)");
  if (heads_q % heads_kv != 0) {
    check.fail("k", "a head count Hkv dividing Hq = " + std::to_string(heads_q) + " (GQA/MQA)",
               "Hkv = " + std::to_string(heads_kv));
  }
  check.shape_is("o", params.o, {batch, heads_q, seq_q, dim}, "(the shape of q)");
  check.non_self_overlapping("o", params.o);

  const bool has_lse = !params.lse.empty();
  if (has_lse) {
    check.tensor("lse", params.lse, 3, "[B, Hq, Nq]");
    if (params.lse.dtype != DType::kFloat32) {
      check.fail("lse", "dtype fp32", std::string(to_string(params.lse.dtype)));
    }
    check.shape_is("lse", params.lse, {batch, heads_q, seq_q}, "(the first three dimensions of q)");
    check.non_self_overlapping("lse", params.lse);
  }

  const std::array<std::pair<const char*, TensorView>, 3> inputs{{{"q", params.q}, {"k", params.k}, {"v", params.v}}};
  for (const auto& [name, input] : inputs) {
    if (overlaps(params.o, input)) check.fail("o", std::string("memory disjoint from input '") + name + "'", "an overlap");
    if (has_lse && overlaps(params.lse, input)) {
      check.fail("lse", std::string("memory disjoint from input '") + name + "'", "an overlap");
    }
  }
  if (has_lse && overlaps(params.lse, params.o)) check.fail("lse", "memory disjoint from 'o'", "an overlap");

  if (params.softmax_scale && !std::isfinite(*params.softmax_scale)) {
    check.fail("softmax_scale", "a finite number", std::to_string(*params.softmax_scale));
  }
  constexpr int kMaxBlock = 4096;
  if (params.block_q < 0 || params.block_q > kMaxBlock) {
    check.fail("block_q", "0 (automatic) or 1.." + std::to_string(kMaxBlock), std::to_string(params.block_q));
  }
  if (params.block_k < 0 || params.block_k > kMaxBlock) {
    check.fail("block_k", "0 (automatic) or 1.." + std::to_string(kMaxBlock), std::to_string(params.block_k));
  }
  if (params.num_threads < 0) check.fail("num_threads", "0 (all) or a positive count", std::to_string(params.num_threads));

  FwdParams p;
  p.q = params.q.data;
  p.k = params.k.data;
  p.v = params.v.data;
  p.o = params.o.data;
  p.lse = has_lse ? static_cast<float*>(params.lse.data) : nullptr;
  p.dtype = dtype;
  p.batch = batch;
  p.heads_q = heads_q;
  p.heads_kv = heads_kv;
  p.seq_q = seq_q;
  p.seq_k = seq_k;
  p.dim = dim;
  p.q_strides = head_strides(params.q);
  p.k_strides = head_strides(params.k);
  p.v_strides = head_strides(params.v);
  p.o_strides = head_strides(params.o);
  if (has_lse) p.lse_strides = head_strides(params.lse);
  p.scale = params.softmax_scale.value_or(1.0f / std::sqrt(static_cast<float>(dim)));
  p.causal = params.causal;
  p.block_q = params.block_q;
  p.block_k = params.block_k;
  p.num_threads = params.num_threads > 0 ? params.num_threads : default_num_threads();
  return p;
}

}  // namespace pflash::detail
