// Process-wide facts and knobs: which CPU instruction set the kernels use (and, per pass, which kernel
// set runs), and how much memory the library's calls have allocated.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "pflash/dtype.hpp"

namespace pflash {

// Ordered from least to most capable.
// kAmxBf16: AVX512-BF16 plus Intel AMX tiles with bf16 products (tdpbf16ps), and the operating
// system's leave to use them (Linux: arch_prctl(ARCH_REQ_XCOMP_PERM), asked once at detection).
enum class CpuIsa { kPortable, kAvx2, kAvx512, kAvx512Bf16, kAmxBf16 };

std::string_view to_string(CpuIsa isa);
// The instruction set to_string names `name`; nullopt for any other text.
std::optional<CpuIsa> cpu_isa_from_string(std::string_view name);
// Every name to_string gives, least capable first, comma-separated: for messages.
std::string_view cpu_isa_names();

// The best instruction set this CPU supports and this build contains.
CpuIsa detected_cpu_isa();

// The instruction set the kernels run with: detected_cpu_isa(), lowered by set_max_cpu_isa() or, until
// that is called, by the environment variable PFLASH_MAX_CPU_ISA (portable, avx2, avx512, avx512_bf16, amx_bf16).
// Throws pflash::Error (kInvalidArgument) when that variable names none of them, as every kernel
// call then does.
CpuIsa active_cpu_isa();

// Caps the instruction set (as ONEDNN_MAX_CPU_ISA does); a cap above what the CPU has is clamped.
void set_max_cpu_isa(CpuIsa isa);

// Back to the cap PFLASH_MAX_CPU_ISA sets (none when it is unset).
void reset_max_cpu_isa();

// The passes whose CPU kernels are chosen apart.
enum class CpuPass { kForward, kBackward, kDecode };

std::string_view to_string(CpuPass pass);

// How cpu_kernel_choice picks among the kernel sets active_cpu_isa() allows.
enum class CpuKernelRule {
  kMeasured,  // the faster where width does not say it (below); the default
  kWidest,    // always the widest allowed set (what a cap via set_max_cpu_isa then tests)
};

// Sets the rule for the process (as set_max_cpu_isa sets the cap); until called, the environment
// variable PFLASH_CPU_KERNELS ("measured" or "widest"; unset: measured) decides.
void set_cpu_kernel_rule(CpuKernelRule rule);
void reset_cpu_kernel_rule();

// Which kernel set a CPU call of `pass` on `dtype` inputs runs, and why.
struct CpuKernelChoice {
  CpuIsa isa = CpuIsa::kPortable;
  std::string reason;
};

// The widest set under active_cpu_isa(), but one: for bf16 forward and backward, where both the
// AVX512-BF16 kernels (vdpbf16ps products) and the AVX-512 ones (bf16 widened to fp32 FMAs) may run,
// the rule kMeasured takes the faster on this CPU. vdpbf16ps issues at twice the fp32 FMA rate on
// AMD Zen 5 and at half of it on Intel's cores, so no rule of width holds on both. The first such call
// times both sets on a small problem of its pass (256 queries x 256 keys x 128, one thread, best of 5
// interleaved runs: a few milliseconds) and the process keeps the result. The decode stays widest: it
// streams the cache at memory speed either way. Throws pflash::Error (kInvalidArgument) when
// PFLASH_CPU_KERNELS or PFLASH_MAX_CPU_ISA holds a value they do not take.
CpuKernelChoice cpu_kernel_choice(CpuPass pass, DType dtype);

// The library's version, "MAJOR.MINOR.PATCH" (the CMake project's).
std::string_view version();

// Threads a call with num_threads == 0 uses.
int default_num_threads();

// Threads a call asked for `requested` (>= 0) runs with: 0 means default_num_threads(); a count past
// what the machine can run at once (its processors, or OMP_NUM_THREADS when that is larger, and never
// past OpenMP's thread limit) is clamped to it, so that a large count costs nothing but idle threads.
int resolve_num_threads(int requested);

// Bytes allocated by library calls (workspaces, packed copies, naive scores), current and peak
// since the last reset. Caller-owned tensors are not counted.
struct MemoryStats {
  std::uint64_t current_bytes = 0;
  std::uint64_t peak_bytes = 0;
};
MemoryStats memory_stats();
void reset_peak_memory_stats();

}  // namespace pflash
