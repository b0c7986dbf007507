// Microbenchmarks of the instructions the kernels are built on: independent FMA (or vdpbf16ps)
// chains, enough of them to cover the latency of every FMA pipe, on all threads; and a streaming
// read of a buffer much larger than the last-level cache. Each is the best of several trials.
#include "machine_peak.hpp"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "pflash/runtime.hpp"

namespace pflash::bench {
namespace {

using Clock = std::chrono::steady_clock;
constexpr int kChains = 12;  // 2 FMA pipes x 4-5 cycles latency, with margin
constexpr std::int64_t kIterations = 20'000'000;
constexpr int kTrials = 5;

// Each returns a value derived from every chain so the compiler cannot drop the work.
__attribute__((target("avx2,fma"))) float fma_chains_avx2(std::int64_t iterations) {
  __m256 acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = _mm256_set1_ps(0.001f * static_cast<float>(c));
  const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
  for (std::int64_t i = 0; i < iterations; ++i) {
    for (int c = 0; c < kChains; ++c) acc[c] = _mm256_fmadd_ps(acc[c], a, b);
  }
  __m256 sum = acc[0];
  for (int c = 1; c < kChains; ++c) sum = _mm256_add_ps(sum, acc[c]);
  return _mm256_cvtss_f32(sum);
}

__attribute__((target("avx512f"))) float fma_chains_avx512(std::int64_t iterations) {
  __m512 acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = _mm512_set1_ps(0.001f * static_cast<float>(c));
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
  for (std::int64_t i = 0; i < iterations; ++i) {
    for (int c = 0; c < kChains; ++c) acc[c] = _mm512_fmadd_ps(acc[c], a, b);
  }
  __m512 sum = acc[0];
  for (int c = 1; c < kChains; ++c) sum = _mm512_add_ps(sum, acc[c]);
  return _mm512_cvtss_f32(sum);
}

__attribute__((target("avx512f,avx512bf16"))) float dpbf16_chains(std::int64_t iterations) {
  __m512 acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = _mm512_set1_ps(0.001f * static_cast<float>(c));
  const __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80), b = (__m512bh)_mm512_set1_epi16(0x3380);
  for (std::int64_t i = 0; i < iterations; ++i) {
    for (int c = 0; c < kChains; ++c) acc[c] = _mm512_dpbf16_ps(acc[c], a, b);
  }
  __m512 sum = acc[0];
  for (int c = 1; c < kChains; ++c) sum = _mm512_add_ps(sum, acc[c]);
  return _mm512_cvtss_f32(sum);
}

// Eight independent tdpbf16ps chains over tiles 0-5 (four accumulators, each product issued twice
// per iteration to cover the instruction's latency): 16 x 16 x 32 multiply-adds a product. Runs only
// where pflash detected AMX, which also asked the system for the tile state.
__attribute__((target("amx-tile,amx-bf16"))) float amx_chains(std::int64_t iterations) {
  struct alignas(64) {
    std::uint8_t palette = 1, start_row = 0, reserved[14] = {};
    std::uint16_t bytes_per_row[16] = {64, 64, 64, 64, 64, 64};
    std::uint8_t rows[16] = {16, 16, 16, 16, 16, 16};
  } config;
  alignas(64) static const std::uint16_t zeros[16 * 32] = {};  // bf16 zeros: the sums stay finite
  alignas(64) float out[16 * 16];
  _tile_loadconfig(&config);
  _tile_loadd(4, zeros, 64);
  _tile_loadd(5, zeros, 64);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (std::int64_t i = 0; i < iterations; ++i) {
    _tile_dpbf16ps(0, 4, 5);
    _tile_dpbf16ps(1, 4, 5);
    _tile_dpbf16ps(2, 4, 5);
    _tile_dpbf16ps(3, 4, 5);
    _tile_dpbf16ps(0, 4, 5);
    _tile_dpbf16ps(1, 4, 5);
    _tile_dpbf16ps(2, 4, 5);
    _tile_dpbf16ps(3, 4, 5);
  }
  _tile_stored(0, out, 64);
  _tile_release();
  return out[0];
}

float fma_chains_portable(std::int64_t iterations) {
  float acc[kChains];
  for (int c = 0; c < kChains; ++c) acc[c] = 0.001f * static_cast<float>(c);
  for (std::int64_t i = 0; i < iterations; ++i)
    for (int c = 0; c < kChains; ++c) acc[c] = acc[c] * 0.999999f + 1e-7f;
  float sum = 0.0f;
  for (float a : acc) sum += a;
  return sum;
}

// Best FLOP/s over the trials of `chains` run on every thread; flops_per_iteration counts one
// iteration of all chains (fewer iterations for wider units, so that each trial takes about as long).
template <class Fn>
double best_flops(int threads, Fn chains, double flops_per_iteration) {
  const std::int64_t iterations =
      kIterations / (flops_per_iteration > 1e5 ? 256 : flops_per_iteration > 400 ? 4 : 1);
  double best = 0.0;
  volatile float sink = 0.0f;
  for (int trial = 0; trial < kTrials; ++trial) {
    const auto start = Clock::now();
#pragma omp parallel num_threads(threads)
    {
      const float r = chains(iterations);
      if (r == 12345.0f) sink = r;
    }
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    best = std::max(best, flops_per_iteration * static_cast<double>(iterations) * threads / seconds);
  }
  (void)sink;
  return best;
}

__attribute__((target("avx2"))) std::uint64_t read_sum_avx2(const std::uint64_t* data, std::int64_t count) {
  __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
  for (std::int64_t i = 0; i + 16 <= count; i += 16) {
    s0 = _mm256_add_epi64(s0, _mm256_load_si256(reinterpret_cast<const __m256i*>(data + i)));
    s1 = _mm256_add_epi64(s1, _mm256_load_si256(reinterpret_cast<const __m256i*>(data + i + 4)));
    s2 = _mm256_add_epi64(s2, _mm256_load_si256(reinterpret_cast<const __m256i*>(data + i + 8)));
    s3 = _mm256_add_epi64(s3, _mm256_load_si256(reinterpret_cast<const __m256i*>(data + i + 12)));
  }
  const __m256i s = _mm256_add_epi64(_mm256_add_epi64(s0, s1), _mm256_add_epi64(s2, s3));
  return static_cast<std::uint64_t>(_mm256_extract_epi64(s, 0) + _mm256_extract_epi64(s, 3));
}

std::uint64_t read_sum_portable(const std::uint64_t* data, std::int64_t count) {
  std::uint64_t sum = 0;
  for (std::int64_t i = 0; i < count; ++i) sum += data[i];
  return sum;
}

double measure_read_bw(int threads, bool avx2) {
  constexpr std::int64_t kBytes = 512ll << 20;  // 16x a 32 MiB last-level cache
  constexpr std::int64_t kCount = kBytes / 8;
  std::unique_ptr<std::uint64_t, decltype(&std::free)> buffer(
      static_cast<std::uint64_t*>(std::aligned_alloc(64, kBytes)), &std::free);
  const std::int64_t chunk = kCount / threads / 16 * 16;
#pragma omp parallel num_threads(threads)
  {  // first touch by the thread that reads the chunk
    const std::int64_t begin = chunk * omp_get_thread_num();
    for (std::int64_t i = begin; i < begin + chunk; ++i) buffer.get()[i] = static_cast<std::uint64_t>(i);
  }
  double best = 0.0;
  volatile std::uint64_t sink = 0;
  for (int trial = 0; trial < kTrials; ++trial) {
    const auto start = Clock::now();
#pragma omp parallel num_threads(threads)
    {
      const std::uint64_t* begin = buffer.get() + chunk * omp_get_thread_num();
      const std::uint64_t sum = avx2 ? read_sum_avx2(begin, chunk) : read_sum_portable(begin, chunk);
      if (sum == 42) sink = sum;
    }
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    best = std::max(best, static_cast<double>(chunk * threads * 8) / seconds);
  }
  (void)sink;
  return best;
}

std::string cpu_model_name() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  for (std::string line; std::getline(cpuinfo, line);) {
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) return line.substr(line.find_first_not_of(' ', colon + 1));
    }
  }
  return "unknown CPU";
}

}  // namespace

namespace {

// fp32 FMA at the vector width of a kernel set (the AVX512-BF16 set's fp32 products are AVX-512's).
double fma_flops_of(const MachinePeak& peak, CpuIsa set) {
  if (set >= CpuIsa::kAvx512) return peak.fma_flops_avx512;
  if (set == CpuIsa::kAvx2) return peak.fma_flops_avx2;
  return peak.fma_flops_portable;
}

}  // namespace

MachinePeak measure_machine_peak(int threads, bool measure_portable) {
  MachinePeak peak;
  peak.threads = threads;
  peak.cpu_name = cpu_model_name();
  const CpuIsa active = active_cpu_isa();
  peak.isa = std::string(to_string(active));
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool has_avx512 = __builtin_cpu_supports("avx512f");
  peak.native_bf16 = has_avx512 && __builtin_cpu_supports("avx512bf16");
  // FMA at the kernels' width, then at the hardware's widest where that is wider.
  auto fma_at = [&](CpuIsa isa) {
    if (isa >= CpuIsa::kAvx512 && has_avx512) return best_flops(threads, fma_chains_avx512, kChains * 16 * 2.0);
    if (isa >= CpuIsa::kAvx2 && has_avx2) return best_flops(threads, fma_chains_avx2, kChains * 8 * 2.0);
    return best_flops(threads, fma_chains_portable, kChains * 2.0);
  };
  if (has_avx512) peak.fma_flops_avx512 = fma_at(CpuIsa::kAvx512);
  if (has_avx2) peak.fma_flops_avx2 = fma_at(CpuIsa::kAvx2);
  if (measure_portable || active == CpuIsa::kPortable) peak.fma_flops_portable = fma_at(CpuIsa::kPortable);
  const CpuIsa widest = has_avx512 ? CpuIsa::kAvx512 : has_avx2 ? CpuIsa::kAvx2 : CpuIsa::kPortable;
  peak.peak_flops_fp32 = fma_flops_of(peak, active);
  peak.widest_fma_flops = fma_flops_of(peak, widest);
  // one vdpbf16ps: 16 lanes x 2 products x (multiply + add)
  peak.bf16_dot_flops = peak.native_bf16 ? best_flops(threads, dpbf16_chains, kChains * 16 * 4.0) : 0.0;
  // 8 tile products of 16 x 16 x 32 multiply-adds an iteration.
  peak.amx_flops =
      detected_cpu_isa() >= CpuIsa::kAmxBf16 ? best_flops(threads, amx_chains, 8 * 16 * 16 * 32 * 2.0) : 0.0;
  // The kernel set each bf16 pass runs (src/cpu/dispatch.cpp): on AVX512-BF16 its products are vdpbf16ps.
  const auto unit = [&](CpuPass pass, std::string& isa, std::string& reason) {
    const CpuKernelChoice choice = cpu_kernel_choice(pass, DType::kBFloat16);
    isa = std::string(to_string(choice.isa));
    reason = choice.reason;
    if (choice.isa >= CpuIsa::kAmxBf16 && peak.amx_flops > 0.0) return peak.amx_flops;
    return choice.isa >= CpuIsa::kAvx512Bf16 && peak.native_bf16 ? peak.bf16_dot_flops : peak.peak_flops_fp32;
  };
  peak.peak_flops_bf16 = unit(CpuPass::kForward, peak.bf16_forward_isa, peak.bf16_forward_reason);
  peak.peak_flops_bf16_backward = unit(CpuPass::kBackward, peak.bf16_backward_isa, peak.bf16_backward_reason);
  peak.read_bw = measure_read_bw(threads, has_avx2);
  return peak;
}

namespace {

// The forward's FLOPs are 1 of 3.5 of a training step's, the backward's 2.5.
double ceiling_of_pass(const std::string& pass, double forward_unit, double backward_unit) {
  if (pass == "bwd") return backward_unit;
  if (pass == "fwd+bwd") return 3.5 / (1.0 / forward_unit + 2.5 / backward_unit);
  return forward_unit;
}

}  // namespace

double ceiling_flops(const MachinePeak& peak, bool bf16, const std::string& pass) {
  if (!bf16) return peak.peak_flops_fp32;
  return ceiling_of_pass(pass, peak.peak_flops_bf16, peak.peak_flops_bf16_backward);
}

double ceiling_flops(const MachinePeak& peak, bool bf16, const std::string& pass, CpuIsa forward_set,
                     CpuIsa backward_set) {
  const auto unit = [&](CpuIsa set) {
    if (bf16 && set >= CpuIsa::kAmxBf16 && peak.amx_flops > 0.0) return peak.amx_flops;
    return bf16 && set >= CpuIsa::kAvx512Bf16 && peak.native_bf16 ? peak.bf16_dot_flops : fma_flops_of(peak, set);
  };
  return ceiling_of_pass(pass, unit(forward_set), unit(backward_set));
}

}  // namespace pflash::bench
