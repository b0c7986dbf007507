// Exact scaled-dot-product attention, FlashAttention-2 style:
//   S = cap(Q K^T * scale),  O = softmax(S + mask, sinks) V,  LSE = log(sum_j exp(S_j + mask_j) + exp(sink))
// computed block by block with an online softmax, never materialising the Nq x Nk scores. The mask is
// pflash/mask.hpp's (causal, sliding window, chunks, segment ids, lengths); cap(s) = c * tanh(s / c)
// with logits_soft_cap c > 0 (Gemma 2), the identity otherwise; a sink is one logit per query head
// that joins every row's denominator and nothing else (gpt-oss).
//
// NaN, on every instruction set, forward, backward and decode alike (FlashAttention's and PyTorch's
// rule): a row whose query, or a key or value it sees, holds a NaN gets O = NaN and LSE = NaN, and
// NaN gradients follow it (dq of the row, dk and dv of the keys it sees). A key or value a row does
// not see (masked) contributes exactly nothing to it, whatever it holds, inf and NaN included.
#pragma once

#include <cstdint>
#include <optional>

#include "pflash/mask.hpp"
#include "pflash/tensor.hpp"

namespace pflash {

inline constexpr std::int64_t kMaxHeadDim = 256;

struct AttentionParams {
  TensorView q;          // [B, Hq, Nq, D]
  TensorView k;          // [B, Hkv, Nk, D], Hq a multiple of Hkv (GQA/MQA)
  TensorView v;          // [B, Hkv, Nk, D]
  MutableTensorView o;   // [B, Hq, Nq, D], same dtype as q
  MutableTensorView lse; // optional (data == nullptr: not written): [B, Hq, Nq] float32, natural log

  // Which keys each query sees (pflash/mask.hpp; mask.causal: bottom-right aligned by default, query i
  // sees keys j <= i + Nk - Nq). Rows that see no key get O = 0 and LSE = -inf.
  AttentionMask mask;
  std::optional<float> softmax_scale;  // default 1/sqrt(D)
  float logits_soft_cap = 0.0f;        // > 0: cap the scaled scores at +-logits_soft_cap (tanh)
  TensorView sinks;                    // optional [Hq] fp32 logits; the LSE includes them

  // Tiling: 0 chooses automatically.
  int block_q = 0;
  int block_k = 0;
  int num_threads = 0;  // 0: all threads (omp_get_max_threads); more than the machine runs: clamped (resolve_num_threads)
};

// Throws pflash::Error (ErrorCode::kInvalidArgument) naming the offending argument.
void flash_attention_forward(const AttentionParams& params);

// The gradients of O with respect to Q, K, V, FlashAttention-2 style: each tile of the probabilities
// is recomputed from Q, K and the forward's LSE (P = exp(Q K^T * scale - LSE)), never stored whole.
//   D_i = rowsum(dO_i * O_i),  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - D),
//   dQ = dS K * scale,  dK = dS^T Q * scale  (a KV head's dK, dV sum over its GQA group's query heads).
// Deterministic: the same inputs give the same bits for any num_threads.
struct AttentionBackwardParams {
  TensorView q, k, v;     // as in AttentionParams
  TensorView o;           // [B, Hq, Nq, D], the forward's output
  TensorView dout;        // [B, Hq, Nq, D], the gradient of the loss with respect to o
  TensorView lse;         // [B, Hq, Nq] fp32, the forward's LSE (required)
  MutableTensorView dq;   // [B, Hq, Nq, D]
  MutableTensorView dk;   // [B, Hkv, Nk, D]
  MutableTensorView dv;   // [B, Hkv, Nk, D]; all of q, k, v, o, dout, dq, dk, dv share one dtype

  AttentionMask mask;                  // must match the forward
  std::optional<float> softmax_scale;  // must match the forward; default 1/sqrt(D)
  float logits_soft_cap = 0.0f;        // must match the forward
  TensorView sinks;                    // the forward's sinks, needed only for dsinks (the LSE holds them)
  MutableTensorView dsinks;            // optional [Hq] fp32: d loss / d sinks, summed over the batch
  int num_threads = 0;                 // 0: all threads; clamped as in AttentionParams
};

void flash_attention_backward(const AttentionBackwardParams& params);

// One training step's attention: the forward (writing forward.o, and forward.lse when given, else
// an internal LSE buffer), then the backward for dout, writing dq, dk, dv. The backward takes the
// mask, softmax_scale, soft cap, sinks and num_threads from `forward`.
void flash_attention_forward_backward(const AttentionParams& forward, TensorView dout, MutableTensorView dq,
                                      MutableTensorView dk, MutableTensorView dv);

// The argument checks flash_attention_forward runs first, exposed so callers can validate early.
void validate(const AttentionParams& params, const char* function_name = "flash_attention_forward");

}  // namespace pflash
