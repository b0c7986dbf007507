// MPI return codes as pflash::Error: the mesh's communicator returns errors (MPI_ERRORS_RETURN)
// instead of aborting, so a failed collective reaches the caller with the rank that saw it.
#pragma once

#include <mpi.h>

#include <string>

#include "pflash/error.hpp"

namespace pflash::detail {

inline void check_mpi(int rc, const char* call, int rank) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  MPI_Error_string(rc, text, &length);
  throw Error(ErrorCode::kPeerFailed,
              std::string(call) + " failed on rank " + std::to_string(rank) + ": " + std::string(text, length));
}

}  // namespace pflash::detail
