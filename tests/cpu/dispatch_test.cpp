// Which kernel set a call runs (cpu_kernel_choice): the widest allowed but for bf16 products, where the
// measured rule takes the faster of AVX512-BF16 and AVX-512; the automatic choice computes what the
// forced ones do (against the float64 reference, forward and backward), on any CPU.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "pflash/pflash.hpp"
#include "support/reference.hpp"
#include "support/tensors.hpp"

namespace pflash::testing {
namespace {

constexpr CpuPass kPasses[] = {CpuPass::kForward, CpuPass::kBackward, CpuPass::kDecode};

TEST(KernelChoice, WidestButMeasuredForBf16Products) {
  const CpuIsa detected = detected_cpu_isa();
  for (CpuPass pass : kPasses) {
    for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
      const CpuKernelChoice choice = cpu_kernel_choice(pass, dtype);
      EXPECT_FALSE(choice.reason.empty());
      const bool measured = detected >= CpuIsa::kAvx512Bf16 && dtype == DType::kBFloat16 && pass != CpuPass::kDecode;
      if (measured) {
        EXPECT_TRUE(choice.isa == CpuIsa::kAmxBf16 || choice.isa == CpuIsa::kAvx512Bf16 || choice.isa == CpuIsa::kAvx512)
            << to_string(choice.isa);
        if (detected < CpuIsa::kAmxBf16) {
          EXPECT_NE(choice.isa, CpuIsa::kAmxBf16);
        }
        EXPECT_EQ(choice.reason.rfind("measured: ", 0), 0u) << choice.reason;
        // Measured once per process: the same answer again.
        EXPECT_EQ(cpu_kernel_choice(pass, dtype).reason, choice.reason);
      } else {
        // The AMX set's decode is AVX512-BF16's, and it says so.
        const CpuIsa expected = pass == CpuPass::kDecode ? std::min(detected, CpuIsa::kAvx512Bf16) : detected;
        EXPECT_EQ(choice.isa, expected) << to_string(pass) << " " << to_string(dtype) << ": " << choice.reason;
      }
      std::printf("%s %s: %s (%s)\n", std::string(to_string(pass)).c_str(), std::string(to_string(dtype)).c_str(),
                  std::string(to_string(choice.isa)).c_str(), choice.reason.c_str());
    }
  }
}

TEST(KernelChoice, TheCapAndTheWidestRuleDecide) {
  set_max_cpu_isa(CpuIsa::kAvx512);
  const CpuKernelChoice capped = cpu_kernel_choice(CpuPass::kForward, DType::kBFloat16);
  EXPECT_EQ(capped.isa, std::min(CpuIsa::kAvx512, detected_cpu_isa()));
  if (detected_cpu_isa() > CpuIsa::kAvx512) {
    EXPECT_EQ(capped.reason, "the widest under the cap");
  }
  set_max_cpu_isa(CpuIsa::kAmxBf16);
  set_cpu_kernel_rule(CpuKernelRule::kWidest);
  EXPECT_EQ(cpu_kernel_choice(CpuPass::kBackward, DType::kBFloat16).isa, detected_cpu_isa());
  reset_cpu_kernel_rule();
}

TEST(KernelChoice, TheEnvironmentSetsTheRule) {
  setenv("PFLASH_CPU_KERNELS", "widest", 1);
  EXPECT_EQ(cpu_kernel_choice(CpuPass::kForward, DType::kBFloat16).isa, detected_cpu_isa());
  setenv("PFLASH_CPU_KERNELS", "fastest", 1);
  try {
    (void)cpu_kernel_choice(CpuPass::kForward, DType::kBFloat16);
    if (detected_cpu_isa() >= CpuIsa::kAvx512Bf16) ADD_FAILURE() << "no error for PFLASH_CPU_KERNELS=fastest";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument);
    EXPECT_STREQ(e.what(), "PFLASH_CPU_KERNELS: expected measured or widest (or unset), got 'fastest'");
  }
  unsetenv("PFLASH_CPU_KERNELS");
}

struct StepResult {
  HostTensor o, lse, dq, dk, dv;
};

// A bf16 training step of one GQA shape with ragged lengths, under the rule and cap in force.
StepResult train_step(const HostTensor& q, const HostTensor& k, const HostTensor& v, const HostTensor& dout) {
  const auto& qs = q.shape();
  const auto& ks = k.shape();
  StepResult run{HostTensor(DType::kBFloat16, qs), HostTensor(DType::kFloat32, {qs[0], qs[1], qs[2]}),
          HostTensor(DType::kBFloat16, qs), HostTensor(DType::kBFloat16, ks), HostTensor(DType::kBFloat16, ks)};
  for (HostTensor* t : {&run.o, &run.lse, &run.dq, &run.dk, &run.dv}) t->poison();
  AttentionParams p;
  p.q = q.view();
  p.k = k.view();
  p.v = v.view();
  p.o = run.o.mutable_view();
  p.lse = run.lse.mutable_view();
  p.mask.causal = true;
  flash_attention_forward_backward(p, dout.view(), run.dq.mutable_view(), run.dk.mutable_view(),
                                   run.dv.mutable_view());
  return run;
}

TEST(KernelChoice, AutomaticAndForcedSetsMatchTheReference) {
  auto rng = make_rng();
  HostTensor q(DType::kBFloat16, {1, 4, 300, 128}), k(DType::kBFloat16, {1, 2, 333, 128}),
      v(DType::kBFloat16, {1, 2, 333, 128}), dout(DType::kBFloat16, {1, 4, 300, 128});
  for (HostTensor* t : {&q, &k, &v, &dout}) t->fill_normal(rng);
  const double scale = 1.0 / std::sqrt(128.0);
  const ReferenceOutput ref = reference_attention(to_dense(q), to_dense(k), to_dense(v), true, scale);
  const ReferenceGradients grads =
      reference_attention_backward(to_dense(q), to_dense(k), to_dense(v), to_dense(dout), true, scale);
  auto check = [&](const StepResult& run, const std::string& label) {
    EXPECT_LT(relative_l2_error(run.o, ref.o), 1e-2) << label;
    EXPECT_LT(relative_l2_error(run.dq, grads.dq), 2e-2) << label;
    EXPECT_LT(relative_l2_error(run.dk, grads.dk), 2e-2) << label;
    EXPECT_LT(relative_l2_error(run.dv, grads.dv), 2e-2) << label;
  };
  const StepResult automatic = train_step(q, k, v, dout);
  check(automatic, "measured rule: " + std::string(to_string(cpu_kernel_choice(CpuPass::kForward,
                                                                                DType::kBFloat16).isa)));
  set_cpu_kernel_rule(CpuKernelRule::kWidest);
  for (CpuIsa isa : {CpuIsa::kAmxBf16, CpuIsa::kAvx512Bf16, CpuIsa::kAvx512}) {
    if (detected_cpu_isa() < isa) continue;
    set_max_cpu_isa(isa);
    check(train_step(q, k, v, dout), "forced " + std::string(to_string(isa)));
  }
  set_max_cpu_isa(CpuIsa::kAmxBf16);
  reset_cpu_kernel_rule();
}

}  // namespace
}  // namespace pflash::testing
