#include <omp.h>

#if defined(__x86_64__)
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

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

#if defined(__x86_64__)
// AMX: the CPU's tiles (CPUID leaf 7: AMX-TILE, AMX-BF16), the OS saving their state (XCR0's tile
// config and tile data bits), and Linux's per-process leave to use the 8 KiB of tile data, which a
// process must ask for before its first tile instruction (else the instruction faults).
bool amx_usable() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid_max(0, nullptr) < 7) return false;
  __cpuid_count(7, 0, eax, ebx, ecx, edx);
  constexpr unsigned kCpuidAmxBf16 = 1u << 22, kCpuidAmxTile = 1u << 24;
  if ((edx & kCpuidAmxBf16) == 0 || (edx & kCpuidAmxTile) == 0) return false;
  __cpuid(1, eax, ebx, ecx, edx);
  if ((ecx & (1u << 27)) == 0) return false;  // OSXSAVE: xgetbv is usable
  unsigned xcr0_low = 0, xcr0_high = 0;
  __asm__ volatile("xgetbv" : "=a"(xcr0_low), "=d"(xcr0_high) : "c"(0));
  constexpr unsigned kTileConfig = 1u << 17, kTileData = 1u << 18;
  if ((xcr0_low & kTileConfig) == 0 || (xcr0_low & kTileData) == 0) return false;
#if defined(__linux__)
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;  // no known way to ask other systems for the tile state
#endif
}
#endif

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
    case CpuIsa::kAmxBf16:
      return cpu_has(CpuIsa::kAvx512Bf16) && amx_usable();
  }
  return false;
#else
  return isa == CpuIsa::kPortable;
#endif
}

// The instruction sets this build carries kernels for (see src/cpu/dispatch.cpp).
constexpr CpuIsa kBestBuiltIsa =
#if defined(__x86_64__)
    CpuIsa::kAmxBf16;
#else
    CpuIsa::kPortable;
#endif

constexpr CpuIsa kIsas[] = {CpuIsa::kPortable, CpuIsa::kAvx2, CpuIsa::kAvx512, CpuIsa::kAvx512Bf16, CpuIsa::kAmxBf16};

// The cap PFLASH_MAX_CPU_ISA sets (none when unset or empty), read at each call so that a bad value
// is an error of the call that would have used it, not of the program's start-up.
CpuIsa environment_cap() {
  const char* env = std::getenv("PFLASH_MAX_CPU_ISA");
  if (env == nullptr || *env == '\0') return CpuIsa::kAmxBf16;
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
    case CpuIsa::kAmxBf16: return "amx_bf16";
  }
  return "unknown";
}

std::optional<CpuIsa> cpu_isa_from_string(std::string_view name) {
  for (CpuIsa isa : kIsas) {
    if (name == to_string(isa)) return isa;
  }
  return std::nullopt;
}

std::string_view cpu_isa_names() { return "portable, avx2, avx512, avx512_bf16, amx_bf16"; }

CpuIsa detected_cpu_isa() {
  static const CpuIsa detected = [] {
    CpuIsa best = CpuIsa::kPortable;
    for (CpuIsa isa : {CpuIsa::kAvx2, CpuIsa::kAvx512, CpuIsa::kAvx512Bf16, CpuIsa::kAmxBf16}) {
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
