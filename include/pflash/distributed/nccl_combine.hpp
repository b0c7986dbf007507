// The combine of a sharded decode on NVIDIA GPUs, over NCCL. NCCL has no user-defined reductions, so
// the exact merge cannot be an all-reduce: every rank all-gathers the P ranks' (O, LSE) states into a
// device workspace, then one kernel merges them (the same merge_row as the CPU paths), giving every
// rank the result over the whole cache. Built when the CUDA toolkit and NCCL are found.
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstdint>

#include "pflash/distributed/mesh.hpp"

namespace pflash {

// Device pointers, all fp32. A state is one query row's partial result, D + 1 floats: O then LSE.
struct NcclCombineParams {
  const float* states = nullptr;  // [rows, D + 1], this rank's partial states
  float* gathered = nullptr;      // [P, rows, D + 1] workspace
  float* o = nullptr;             // [rows, D], the merged O
  float* lse = nullptr;           // optional [rows]
  std::int64_t rows = 0;
  std::int64_t dim = 0;
};

// An NCCL communicator over the mesh's ranks, one GPU per rank (`device`), its id sent over MPI.
// Collective over the mesh. Throws pflash::Error naming the rank on an NCCL or CUDA failure.
ncclComm_t make_nccl_comm(const Mesh& mesh, int device);

// Enqueues the all-gather and the merge on `stream`; collective over comm's ranks.
void nccl_combine_states(ncclComm_t comm, const NcclCombineParams& params, cudaStream_t stream);

}  // namespace pflash
