// The machine's own ceilings, measured at start-up so every fraction in a report is taken against
// the same machine in the same run.
#pragma once

#include <string>

namespace pflash::bench {

struct MachinePeak {
  int threads = 1;
  std::string cpu_name;
  std::string isa;                // instruction set of the kernels (pflash::active_cpu_isa)
  double peak_flops_fp32 = 0.0;   // FLOP/s, fp32 FMA on every thread
  double peak_flops_bf16 = 0.0;   // FLOP/s, the CPU's bf16 dot product (vdpbf16ps); the fp32 FMA
                                  // peak where the CPU has none, since bf16 is then computed in fp32
  bool native_bf16 = false;       // whether peak_flops_bf16 is a native bf16 instruction
  double read_bw = 0.0;           // bytes/s, streaming reads from DRAM on every thread
};

MachinePeak measure_machine_peak(int threads);

}  // namespace pflash::bench
