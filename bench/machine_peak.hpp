// The machine's own ceilings, measured at start-up so every fraction in a report is taken against
// the same machine in the same run.
#pragma once

#include <string>

#include "pflash/runtime.hpp"

namespace pflash::bench {

// The ceilings rows are judged against are those of the unit the kernels use: fp32 FMA at the vector
// width of the active instruction set, and for bf16 rows the unit of the kernel set each pass runs
// (pflash::cpu_kernel_choice): AMX tile products for the AMX set, the bf16 dot product (vdpbf16ps) for
// the AVX512-BF16 set (the parts those kernels leave to narrower units, such as the backward's dV and
// dK on masked tiles, excepted: an upper bound), else fp32 FMA.
// The hardware's widest FMA and its bf16 dot product are measured beside them, for reference.
struct MachinePeak {
  int threads = 1;
  std::string cpu_name;
  std::string isa;                       // instruction set of the kernels (pflash::active_cpu_isa)
  double peak_flops_fp32 = 0.0;          // FLOP/s, fp32 FMA at the kernels' vector width, every thread
  double peak_flops_bf16 = 0.0;          // FLOP/s, the bf16 forward's unit: vdpbf16ps, or that fp32 FMA
  double peak_flops_bf16_backward = 0.0; // FLOP/s, the bf16 backward's unit
  std::string bf16_forward_isa, bf16_backward_isa;  // the kernel sets bf16 calls run, and why
  std::string bf16_forward_reason, bf16_backward_reason;
  double widest_fma_flops = 0.0;         // FLOP/s, fp32 FMA at the widest width this CPU has
  // FLOP/s of fp32 FMA at each kernel set's vector width (0: not measured: the CPU lacks it, or
  // portable, measured only when asked for), for rows that force a kernel set (BenchConfig::kernels).
  double fma_flops_portable = 0.0, fma_flops_avx2 = 0.0, fma_flops_avx512 = 0.0;
  double bf16_dot_flops = 0.0;           // FLOP/s, vdpbf16ps (0: the CPU has none)
  double amx_flops = 0.0;                // FLOP/s, AMX tdpbf16ps tile products (0: no AMX)
  bool native_bf16 = false;              // whether the CPU has vdpbf16ps
  double read_bw = 0.0;                  // bytes/s, streaming reads from DRAM on every thread
};

// measure_portable: also time scalar FMA (for rows forced onto the portable kernels).
MachinePeak measure_machine_peak(int threads, bool measure_portable = false);

// The ceiling of a row: its dtype's unit for its pass ("fwd", "bwd", "fwd+bwd": the forward's FLOPs,
// 1 of 3.5, at the forward's unit and the backward's at the backward's), for the kernel sets the
// default rule picks.
double ceiling_flops(const MachinePeak& peak, bool bf16, const std::string& pass);

// The same for a row whose passes ran on the given kernel sets (pflash::cpu_kernel_choice under the
// row's own cap and rule): the bf16 dot product for a bf16 pass on AVX512-BF16, else fp32 FMA at the
// set's vector width.
double ceiling_flops(const MachinePeak& peak, bool bf16, const std::string& pass, CpuIsa forward_set,
                     CpuIsa backward_set);

}  // namespace pflash::bench
