// Appending new K/V rows to a cache: a copy of T rows per (sequence, KV head) into the positions
// the cache's own addressing (contiguous or paged) gives them.
#include <cstdint>
#include <cstring>

#include "cpu/backend.hpp"
#include "pflash/dtype.hpp"

namespace pflash::cpu {

void append_kv(detail::AppendParams p) {
  const std::size_t row_bytes = static_cast<std::size_t>(p.dim) * size_of(p.cache.dtype);
  const std::size_t elem = size_of(p.cache.dtype);
  for (std::int64_t b = 0; b < p.batch; ++b) {
    const std::int64_t first = p.seq_lens[b];
    for (std::int64_t h = 0; h < p.heads_kv; ++h) {
      for (std::int64_t t = 0; t < p.tokens; ++t) {
        const std::int64_t position = first + t;
        const auto* k_src = static_cast<const unsigned char*>(p.k_new) +
                            (b * p.k_new_strides.batch + h * p.k_new_strides.head + t * p.k_new_strides.row) * elem;
        const auto* v_src = static_cast<const unsigned char*>(p.v_new) +
                            (b * p.v_new_strides.batch + h * p.v_new_strides.head + t * p.v_new_strides.row) * elem;
        std::memcpy(static_cast<unsigned char*>(p.k) + p.cache.offset(p.cache.k_strides, b, h, position) * elem, k_src,
                    row_bytes);
        std::memcpy(static_cast<unsigned char*>(p.v) + p.cache.offset(p.cache.v_strides, b, h, position) * elem, v_src,
                    row_bytes);
      }
    }
  }
  // Lengths last: everything was checked before the first write, so a call either appends all or nothing.
  for (std::int64_t b = 0; b < p.batch; ++b) p.seq_lens[b] += static_cast<std::int32_t>(p.tokens);
}

}  // namespace pflash::cpu
