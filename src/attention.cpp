// Public entry points: validate once, then hand the filled parameters to the backend.
#include "core/checker.hpp"
#include "core/params.hpp"
#include "core/workspace.hpp"
#include "cpu/backend.hpp"
#include "pflash/attention.hpp"

namespace pflash {

void validate(const AttentionParams& params, const char* function_name) {
  (void)detail::make_fwd_params(params, function_name);
}

void flash_attention_forward(const AttentionParams& params) {
  cpu::flash_forward(detail::make_fwd_params(params, "flash_attention_forward"));
}

void flash_attention_backward(const AttentionBackwardParams& params) {
  cpu::flash_backward(detail::make_bwd_params(params, "flash_attention_backward"));
}

void flash_attention_forward_backward(const AttentionParams& forward, TensorView dout, MutableTensorView dq,
                                      MutableTensorView dk, MutableTensorView dv) {
  constexpr const char* kName = "flash_attention_forward_backward";
  AttentionBackwardParams backward;
  backward.q = forward.q;
  backward.k = forward.k;
  backward.v = forward.v;
  backward.o = forward.o;
  backward.dout = dout;
  backward.dq = dq;
  backward.dk = dk;
  backward.dv = dv;
  backward.mask = forward.mask;
  backward.softmax_scale = forward.softmax_scale;
  backward.logits_soft_cap = forward.logits_soft_cap;
  backward.sinks = forward.sinks;
  backward.num_threads = forward.num_threads;

  // Validate both passes before either writes anything; the LSE goes to the caller's buffer or ours.
  detail::FwdParams fwd = detail::make_fwd_params(forward, kName);
  detail::Workspace<float> lse_buffer;
  backward.lse = forward.lse;
  if (forward.lse.empty()) {
    lse_buffer = detail::Workspace<float>(static_cast<std::size_t>(fwd.batch * fwd.heads_q * fwd.seq_q));
    fwd.lse = lse_buffer.data();
    fwd.lse_strides = {fwd.heads_q * fwd.seq_q, fwd.seq_q, 1};
    backward.lse = TensorView::contiguous(lse_buffer.data(), DType::kFloat32, {fwd.batch, fwd.heads_q, fwd.seq_q});
  }
  const detail::BwdParams bwd = detail::make_bwd_params(backward, kName);
  // The forward writes o and lse before the backward reads dout: dout must not lie under them.
  const detail::Checker check(kName);
  if (detail::overlaps(dout, forward.o)) check.fail("dout", "memory disjoint from output 'o'", "an overlap");
  if (!forward.lse.empty() && detail::overlaps(dout, forward.lse)) {
    check.fail("dout", "memory disjoint from output 'lse'", "an overlap");
  }
  cpu::flash_forward(fwd);
  cpu::flash_backward(bwd);
}

}  // namespace pflash
