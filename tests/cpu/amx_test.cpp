// The AMX-BF16 kernels. Their tile code runs here on a model of the tiles (amx_tile_emulator.hpp) over
// the mask grid and the shape grid, against the float64 reference, on any CPU with AVX512-BF16; the
// hardware tiles run where the CPU and the system have them (the per-ISA grids of flash_fwd_test,
// flash_bwd_test and mask_test include amx_bf16 and skip it elsewhere), and there the model must
// compute what they do.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "cpu/amx_emulated_kernels.hpp"
#include "cpu/amx_tile_emulator.hpp"
#include "support/attention_cases.hpp"
#include "support/isa.hpp"
#include "support/mask_cases.hpp"
#include "support/reference.hpp"
#include "support/tensors.hpp"

namespace pflash::testing {
namespace {

#define PFLASH_SKIP_WITHOUT_AVX512_BF16()                                                                 \
  if (detected_cpu_isa() < CpuIsa::kAvx512Bf16)                                                          \
  GTEST_SKIP() << "the emulated AMX kernels are AVX512-BF16 code around the tiles; this CPU has no avx512_bf16"

// The model against the definition, computed in double: one product of random tiles added to a
// random accumulator.
TEST(AmxTileEmulator, ComputesTheDefinitionOfTdpbf16ps) {
  std::mt19937_64 rng(7);
  std::normal_distribution<float> normal;
  float c[16][16];
  bfloat16 a[16][32], b[16][32];
  for (auto& row : c) for (float& x : row) x = normal(rng);
  for (auto& row : a) for (bfloat16& x : row) x = bfloat16(normal(rng));
  for (auto& row : b) for (bfloat16& x : row) x = bfloat16(normal(rng));
  EmulatedAmxTiles::configure();
  EmulatedAmxTiles::load<0>(c, sizeof c[0]);
  EmulatedAmxTiles::load<1>(a, sizeof a[0]);
  EmulatedAmxTiles::load<2>(b, sizeof b[0]);
  EmulatedAmxTiles::dot<0, 1, 2>();
  float got[16][16];
  EmulatedAmxTiles::store<0>(got, sizeof got[0]);
  EmulatedAmxTiles::release();
  for (int m = 0; m < 16; ++m) {
    for (int n = 0; n < 16; ++n) {
      double want = c[m][n];
      for (int k = 0; k < 32; ++k) want += double(float(a[m][k])) * double(float(b[k / 2][2 * n + k % 2]));
      EXPECT_NEAR(got[m][n], want, 1e-4 * (1.0 + std::abs(want))) << m << ", " << n;
    }
  }
}

KernelRunner emulated_kernels() {
  return {[](const AttentionParams& p) { flash_forward_amx_emulated(p); },
          [](const AttentionBackwardParams& p) { flash_backward_amx_emulated(p); }};
}

// The shape grid of the forward and backward tests (bf16, full and causal), and shapes around the
// tiles' edges: head dims of exactly one chunk of pairs (32) and one and a half (48), 16 and 48 query
// rows, 32 keys.
std::vector<MaskCase> tile_cases() {
  constexpr std::int64_t kNone = kUnboundedWindow;
  std::vector<MaskCase> cases;
  for (const Case& c : attention_cases()) {
    if (c.dtype != DType::kBFloat16 || c.layout != Layout::kBhnd) continue;
    const Shape& s = c.shape;
    std::string name = case_name(c, CpuIsa::kAmxBf16);
    name = name.substr(0, name.size() - std::string("_bf16_amx_bf16").size());
    cases.push_back({name, s.batch, s.heads_q, s.heads_kv, s.seq_q, s.seq_k, s.dim, geometry(c.causal, kNone, kNone)});
  }
  cases.push_back({"one_chunk_D32", 1, 2, 1, 48, 32, 32, geometry(false, kNone, kNone)});
  cases.push_back({"chunk_and_a_half_D48", 1, 2, 2, 16, 100, 48, geometry(true, kNone, kNone)});
  cases.push_back({"long_causal_D128", 1, 2, 1, 200, 260, 128, geometry(true, kNone, kNone)});
  return cases;
}

std::vector<MaskCase> emulated_cases() {
  std::vector<MaskCase> cases = mask_cases();
  for (const MaskCase& c : tile_cases()) cases.push_back(c);
  return cases;
}

class AmxEmulated : public ::testing::TestWithParam<MaskCase> {};

TEST_P(AmxEmulated, ForwardAndBackwardMatchFloat64Reference) {
  PFLASH_SKIP_WITHOUT_AVX512_BF16();
  expect_mask_case_matches_reference(GetParam(), DType::kBFloat16, emulated_kernels());
}

INSTANTIATE_TEST_SUITE_P(Grid, AmxEmulated, ::testing::ValuesIn(emulated_cases()),
                         [](const auto& info) { return info.param.name; });

struct Step {
  HostTensor q, k, v, o, lse, dout, dq, dk, dv;
};

Step make_step(std::int64_t n, std::int64_t dim) {
  const std::vector<std::int64_t> shape{1, 2, n, dim};
  Step s{HostTensor(DType::kBFloat16, shape), HostTensor(DType::kBFloat16, shape), HostTensor(DType::kBFloat16, shape),
         HostTensor(DType::kBFloat16, shape), HostTensor(DType::kFloat32, {1, 2, n}), HostTensor(DType::kBFloat16, shape),
         HostTensor(DType::kBFloat16, shape), HostTensor(DType::kBFloat16, shape), HostTensor(DType::kBFloat16, shape)};
  auto rng = make_rng();
  for (HostTensor* t : {&s.q, &s.k, &s.v, &s.dout}) t->fill_normal(rng);
  for (HostTensor* t : {&s.o, &s.lse, &s.dq, &s.dk, &s.dv}) t->poison();
  return s;
}

AttentionParams forward_params(Step& s) {
  AttentionParams p;
  p.q = s.q.view();
  p.k = s.k.view();
  p.v = s.v.view();
  p.o = s.o.mutable_view();
  p.lse = s.lse.mutable_view();
  p.mask.causal = true;
  return p;
}

AttentionBackwardParams backward_params(Step& s) {
  AttentionBackwardParams p;
  p.q = s.q.view();
  p.k = s.k.view();
  p.v = s.v.view();
  p.o = s.o.view();
  p.lse = s.lse.view();
  p.dout = s.dout.view();
  p.dq = s.dq.mutable_view();
  p.dk = s.dk.mutable_view();
  p.dv = s.dv.mutable_view();
  p.mask.causal = true;
  return p;
}

// The grid above would pass on the vector tiles alone: the tiles must have done the products (every
// 16 query rows' scores and p x v in the forward; s, dp, dq, and on whole 32-row blocks dv and dk, in
// the backward: five products to the forward's two).
TEST(AmxEmulatedKernels, PutTheProductsOnTiles) {
  PFLASH_SKIP_WITHOUT_AVX512_BF16();
  Step s = make_step(256, 128);
  const std::int64_t before = EmulatedAmxTiles::products().load();
  flash_forward_amx_emulated(forward_params(s));
  const std::int64_t forward = EmulatedAmxTiles::products().load() - before;
  // Causal 256 x 256, D = 128, 2 heads: scores are 2 products per 16 x 32 x 32 chunk, p x v as many.
  const std::int64_t causal_chunks = 2 * (256 / 16) * (256 / 32 + 1) / 2 * (128 / 32);
  EXPECT_GT(forward, causal_chunks) << "tile products in the forward";
  flash_backward_amx_emulated(backward_params(s));
  const std::int64_t backward = EmulatedAmxTiles::products().load() - before - forward;
  EXPECT_GT(backward, 2 * forward) << "tile products in the backward: " << backward << " against the forward's " << forward;
}

// Where the hardware has tiles: the model computes what the hardware does (the same kernels, the same
// order of tile products; within one bf16 rounding of the outputs, as the manual leaves the rounding
// inside a tile product to the implementation), so what the emulated grid checks is what runs.
TEST(AmxHardware, TheModelComputesWhatTheTilesDo) {
  if (detected_cpu_isa() < CpuIsa::kAmxBf16) GTEST_SKIP() << "this CPU (or system) has no amx_bf16";
  const IsaScope scope(CpuIsa::kAmxBf16);
  const auto expect_agree = [](const HostTensor& hardware, const HostTensor& model, const char* what) {
    EXPECT_LT(relative_l2_error(hardware, to_dense(model).data), 4e-3) << what;
  };
  for (std::int64_t dim : {48, 128}) {
    Step hw = make_step(200, dim), model = make_step(200, dim);
    flash_attention_forward(forward_params(hw));
    flash_forward_amx_emulated(forward_params(model));
    expect_agree(hw.o, model.o, "O");
    flash_attention_backward(backward_params(hw));
    flash_backward_amx_emulated(backward_params(model));
    expect_agree(hw.dq, model.dq, "dQ");
    expect_agree(hw.dk, model.dk, "dK");
    expect_agree(hw.dv, model.dv, "dV");
  }
}

}  // namespace
}  // namespace pflash::testing
