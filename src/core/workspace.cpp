#include "core/workspace.hpp"

#include <atomic>
#include <cstdlib>
#include <string>

#include "pflash/error.hpp"
#include "pflash/runtime.hpp"

namespace pflash {
namespace {

std::atomic<std::uint64_t> g_current_bytes{0};
std::atomic<std::uint64_t> g_peak_bytes{0};

constexpr std::size_t kAlignment = 64;  // a cache line, and a full AVX-512 vector

}  // namespace

namespace detail {

void* tracked_allocate(std::size_t bytes) {
  const std::size_t rounded = (bytes + kAlignment - 1) / kAlignment * kAlignment;
  void* pointer = std::aligned_alloc(kAlignment, rounded);
  if (pointer == nullptr) {
    throw OutOfMemoryError("pflash: could not allocate a workspace of " + std::to_string(bytes) + " bytes",
                           bytes);
  }
  const std::uint64_t now = g_current_bytes.fetch_add(bytes) + bytes;
  std::uint64_t peak = g_peak_bytes.load();
  while (now > peak && !g_peak_bytes.compare_exchange_weak(peak, now)) {
  }
  return pointer;
}

void tracked_free(void* pointer, std::size_t bytes) noexcept {
  std::free(pointer);
  g_current_bytes.fetch_sub(bytes);
}

}  // namespace detail

MemoryStats memory_stats() { return {g_current_bytes.load(), g_peak_bytes.load()}; }

void reset_peak_memory_stats() { g_peak_bytes.store(g_current_bytes.load()); }

}  // namespace pflash
