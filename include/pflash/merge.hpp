// The exact merge of partial attention results. Attention over a key set split into disjoint parts
// i = 0..S-1, each giving (O_i, LSE_i), is
//   LSE = log(sum_i exp(LSE_i)),   O = sum_i exp(LSE_i - LSE) O_i,
// computed shifted by max_i LSE_i so that no exponential overflows. The merge is associative and
// commutative; a part with LSE = -inf (no visible key) contributes nothing, and a row whose parts
// are all -inf gets O = 0, LSE = -inf. Split-KV decoding and the multi-device decode use this function.
#pragma once

#include "pflash/tensor.hpp"

namespace pflash {

struct MergeParams {
  TensorView o_partials;    // [S, N, H, D] fp32 or bf16
  TensorView lse_partials;  // [S, N, H] fp32, natural log
  MutableTensorView o;      // [N, H, D] fp32 or bf16
  MutableTensorView lse;    // optional [N, H] fp32
  int num_threads = 0;      // 0: all threads; more than the machine runs: clamped (resolve_num_threads)
};

void merge_attention_states(const MergeParams& params);

}  // namespace pflash
