// The CPU backend's entry points, one per kernel family; the SIMD kernels pick the instruction set at
// run time (dispatch.cpp).
#pragma once

#include "core/params.hpp"

namespace pflash::cpu {

void flash_forward(detail::FwdParams params);
void flash_backward(detail::BwdParams params);
void flash_decode(detail::DecodeParams params);  // params.num_splits >= 1

// One definition per instruction set, each in its own translation unit (<family>_<isa>.cpp).
void flash_forward_portable(detail::FwdParams params);
void flash_forward_avx2(detail::FwdParams params);
void flash_forward_avx512(detail::FwdParams params);
void flash_forward_avx512_bf16(detail::FwdParams params);
void flash_forward_amx_bf16(detail::FwdParams params);
void flash_backward_portable(detail::BwdParams params);
void flash_backward_avx2(detail::BwdParams params);
void flash_backward_avx512(detail::BwdParams params);
void flash_backward_avx512_bf16(detail::BwdParams params);
void flash_backward_amx_bf16(detail::BwdParams params);
void flash_decode_portable(detail::DecodeParams params);
void flash_decode_avx2(detail::DecodeParams params);
void flash_decode_avx512(detail::DecodeParams params);
void flash_decode_avx512_bf16(detail::DecodeParams params);

// The split count for params.num_splits == 0 (decode_plan.cpp).
int choose_decode_splits(const detail::DecodeParams& params);

// Data movement and the exact merge: plain C++, the same on every instruction set.
void append_kv(detail::AppendParams params);
void merge_states(detail::MergeParams params);

}  // namespace pflash::cpu
