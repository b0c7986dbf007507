// Exact scaled-dot-product attention, FlashAttention-2 style:
//   O = softmax(Q K^T * scale + mask) V,   LSE = log(sum_j exp(Q K^T * scale + mask))
// computed block by block with an online softmax, never materialising the Nq x Nk scores.
#pragma once

#include <cstdint>
#include <optional>

#include "pflash/tensor.hpp"

namespace pflash {

inline constexpr std::int64_t kMaxHeadDim = 256;

struct AttentionParams {
  TensorView q;          // [B, Hq, Nq, D]
  TensorView k;          // [B, Hkv, Nk, D], Hq a multiple of Hkv (GQA/MQA)
  TensorView v;          // [B, Hkv, Nk, D]
  MutableTensorView o;   // [B, Hq, Nq, D], same dtype as q
  MutableTensorView lse; // optional (data == nullptr: not written): [B, Hq, Nq] float32, natural log

  // Causal masking aligned to the bottom-right corner: query i sees keys j <= i + Nk - Nq
  // (FlashAttention >= 2.1). Rows that see no key get O = 0 and LSE = -inf.
  bool causal = false;
  std::optional<float> softmax_scale;  // default 1/sqrt(D)

  // Tiling: 0 chooses automatically.
  int block_q = 0;
  int block_k = 0;
  int num_threads = 0;  // 0: all threads (omp_get_max_threads)
};

// Throws pflash::Error (ErrorCode::kInvalidArgument) naming the offending argument.
void flash_attention_forward(const AttentionParams& params);

// The argument checks flash_attention_forward runs first, exposed so callers can validate early.
void validate(const AttentionParams& params, const char* function_name = "flash_attention_forward");

}  // namespace pflash
