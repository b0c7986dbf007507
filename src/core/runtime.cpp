#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>
#include <string_view>

#include "pflash/runtime.hpp"

namespace pflash {
namespace {

bool cpu_has(CpuIsa isa) {
#if defined(__x86_64__)
  switch (isa) {
    case CpuIsa::kPortable:
      return true;
    case CpuIsa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case CpuIsa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    case CpuIsa::kAvx512Bf16:
      return cpu_has(CpuIsa::kAvx512) && __builtin_cpu_supports("avx512bf16");
  }
  return false;
#else
  return isa == CpuIsa::kPortable;
#endif
}

// The instruction sets this build carries kernels for (see src/cpu/dispatch.cpp).
constexpr CpuIsa kBestBuiltIsa =
#if defined(__x86_64__)
    CpuIsa::kAvx2;
#else
    CpuIsa::kPortable;
#endif

CpuIsa parse_isa_env() {
  const char* env = std::getenv("PFLASH_MAX_CPU_ISA");
  if (env == nullptr) return kBestBuiltIsa;
  const std::string_view name(env);
  for (CpuIsa isa : {CpuIsa::kPortable, CpuIsa::kAvx2, CpuIsa::kAvx512, CpuIsa::kAvx512Bf16}) {
    if (name == to_string(isa)) return isa;
  }
  return kBestBuiltIsa;
}

std::atomic<int> g_max_isa{static_cast<int>(parse_isa_env())};

}  // namespace

std::string_view to_string(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kPortable: return "portable";
    case CpuIsa::kAvx2: return "avx2";
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx512Bf16: return "avx512_bf16";
  }
  return "unknown";
}

CpuIsa detected_cpu_isa() {
  static const CpuIsa detected = [] {
    CpuIsa best = CpuIsa::kPortable;
    for (CpuIsa isa : {CpuIsa::kAvx2, CpuIsa::kAvx512, CpuIsa::kAvx512Bf16}) {
      if (isa <= kBestBuiltIsa && cpu_has(isa)) best = isa;
    }
    return best;
  }();
  return detected;
}

CpuIsa active_cpu_isa() {
  const auto cap = static_cast<CpuIsa>(g_max_isa.load());
  const CpuIsa detected = detected_cpu_isa();
  return cap < detected ? cap : detected;
}

void set_max_cpu_isa(CpuIsa isa) { g_max_isa.store(static_cast<int>(isa)); }

int default_num_threads() { return omp_get_max_threads(); }

int resolve_num_threads(int requested) {
  if (requested <= 0) return default_num_threads();
  // Each thread of a call gets its own tiles: 100000 threads asked of a 2-core machine would be
  // 100000 stacks and workspaces (and a crash), not more speed.
  const int machine = std::min(std::max(omp_get_num_procs(), omp_get_max_threads()), omp_get_thread_limit());
  return std::min(requested, std::max(machine, 1));
}

}  // namespace pflash
