// The NCCL combine: all-gather of the states, then the merge kernel.
#include <string>

#include "core/merge_row.hpp"
#include "pflash/distributed/nccl_combine.hpp"
#include "pflash/error.hpp"

namespace pflash {
namespace {

// One thread per (row, 32 columns of O): a row's P parts are read once, column chunks side by side
// so that neighbouring threads read neighbouring floats of each part. D + 1 <= 257 floats x P parts
// per row is a few KiB: the kernel is launch-bound, not worth shared memory.
constexpr int kColumns = 32;

__global__ void merge_states_kernel(const float* gathered, int parts, std::int64_t rows, std::int64_t dim, float* o,
                                    float* lse) {
  const std::int64_t chunks = (dim + kColumns - 1) / kColumns;
  const std::int64_t item = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x;
  if (item >= rows * chunks) return;
  const std::int64_t row = item / chunks, d0 = (item % chunks) * kColumns;
  const std::int64_t state = dim + 1, part_stride = rows * state;
  const float* first = gathered + row * state;
  const std::int64_t n = dim - d0 < kColumns ? dim - d0 : kColumns;
  detail::merge_row(parts, n, first + d0, part_stride, first + dim, part_stride, o + row * dim + d0,
                    d0 == 0 && lse != nullptr ? lse + row : nullptr);
}

int comm_rank(ncclComm_t comm) {
  int rank = -1;
  ncclCommUserRank(comm, &rank);
  return rank;
}

void check_nccl(ncclResult_t result, const char* call, int rank) {
  if (result != ncclSuccess) {
    throw Error(ErrorCode::kPeerFailed,
                std::string(call) + " failed on rank " + std::to_string(rank) + ": " + ncclGetErrorString(result));
  }
}

void check_cuda(cudaError_t result, const char* call, int rank) {
  if (result != cudaSuccess) {
    throw Error(ErrorCode::kPeerFailed,
                std::string(call) + " failed on rank " + std::to_string(rank) + ": " + cudaGetErrorString(result));
  }
}

}  // namespace

ncclComm_t make_nccl_comm(const Mesh& mesh, int device) {
  ncclUniqueId id;
  if (mesh.rank() == 0) check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId", 0);
  if (MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, mesh.comm()) != MPI_SUCCESS) {
    throw Error(ErrorCode::kPeerFailed, "MPI_Bcast of the NCCL id failed on rank " + std::to_string(mesh.rank()));
  }
  check_cuda(cudaSetDevice(device), "cudaSetDevice", mesh.rank());
  ncclComm_t comm = nullptr;
  check_nccl(ncclCommInitRank(&comm, mesh.size(), id, mesh.rank()), "ncclCommInitRank", mesh.rank());
  return comm;
}

void nccl_combine_states(ncclComm_t comm, const NcclCombineParams& p, cudaStream_t stream) {
  const int rank = comm_rank(comm);
  int parts = 0;
  check_nccl(ncclCommCount(comm, &parts), "ncclCommCount", rank);
  if (p.states == nullptr || p.gathered == nullptr || p.o == nullptr || p.rows < 1 || p.dim < 1) {
    throw Error(ErrorCode::kInvalidArgument,
                "nccl_combine_states: argument 'params': expected non-null states, gathered and o, rows >= 1 and "
                "dim >= 1, got rows = " + std::to_string(p.rows) + ", dim = " + std::to_string(p.dim));
  }
  const auto count = static_cast<std::size_t>(p.rows * (p.dim + 1));
  check_nccl(ncclAllGather(p.states, p.gathered, count, ncclFloat32, comm, stream), "ncclAllGather", rank);
  const std::int64_t items = p.rows * ((p.dim + kColumns - 1) / kColumns);
  constexpr int kThreads = 128;
  merge_states_kernel<<<static_cast<unsigned>((items + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      p.gathered, parts, p.rows, p.dim, p.o, p.lse);
  check_cuda(cudaGetLastError(), "merge_states_kernel launch", rank);
}

}  // namespace pflash
