// Process-wide facts and knobs: which CPU instruction set the kernels use, and how much memory
// the library's calls have allocated.
#pragma once

#include <cstdint>
#include <string_view>

namespace pflash {

// Ordered from least to most capable.
enum class CpuIsa { kPortable, kAvx2, kAvx512, kAvx512Bf16 };

std::string_view to_string(CpuIsa isa);

// The best instruction set this CPU supports and this build contains.
CpuIsa detected_cpu_isa();

// The instruction set the kernels run with: detected_cpu_isa(), lowered by set_max_cpu_isa() or, until
// that is called, by the environment variable PFLASH_MAX_CPU_ISA (portable, avx2, avx512, avx512_bf16).
// Throws pflash::Error (kInvalidArgument) when that variable names none of them, as every kernel
// call then does.
CpuIsa active_cpu_isa();

// Caps the instruction set (as ONEDNN_MAX_CPU_ISA does); a cap above what the CPU has is clamped.
void set_max_cpu_isa(CpuIsa isa);

// Back to the cap PFLASH_MAX_CPU_ISA sets (none when it is unset).
void reset_max_cpu_isa();

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
