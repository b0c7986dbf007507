// The NCCL combine (all-gather + merge kernel) against merge_attention_states on the host. Runs
// where each rank has a GPU of its own; elsewhere it skips, saying so.
#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "distributed/world.hpp"
#include "pflash/distributed/nccl_combine.hpp"
#include "support/merge.hpp"
#include "support/reference.hpp"
#include "support/tensors.hpp"

namespace pflash::testing {
namespace {

TEST(NcclCombine, EqualsMergeAttentionStates) {
  const Mesh mesh(MPI_COMM_WORLD, {1, world_size()});
  int devices = 0;
  const bool have_gpus = cudaGetDeviceCount(&devices) == cudaSuccess && devices >= mesh.size();
  int all_have = have_gpus ? 1 : 0;
  MPI_Allreduce(MPI_IN_PLACE, &all_have, 1, MPI_INT, MPI_MIN, mesh.comm());
  if (all_have == 0) GTEST_SKIP() << "needs one CUDA device per rank (found " << devices << "): compiled, not run";

  const int p = mesh.size(), rank = mesh.rank();
  const std::int64_t n = 45, heads = 1, rows = n, dim = 128;
  auto rng = make_rng();  // the same on every rank: every rank knows every rank's states
  HostTensor o_parts(DType::kFloat32, {p, n, heads, dim}), lse_parts(DType::kFloat32, {p, n, heads});
  o_parts.fill_normal(rng);
  std::uniform_real_distribution<double> spread(-30.0, 30.0);
  for (std::int64_t s = 0; s < p; ++s)
    for (std::int64_t i = 0; i < n; ++i) lse_parts.set(i % 7 == 0 && s == 0 ? -INFINITY : spread(rng), s, i, 0);
  const auto [o, lse] = merge_parts(o_parts, lse_parts);

  std::vector<float> states(static_cast<std::size_t>(rows * (dim + 1)));
  for (std::int64_t r = 0; r < rows; ++r) {
    for (std::int64_t d = 0; d < dim; ++d) states[r * (dim + 1) + d] = static_cast<float>(o_parts.at(rank, r, 0, d));
    states[r * (dim + 1) + dim] = static_cast<float>(lse_parts.at(rank, r, 0));
  }
  ncclComm_t comm = make_nccl_comm(mesh, rank % devices);
  float *d_states = nullptr, *d_gathered = nullptr, *d_o = nullptr, *d_lse = nullptr;
  cudaMalloc(&d_states, states.size() * sizeof(float));
  cudaMalloc(&d_gathered, states.size() * p * sizeof(float));
  cudaMalloc(&d_o, rows * dim * sizeof(float));
  cudaMalloc(&d_lse, rows * sizeof(float));
  cudaMemcpy(d_states, states.data(), states.size() * sizeof(float), cudaMemcpyHostToDevice);
  nccl_combine_states(comm, {d_states, d_gathered, d_o, d_lse, rows, dim}, nullptr);
  std::vector<float> got_o(static_cast<std::size_t>(rows * dim)), got_lse(static_cast<std::size_t>(rows));
  ASSERT_EQ(cudaMemcpy(got_o.data(), d_o, got_o.size() * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(got_lse.data(), d_lse, got_lse.size() * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
  for (std::int64_t r = 0; r < rows; ++r) {
    EXPECT_TRUE(lse_near(got_lse[r], lse.at(r, 0, 0), 1e-5)) << "row " << r;  // rows 0, 7, 14, ...: -inf
    double worst = 0.0;
    for (std::int64_t d = 0; d < dim; ++d) {
      const double error = std::abs(got_o[r * dim + d] - o.at(r, 0, d));
      worst = std::isnan(error) ? INFINITY : std::max(worst, error);
    }
    EXPECT_LT(worst, 1e-5) << "row " << r;
  }
  cudaFree(d_states);
  cudaFree(d_gathered);
  cudaFree(d_o);
  cudaFree(d_lse);
  ncclCommDestroy(comm);
}

}  // namespace
}  // namespace pflash::testing
