// Public entry points: validate once, then hand the filled parameters to the backend.
#include "core/params.hpp"
#include "cpu/backend.hpp"
#include "pflash/attention.hpp"

namespace pflash {

void validate(const AttentionParams& params, const char* function_name) {
  (void)detail::make_fwd_params(params, function_name);
}

void flash_attention_forward(const AttentionParams& params) {
  cpu::flash_forward(detail::make_fwd_params(params, "flash_attention_forward"));
}

}  // namespace pflash
