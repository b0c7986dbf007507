// Library-owned memory: 64-byte aligned, zero-initialised on request, and counted in
// pflash::memory_stats() so the benchmark can report what a call allocated.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

namespace pflash::detail {

void* tracked_allocate(std::size_t bytes);  // throws OutOfMemoryError
void tracked_free(void* pointer, std::size_t bytes) noexcept;

template <class T>
class Workspace {
 public:
  Workspace() = default;
  explicit Workspace(std::size_t count) : count_(count) {
    if (count_ > 0) data_ = static_cast<T*>(tracked_allocate(count_ * sizeof(T)));
  }
  Workspace(Workspace&& other) noexcept : data_(other.data_), count_(other.count_) {
    other.data_ = nullptr;
    other.count_ = 0;
  }
  Workspace& operator=(Workspace&& other) noexcept {
    std::swap(data_, other.data_);
    std::swap(count_, other.count_);
    return *this;
  }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  ~Workspace() {
    if (data_ != nullptr) tracked_free(data_, count_ * sizeof(T));
  }

  T* data() const { return data_; }
  std::size_t size() const { return count_; }

 private:
  T* data_ = nullptr;
  std::size_t count_ = 0;
};

}  // namespace pflash::detail
