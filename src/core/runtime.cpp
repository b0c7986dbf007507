#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>

#include "pflash/error.hpp"
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
    CpuIsa::kAvx512Bf16;
#else
    CpuIsa::kPortable;
#endif

constexpr CpuIsa kIsas[] = {CpuIsa::kPortable, CpuIsa::kAvx2, CpuIsa::kAvx512, CpuIsa::kAvx512Bf16};

// The cap PFLASH_MAX_CPU_ISA sets (none when unset or empty), read at each call so that a bad value
// is an error of the call that would have used it, not of the program's start-up.
CpuIsa environment_cap() {
  const char* env = std::getenv("PFLASH_MAX_CPU_ISA");
  if (env == nullptr || *env == '\0') return CpuIsa::kAvx512Bf16;
  if (const std::optional<CpuIsa> isa = cpu_isa_from_string(env)) return *isa;
  throw Error(ErrorCode::kInvalidArgument, "PFLASH_MAX_CPU_ISA: expected one of " + std::string(cpu_isa_names()) +
                                               " (or unset), got '" + std::string(env) + "'");
}

constexpr int kCapFromEnvironment = -1;
std::atomic<int> g_max_isa{kCapFromEnvironment};

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

std::optional<CpuIsa> cpu_isa_from_string(std::string_view name) {
  for (CpuIsa isa : kIsas) {
    if (name == to_string(isa)) return isa;
  }
  return std::nullopt;
}

std::string_view cpu_isa_names() { return "portable, avx2, avx512, avx512_bf16"; }

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
  const int set = g_max_isa.load();
  const CpuIsa cap = set == kCapFromEnvironment ? environment_cap() : static_cast<CpuIsa>(set);
  const CpuIsa detected = detected_cpu_isa();
  return cap < detected ? cap : detected;
}

void set_max_cpu_isa(CpuIsa isa) { g_max_isa.store(static_cast<int>(isa)); }

void reset_max_cpu_isa() { g_max_isa.store(kCapFromEnvironment); }

std::string_view version() { return PFLASH_VERSION_STRING; }

int default_num_threads() { return omp_get_max_threads(); }

int resolve_num_threads(int requested) {
  if (requested <= 0) return default_num_threads();
  // Each thread of a call gets its own tiles: 100000 threads asked of a 2-core machine would be
  // 100000 stacks and workspaces (and a crash), not more speed.
  const int machine = std::min(std::max(omp_get_num_procs(), omp_get_max_threads()), omp_get_thread_limit());
  return std::min(requested, std::max(machine, 1));
}

}  // namespace pflash
