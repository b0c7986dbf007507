// Checks of decoding's arguments that another entry point shares (sharded_flash_decode in the MPI
// layer validates its outputs as flash_decode does).
#pragma once

#include <initializer_list>
#include <utility>

#include "core/checker.hpp"
#include "pflash/tensor.hpp"

namespace pflash::detail {

// o: [B, Hq, T, D] like q, in q's dtype or fp32; lse (optional): [B, Hq, T] fp32; both disjoint from
// every input named and from each other.
void check_decode_outputs(const Checker& check, const TensorView& q, const TensorView& o, const TensorView& lse,
                          std::initializer_list<std::pair<const char*, TensorView>> inputs);

}  // namespace pflash::detail
