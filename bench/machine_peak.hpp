// The machine's own ceilings, measured at start-up so every fraction in a report is taken against
// the same machine in the same run.
#pragma once

#include <string>

namespace pflash::bench {

// The ceilings rows are judged against are those of the unit the kernels use: fp32 FMA at the vector
// width of the active instruction set, and for bf16 on AVX512-BF16 the bf16 dot product (vdpbf16ps)
// of the products that use it (all of the forward's, three of the backward's five). The hardware's
// widest FMA and its bf16 dot product are measured beside them, for reference.
struct MachinePeak {
  int threads = 1;
  std::string cpu_name;
  std::string isa;                       // instruction set of the kernels (pflash::active_cpu_isa)
  double peak_flops_fp32 = 0.0;          // FLOP/s, fp32 FMA at the kernels' vector width, every thread
  double peak_flops_bf16 = 0.0;          // FLOP/s, the bf16 forward's unit: vdpbf16ps, or that fp32 FMA
  double peak_flops_bf16_backward = 0.0; // FLOP/s, the bf16 backward's units (FMA, and vdpbf16ps for 3/5)
  double widest_fma_flops = 0.0;         // FLOP/s, fp32 FMA at the widest width this CPU has
  double bf16_dot_flops = 0.0;           // FLOP/s, vdpbf16ps (0: the CPU has none)
  bool native_bf16 = false;              // whether the CPU has vdpbf16ps
  double read_bw = 0.0;                  // bytes/s, streaming reads from DRAM on every thread
};

// The ceiling of a row of `pass` ("fwd", "bwd", "fwd+bwd") in `dtype` whose forward is forward_flops
// of its flops: for fwd+bwd the rate at which both parts at their own units' peaks would run.
double ceiling_flops(const MachinePeak& peak, bool bf16, const std::string& pass, double forward_share);

MachinePeak measure_machine_peak(int threads);

}  // namespace pflash::bench
