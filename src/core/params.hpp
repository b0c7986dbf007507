// What a backend receives once the public arguments have been validated: raw pointers, sizes and
// element strides, filled in one place (core/validate.cpp) and passed by value.
#pragma once

#include <cstdint>

#include "pflash/attention.hpp"
#include "pflash/dtype.hpp"

namespace pflash::detail {

struct HeadStrides {  // element strides of a [B, H, N, ...] tensor
  std::int64_t batch = 0;
  std::int64_t head = 0;
  std::int64_t row = 0;
};

struct FwdParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* o = nullptr;
  float* lse = nullptr;  // may be null
  DType dtype = DType::kFloat32;

  std::int64_t batch = 0;
  std::int64_t heads_q = 0;
  std::int64_t heads_kv = 0;
  std::int64_t seq_q = 0;
  std::int64_t seq_k = 0;
  std::int64_t dim = 0;
  HeadStrides q_strides, k_strides, v_strides, o_strides, lse_strides;

  float scale = 1.0f;
  bool causal = false;
  int block_q = 0;  // 0: the backend chooses
  int block_k = 0;
  int num_threads = 1;

  std::int64_t group_size() const { return heads_q / heads_kv; }
  // Bottom-right causal alignment: query row i sees keys j <= i + causal_offset().
  std::int64_t causal_offset() const { return seq_k - seq_q; }
};

// Validates (throwing pflash::Error) and fills the backend parameters.
FwdParams make_fwd_params(const AttentionParams& params, const char* function_name);

}  // namespace pflash::detail
