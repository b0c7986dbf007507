// The ranks mpirun started, for tests that build a mesh over all of them.
#pragma once

#include <mpi.h>

namespace pflash::testing {

inline int world_size() {
  int size = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  return size;
}

}  // namespace pflash::testing
