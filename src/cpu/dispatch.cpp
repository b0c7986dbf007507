// The one place the CPU backend chooses an instruction set: a table of kernel sets, widest first; a
// call runs the first whose instruction set cpu_kernel_choice gives for its pass and dtype (the widest
// the active one, pflash::active_cpu_isa, includes, or for bf16 products the fastest of the AMX,
// AVX512-BF16 and AVX-512 sets allowed, measured).
// A new instruction set is one row here and one <family>_<isa>.cpp per kernel family.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iterator>
#include <limits>
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

// AMX-BF16: the bf16 products of 16 query rows on AMX tiles (the decode streams the cache: AVX512-BF16's).
// AVX512-BF16: the bf16 products are vdpbf16ps pairs (the forward's and backward's; the decode's scores).
constexpr KernelSet kKernelSets[] = {
    {CpuIsa::kAmxBf16, flash_forward_amx_bf16, flash_backward_amx_bf16, flash_decode_avx512_bf16},
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

// ---- The measurement: bf16 products on AMX tiles, on vdpbf16ps or on fp32 FMAs --------------------

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

  // What the last run of `pass` wrote (O; or dQ, dK, dV), widened.
  std::vector<float> outputs(CpuPass pass) const {
    std::vector<float> out;
    const auto append = [&](const std::vector<bfloat16>& x) {
      for (bfloat16 e : x) out.push_back(static_cast<float>(e));
    };
    if (pass == CpuPass::kForward) {
      append(scratch_o_);
    } else {
      append(dq_);
      append(dk_);
      append(dv_);
    }
    return out;
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

// Whether two runs' outputs agree to bf16 products' rounding (the AMX and AVX512-BF16 sets round P
// and dS to bf16, the AVX-512 set does not: a few percent of the largest value at most), where a
// wrong tile layout would be off by the whole value.
bool outputs_agree(const std::vector<float>& x, const std::vector<float>& reference) {
  float largest = 0.0f, worst = 0.0f;
  for (std::size_t i = 0; i < reference.size(); ++i) {
    largest = std::max(largest, std::abs(reference[i]));
    const float error = std::abs(x[i] - reference[i]);
    worst = std::isnan(error) ? std::numeric_limits<float>::infinity() : std::max(worst, error);
  }
  return worst <= 0.05f * largest + 1e-3f;
}

std::string format_choice(CpuIsa winner, const std::vector<std::pair<CpuIsa, double>>& times, CpuPass pass,
                          const std::string& note) {
  double best = 0.0;
  for (const auto& [isa, time] : times) {
    if (isa == winner) best = time;
  }
  std::string text = "measured: " + std::string(to_string(winner));
  const char* separator = " ";
  for (const auto& [isa, time] : times) {
    if (isa == winner) continue;
    char ratio[96];
    std::snprintf(ratio, sizeof ratio, "%s%.2fx as fast as %s", separator, time / best, std::string(to_string(isa)).c_str());
    text += ratio;
    separator = ", ";
  }
  char problem[128];
  std::snprintf(problem, sizeof problem, " (%s, bf16 %d x %d x %d, one thread, best of 5)", std::string(to_string(pass)).c_str(),
                static_cast<int>(Probe::kRows), static_cast<int>(Probe::kRows), static_cast<int>(Probe::kDim));
  return text + problem + note;
}

// The candidates for bf16 products under `active`: the AMX tiles where allowed, vdpbf16ps pairs, and
// fp32 FMA on the widened inputs; widest first.
std::vector<CpuIsa> candidates(CpuIsa active) {
  std::vector<CpuIsa> sets;
  if (active >= CpuIsa::kAmxBf16) sets.push_back(CpuIsa::kAmxBf16);
  sets.push_back(CpuIsa::kAvx512Bf16);
  sets.push_back(CpuIsa::kAvx512);
  return sets;
}

// Best of 5 runs each after one untimed, alternating, so that a slow moment of a shared machine
// falls on all and the best of each is its undisturbed time. The AMX set must also compute what the
// AVX-512 set does on the probe (its first run, checked before it is timed): a CPU or a system where
// the tiles misbehave keeps the vector kernels, and the reason says so.
CpuKernelChoice measure(CpuPass pass, CpuIsa active) {
  static const Probe probe;
  std::vector<CpuIsa> sets = candidates(active);
  std::string note;
  if (sets.front() == CpuIsa::kAmxBf16) {
    probe.run(widest_under(CpuIsa::kAvx512), pass);
    const std::vector<float> reference = probe.outputs(pass);
    probe.run(widest_under(CpuIsa::kAmxBf16), pass);
    if (!outputs_agree(probe.outputs(pass), reference)) {
      sets.erase(sets.begin());
      note = "; amx_bf16 left out: its result disagreed with avx512's on the probe";
    }
  }
  for (CpuIsa isa : sets) probe.run(widest_under(isa), pass);
  std::vector<std::pair<CpuIsa, double>> times;
  for (CpuIsa isa : sets) times.emplace_back(isa, 1e30);
  for (int i = 0; i < 5; ++i) {
    for (auto& [isa, best] : times) best = std::min(best, seconds(probe, widest_under(isa), pass));
  }
  // Ties (within 3%) go to the wider set: the first of the list, which is widest first.
  CpuIsa winner = times.front().first;
  double winner_time = times.front().second;
  for (const auto& [isa, time] : times) {
    if (time < winner_time * 0.97) {
      winner = isa;
      winner_time = time;
    }
  }
  return {winner, format_choice(winner, times, pass, note)};
}

// One measurement per pass per process, and per cap: with AMX allowed or not (a cap to avx512_bf16
// chooses between the vector sets alone).
const CpuKernelChoice& measured(CpuPass pass, CpuIsa active) {
  static std::once_flag once[2][2];
  static std::optional<CpuKernelChoice> result[2][2];
  const int i = pass == CpuPass::kForward ? 0 : 1;
  const int amx = active >= CpuIsa::kAmxBf16 ? 1 : 0;
  std::call_once(once[i][amx], [&] { result[i][amx] = measure(pass, active); });
  return *result[i][amx];
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

// Whether a call's set is the measured one: bf16 products where both AVX512-BF16 and AVX-512 (and
// perhaps AMX) are allowed, under the measured rule (the decode is widest whatever the rule).
bool measured_choice(CpuPass pass, DType dtype, CpuIsa active) {
  return active >= CpuIsa::kAvx512Bf16 && dtype == DType::kBFloat16 && pass != CpuPass::kDecode &&
         rule() == CpuKernelRule::kMeasured;
}

// The kernel set of a call, without building the reason cpu_kernel_choice gives.
const KernelSet& kernels(CpuPass pass, DType dtype) {
  const CpuIsa active = active_cpu_isa();
  return widest_under(measured_choice(pass, dtype, active) ? measured(pass, active).isa : active);
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
  if (cpu::measured_choice(pass, dtype, active)) return cpu::measured(pass, active);
  const CpuIsa isa = cpu::widest_under(active).isa;
  if (isa < CpuIsa::kAvx512Bf16 || dtype != DType::kBFloat16) {
    return {isa, active == detected_cpu_isa() ? "the widest this CPU has" : "the widest under the cap"};
  }
  if (pass == CpuPass::kDecode) {
    // The AMX set's decode is the AVX512-BF16 one: a few query rows against a streamed cache have no
    // 16-row tiles to fill.
    return {std::min(isa, CpuIsa::kAvx512Bf16), "the widest (the decode streams the cache at memory speed)"};
  }
  return {isa, "the widest (PFLASH_CPU_KERNELS=widest or set rule)"};
}

}  // namespace pflash
