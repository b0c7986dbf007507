// Causal attention over random inputs with the installed library, checked against a direct
// softmax(Q K^T / sqrt(D)) V in double precision: prints the largest error and exits non-zero past 1e-4.
#include <pflash/pflash.hpp>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

int main() {
  constexpr std::int64_t kRows = 37, kDim = 24;
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  std::vector<float> q(kRows * kDim), k(kRows * kDim), v(kRows * kDim), o(kRows * kDim);
  for (auto* t : {&q, &k, &v})
    for (float& x : *t) x = normal(rng);

  pflash::AttentionParams p;
  p.q = pflash::TensorView::contiguous(q.data(), pflash::DType::kFloat32, {1, 1, kRows, kDim});
  p.k = pflash::TensorView::contiguous(k.data(), pflash::DType::kFloat32, {1, 1, kRows, kDim});
  p.v = pflash::TensorView::contiguous(v.data(), pflash::DType::kFloat32, {1, 1, kRows, kDim});
  p.o = pflash::MutableTensorView::contiguous(o.data(), pflash::DType::kFloat32, {1, 1, kRows, kDim});
  p.mask.causal = true;
  pflash::flash_attention_forward(p);

  double worst = 0.0;
  for (std::int64_t i = 0; i < kRows; ++i) {
    std::vector<double> weights(static_cast<std::size_t>(i + 1));
    double max_score = -INFINITY, sum = 0.0;
    for (std::int64_t j = 0; j <= i; ++j) {
      double score = 0.0;
      for (std::int64_t d = 0; d < kDim; ++d) score += double(q[i * kDim + d]) * k[j * kDim + d];
      weights[j] = score / std::sqrt(double(kDim));
      max_score = std::max(max_score, weights[j]);
    }
    for (double& w : weights) sum += (w = std::exp(w - max_score));
    for (std::int64_t d = 0; d < kDim; ++d) {
      double want = 0.0;
      for (std::int64_t j = 0; j <= i; ++j) want += weights[j] / sum * v[j * kDim + d];
      worst = std::max(worst, std::abs(want - o[i * kDim + d]));
    }
  }
  std::printf("pflash %s (%s kernels): causal attention, max |error| %.2e\n", std::string(pflash::version()).c_str(),
              std::string(pflash::to_string(pflash::active_cpu_isa())).c_str(), worst);
  return worst < 1e-4 ? 0 : 1;
}
