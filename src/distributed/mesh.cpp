// The mesh: a periodic Cartesian communicator over the given one, with errors returned.
#include "pflash/distributed/mesh.hpp"

#include <charconv>
#include <string>
#include <utility>

#include "distributed/mpi_check.hpp"
#include "pflash/error.hpp"

namespace pflash {
namespace {

[[noreturn]] void bad_shape(std::string_view text) {
  throw Error(ErrorCode::kInvalidArgument,
              "mesh shape: expected ROWSxCOLS with both at least 1 (e.g. 2x2), got '" + std::string(text) + "'");
}

int parse_extent(std::string_view digits, std::string_view text) {
  int value = 0;
  const auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), value);
  if (digits.empty() || ec != std::errc() || end != digits.data() + digits.size() || value < 1) bad_shape(text);
  return value;
}

}  // namespace

MeshShape parse_mesh_shape(std::string_view text) {
  const std::size_t x = text.find_first_of("xX");
  if (x == std::string_view::npos) bad_shape(text);
  return {parse_extent(text.substr(0, x), text), parse_extent(text.substr(x + 1), text)};
}

std::string to_string(MeshShape shape) { return std::to_string(shape.rows) + "x" + std::to_string(shape.cols); }

Mesh::Mesh(MPI_Comm comm, MeshShape shape) : shape_(shape) {
  int size = 0, rank = 0;
  detail::check_mpi(MPI_Comm_size(comm, &size), "MPI_Comm_size", -1);
  detail::check_mpi(MPI_Comm_rank(comm, &rank), "MPI_Comm_rank", -1);
  // Every rank reaches the same verdict on its own for the size; the shapes are then compared, so a
  // rank given another shape is an error everywhere rather than a mismatched collective.
  if (shape.rows < 1 || shape.cols < 1 || shape.size() != size) {
    throw Error(ErrorCode::kInvalidArgument, "Mesh: argument 'shape': expected " + std::to_string(size) +
                                                 " ranks (the communicator's size), got a " + to_string(shape) +
                                                 " mesh of " + std::to_string(shape.size()));
  }
  int mine[2] = {shape.rows, shape.cols};
  int lowest[2] = {0, 0}, highest[2] = {0, 0};
  detail::check_mpi(MPI_Allreduce(mine, lowest, 2, MPI_INT, MPI_MIN, comm), "MPI_Allreduce", rank);
  detail::check_mpi(MPI_Allreduce(mine, highest, 2, MPI_INT, MPI_MAX, comm), "MPI_Allreduce", rank);
  if (lowest[0] != highest[0] || lowest[1] != highest[1]) {
    throw Error(ErrorCode::kInvalidArgument, "Mesh: argument 'shape': expected the same shape on every rank, got " +
                                                 to_string(shape) + " on rank " + std::to_string(rank) +
                                                 " and others elsewhere");
  }
  int dims[2] = {shape.rows, shape.cols};
  int periods[2] = {1, 1};  // wrap-around links: a torus
  detail::check_mpi(MPI_Cart_create(comm, 2, dims, periods, /*reorder=*/0, &comm_), "MPI_Cart_create", rank);
  MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
  detail::check_mpi(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank", rank);
  int coords[2] = {0, 0};
  detail::check_mpi(MPI_Cart_coords(comm_, rank_, 2, coords), "MPI_Cart_coords", rank_);
  coords_ = {coords[0], coords[1]};
}

Mesh::~Mesh() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (comm_ != MPI_COMM_NULL && !finalized) MPI_Comm_free(&comm_);
}

Mesh::Mesh(Mesh&& other) noexcept
    : comm_(std::exchange(other.comm_, MPI_COMM_NULL)), shape_(other.shape_), rank_(other.rank_), coords_(other.coords_) {}

Mesh& Mesh::operator=(Mesh&& other) noexcept {
  if (this != &other) {
    Mesh gone(std::move(*this));
    comm_ = std::exchange(other.comm_, MPI_COMM_NULL);
    shape_ = other.shape_;
    rank_ = other.rank_;
    coords_ = other.coords_;
  }
  return *this;
}

}  // namespace pflash
