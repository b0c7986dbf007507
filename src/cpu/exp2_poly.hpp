// The polynomial every SIMD policy's exp2 evaluates: 2^f for |f| <= 1/2 in degree 6 (relative error
// < 2e-7), coefficients highest first for Horner's rule. One table, so the instruction sets agree lane
// for lane.
#pragma once

namespace pflash::cpu {

inline constexpr float kExp2Poly[] = {1.5403530393381606e-4f, 1.3333558146428443e-3f, 9.6181291076284772e-3f,
                                      5.5504108664821580e-2f, 2.4022650695910071e-1f, 6.9314718055994531e-1f,
                                      1.0f};

}  // namespace pflash::cpu
