// The one error type of the library. Every public call validates its arguments before touching
// memory and throws pflash::Error naming the argument, what was expected and what was given.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace pflash {

// kPeerFailed: a collective call (the distributed layer) failed on another rank, or the
// communication itself failed; the message names the rank.
enum class ErrorCode { kInvalidArgument, kOutOfMemory, kUnsupported, kPeerFailed };

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message) : std::runtime_error(message), code_(code) {}
  ErrorCode code() const noexcept { return code_; }

 private:
  ErrorCode code_;
};

// Thrown before anything is allocated when a call's memory would exceed its budget (or the
// allocation itself fails); bytes_needed() is what the call would have allocated.
class OutOfMemoryError : public Error {
 public:
  OutOfMemoryError(const std::string& message, std::uint64_t bytes_needed)
      : Error(ErrorCode::kOutOfMemory, message), bytes_needed_(bytes_needed) {}
  std::uint64_t bytes_needed() const noexcept { return bytes_needed_; }

 private:
  std::uint64_t bytes_needed_;
};

}  // namespace pflash
