// The one place the CPU backend chooses an instruction set: a table of kernel sets, widest first; a
// call runs the first whose instruction set cpu_kernel_choice gives for its pass and dtype (the widest
// the active one, pflash::active_cpu_isa, includes, or for bf16 products the faster of two, measured).
// A new instruction set is one row here and one <family>_<isa>.cpp per kernel family.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <iterator>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "core/params.hpp"
#include "cpu/backend.hpp"
#include "pflash/attention.hpp"
#include "pflash/error.hpp"
#include "pflash/runtime.hpp"

namespace pflash {
namespace cpu {
namespace {

struct KernelSet {
  CpuIsa isa;
  void (*forward)(detail::FwdParams);
  void (*backward)(detail::BwdParams);
  void (*decode)(detail::DecodeParams);
};

// AVX512-BF16: the bf16 products are vdpbf16ps pairs (the forward's and backward's; the decode's scores).
constexpr KernelSet kKernelSets[] = {
    {CpuIsa::kAvx512Bf16, flash_forward_avx512_bf16, flash_backward_avx512_bf16, flash_decode_avx512_bf16},
    {CpuIsa::kAvx512, flash_forward_avx512, flash_backward_avx512, flash_decode_avx512},
    {CpuIsa::kAvx2, flash_forward_avx2, flash_backward_avx2, flash_decode_avx2},
    {CpuIsa::kPortable, flash_forward_portable, flash_backward_portable, flash_decode_portable},
};

const KernelSet& widest_under(CpuIsa isa) {
  for (const KernelSet& set : kKernelSets) {
    if (set.isa <= isa) return set;
  }
  return kKernelSets[std::size(kKernelSets) - 1];
}

// ---- The measurement: bf16 products on vdpbf16ps or on fp32 FMAs --------------------------------

// One pass's problem, in bf16: the size of one of the kernels' tiles of work (a 256-row query block
// against 256 keys at the common head dim), so that both sets run their steady state, not set-up.
class Probe {
 public:
  static constexpr std::int64_t kRows = 256;
  static constexpr std::int64_t kDim = 128;

  Probe() : q_(kElems), k_(kElems), v_(kElems), o_(kElems), dout_(kElems), dq_(kElems), dk_(kElems),
            dv_(kElems), lse_(kRows) {
    std::uint32_t state = 12345u;  // any values in [-1, 1): the kernels' time does not depend on them
    for (auto* x : {&q_, &k_, &v_, &dout_}) {
      for (bfloat16& e : *x) {
        state = state * 1664525u + 1013904223u;
        e = bfloat16(static_cast<float>(state >> 8) / 8388608.0f - 1.0f);
      }
    }
    AttentionParams params;
    params.q = view(q_);
    params.k = view(k_);
    params.v = view(v_);
    params.o = MutableTensorView::contiguous(o_.data(), DType::kBFloat16, {1, 1, kRows, kDim});
    params.lse = MutableTensorView::contiguous(lse_.data(), DType::kFloat32, {1, 1, kRows});
    params.num_threads = 1;
    forward_ = detail::make_fwd_params(params, "cpu_kernel_choice");
    widest_under(CpuIsa::kPortable).forward(forward_);  // O and LSE for the backward's inputs

    AttentionBackwardParams backward;
    backward.q = params.q;
    backward.k = params.k;
    backward.v = params.v;
    backward.o = view(o_);
    backward.dout = view(dout_);
    backward.lse = TensorView::contiguous(lse_.data(), DType::kFloat32, {1, 1, kRows});
    backward.dq = MutableTensorView::contiguous(dq_.data(), DType::kBFloat16, {1, 1, kRows, kDim});
    backward.dk = MutableTensorView::contiguous(dk_.data(), DType::kBFloat16, {1, 1, kRows, kDim});
    backward.dv = MutableTensorView::contiguous(dv_.data(), DType::kBFloat16, {1, 1, kRows, kDim});
    backward.num_threads = 1;
    backward_ = detail::make_bwd_params(backward, "cpu_kernel_choice");
    // The forward must not overwrite the backward's inputs: it writes elsewhere while timed.
    forward_.o = scratch_o_.data();
    forward_.lse = nullptr;
  }

  void run(const KernelSet& set, CpuPass pass) const {
    if (pass == CpuPass::kForward) {
      set.forward(forward_);
    } else {
      set.backward(backward_);
    }
  }

 private:
  static constexpr std::int64_t kElems = kRows * kDim;

  static TensorView view(const std::vector<bfloat16>& x) {
    return TensorView::contiguous(x.data(), DType::kBFloat16, {1, 1, kRows, kDim});
  }

  std::vector<bfloat16> q_, k_, v_, o_, dout_, dq_, dk_, dv_;
  std::vector<float> lse_;
  std::vector<bfloat16> scratch_o_ = std::vector<bfloat16>(kElems);
  detail::FwdParams forward_;
  detail::BwdParams backward_;
};

double seconds(const Probe& probe, const KernelSet& set, CpuPass pass) {
  const auto start = std::chrono::steady_clock::now();
  probe.run(set, pass);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Best of 5 runs each after one untimed, alternating, so that a slow moment of a shared machine
// falls on both and the best of each is its undisturbed time.
CpuKernelChoice measure(CpuPass pass) {
  static const Probe probe;
  const KernelSet& dot = widest_under(CpuIsa::kAvx512Bf16);
  const KernelSet& fma = widest_under(CpuIsa::kAvx512);
  probe.run(dot, pass);
  probe.run(fma, pass);
  double best_dot = 1e30, best_fma = 1e30;
  for (int i = 0; i < 5; ++i) {
    best_dot = std::min(best_dot, seconds(probe, dot, pass));
    best_fma = std::min(best_fma, seconds(probe, fma, pass));
  }
  // A tie goes to the vdpbf16ps set (the widest, what the cap names).
  const bool fma_wins = best_fma < best_dot * 0.97;
  const CpuIsa winner = fma_wins ? CpuIsa::kAvx512 : CpuIsa::kAvx512Bf16;
  const double ratio = fma_wins ? best_dot / best_fma : best_fma / best_dot;
  const std::string_view loser = to_string(fma_wins ? CpuIsa::kAvx512Bf16 : CpuIsa::kAvx512);
  char text[160];
  std::snprintf(text, sizeof text, "measured: %.*s %.2fx as fast as %.*s (%.*s, bf16 %d x %d x %d, one thread, best of 5)",
                static_cast<int>(to_string(winner).size()), to_string(winner).data(), ratio,
                static_cast<int>(loser.size()), loser.data(), static_cast<int>(to_string(pass).size()),
                to_string(pass).data(), static_cast<int>(Probe::kRows), static_cast<int>(Probe::kRows),
                static_cast<int>(Probe::kDim));
  return {winner, text};
}

// One measurement per pass per process.
const CpuKernelChoice& measured(CpuPass pass) {
  static std::once_flag once[2];
  static std::optional<CpuKernelChoice> result[2];
  const int i = pass == CpuPass::kForward ? 0 : 1;
  std::call_once(once[i], [&] { result[i] = measure(pass); });
  return *result[i];
}

constexpr int kRuleFromEnvironment = -1;
std::atomic<int> g_rule{kRuleFromEnvironment};

CpuKernelRule environment_rule() {
  const char* env = std::getenv("PFLASH_CPU_KERNELS");
  if (env == nullptr || *env == '\0' || std::string_view(env) == "measured") return CpuKernelRule::kMeasured;
  if (std::string_view(env) == "widest") return CpuKernelRule::kWidest;
  throw Error(ErrorCode::kInvalidArgument,
              "PFLASH_CPU_KERNELS: expected measured or widest (or unset), got '" + std::string(env) + "'");
}

CpuKernelRule rule() {
  const int set = g_rule.load();
  return set == kRuleFromEnvironment ? environment_rule() : static_cast<CpuKernelRule>(set);
}

// Whether a call's set is the measured one: bf16 products where both AVX512-BF16 and AVX-512 are
// allowed, under the measured rule (the decode is widest whatever the rule).
bool measured_choice(CpuPass pass, DType dtype, CpuIsa active) {
  return active == CpuIsa::kAvx512Bf16 && dtype == DType::kBFloat16 && pass != CpuPass::kDecode &&
         rule() == CpuKernelRule::kMeasured;
}

// The kernel set of a call, without building the reason cpu_kernel_choice gives.
const KernelSet& kernels(CpuPass pass, DType dtype) {
  const CpuIsa active = active_cpu_isa();
  return widest_under(measured_choice(pass, dtype, active) ? measured(pass).isa : active);
}

}  // namespace

void flash_forward(detail::FwdParams params) { kernels(CpuPass::kForward, params.dtype).forward(params); }
void flash_backward(detail::BwdParams params) {
  kernels(CpuPass::kBackward, params.fwd.dtype).backward(params);
}
void flash_decode(detail::DecodeParams params) { kernels(CpuPass::kDecode, params.dtype).decode(params); }

}  // namespace cpu

std::string_view to_string(CpuPass pass) {
  switch (pass) {
    case CpuPass::kForward: return "forward";
    case CpuPass::kBackward: return "backward";
    case CpuPass::kDecode: return "decode";
  }
  return "unknown";
}

void set_cpu_kernel_rule(CpuKernelRule rule) { cpu::g_rule.store(static_cast<int>(rule)); }

void reset_cpu_kernel_rule() { cpu::g_rule.store(cpu::kRuleFromEnvironment); }

CpuKernelChoice cpu_kernel_choice(CpuPass pass, DType dtype) {
  const CpuIsa active = active_cpu_isa();
  if (cpu::measured_choice(pass, dtype, active)) return cpu::measured(pass);
  const CpuIsa isa = cpu::widest_under(active).isa;
  if (isa != CpuIsa::kAvx512Bf16 || dtype != DType::kBFloat16) {
    return {isa, active == detected_cpu_isa() ? "the widest this CPU has" : "the widest under the cap"};
  }
  if (pass == CpuPass::kDecode) return {isa, "the widest (the decode streams the cache at memory speed)"};
  return {isa, "the widest (PFLASH_CPU_KERNELS=widest or set rule)"};
}

}  // namespace pflash
