// How many ranges each sequence's positions are cut into when the caller leaves it to us.
#include <algorithm>
#include <cstdint>

#include "cpu/backend.hpp"

namespace pflash::cpu {
namespace {

// A split shorter than this spends a noticeable share of its time on setup (the query tile, the
// epilogue, its partial's merge) rather than on streaming keys.
constexpr std::int64_t kMinSplitKeys = 256;

}  // namespace

// Work items are (sequence, KV head, split), handed to threads dynamically. One split per sequence
// when there are already enough items to fill every thread evenly; otherwise the fewest splits that
// make the items divide into waves of `threads` with at least 90% of the threads busy (the best
// balance found when none does).
int choose_decode_splits(const detail::DecodeParams& p) {
  const std::int64_t items = p.batch * p.heads_kv;
  const std::int64_t threads = std::max(p.num_threads, 1);
  const std::int64_t max_splits =
      std::clamp<std::int64_t>(p.max_positions_read() / kMinSplitKeys, 1, kMaxDecodeSplits);
  int best = 1;
  double best_balance = 0.0;
  for (std::int64_t splits = 1; splits <= max_splits; ++splits) {
    const std::int64_t tasks = items * splits;
    const std::int64_t waves = (tasks + threads - 1) / threads;
    const double balance = static_cast<double>(tasks) / static_cast<double>(waves * threads);
    if (balance > best_balance + 1e-9) {
      best = static_cast<int>(splits);
      best_balance = balance;
    }
    if (balance >= 0.9) break;
  }
  return best;
}

}  // namespace pflash::cpu
