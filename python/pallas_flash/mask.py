"""Which keys each query sees: one description that every kernel, the planner and the references read.

Positions. Query row i of a view sits at position q_position + i, key row j at k_position + j (a
view: the arrays one kernel call gets; a shard of a longer sequence has its own first positions). A
query at position p sees the key at position s when every rule that is set holds:
- causal:                  s <= p
- window (left, right):    p - left <= s <= p + right   (None: no bound on that side; FlashAttention's
                           and jax.nn's convention, so causal is a window whose right edge is 0)
- chunk c:                 s // c == p // c             (Llama 4's chunked attention)
Per-call operands add two more, checked element by element: segment ids (a query sees keys of its own
segment: packed documents) and per-sequence lengths (which the wrappers turn into segment ids).

`flash_attention`'s causal mask is aligned bottom-right (q_position = Nk - Nq, k_position = 0);
`jax.nn.dot_product_attention`'s top-left (both 0): the alignment is nothing but the positions.

The rules other than chunk and segments depend only on d = s - p, the key's position relative to the
query's: a row sees the keys whose d lies in the band [lo, hi]. A (rows x keys) tile at
delta = (key_start + k_position) - (row_start + q_position) spans d in [delta - rows + 1,
delta + keys - 1], so whether it is skipped, full or partial is a function of delta alone: the
kernels unroll one static pattern of sub-blocks per delta that meets an edge of the band.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from jax import lax

SKIP, FULL, PARTIAL = "skip", "full", "partial"


def _is_static(*values) -> bool:
    return all(isinstance(v, (int, np.integer)) for v in values)


def _max(a, b):
    return max(a, b) if _is_static(a, b) else jnp.maximum(a, b)


def _min(a, b):
    return min(a, b) if _is_static(a, b) else jnp.minimum(a, b)


def divide(x, divisor: int):
    """x // divisor for a traced int32 x >= 0: a shift for a power of two, else lax.div. The v5e
    compiler's static profile simulates a scalar division as 0 (a kernel whose loop bounds divide
    would be estimated on the first block alone); a shift it simulates."""
    if divisor & (divisor - 1) == 0:
        return lax.shift_right_logical(x, jnp.int32(divisor.bit_length() - 1))
    return lax.div(x, jnp.int32(divisor))


def both(a, b):
    """a and b, for Python bools (kept static) and traced booleans alike."""
    if a is True:
        return b
    if b is True:
        return a
    if a is False or b is False:
        return False
    return a & b


def either(a, b):
    """a or b, for Python bools and traced booleans alike."""
    if a is False:
        return b
    if b is False:
        return a
    if a is True or b is True:
        return True
    return a | b


def negate(a):
    return (not a) if isinstance(a, bool) else jnp.logical_not(a)


def and_masks(*masks):
    """The elementwise and of boolean arrays, skipping None (no mask); None when all are."""
    result = None
    for m in masks:
        if m is not None:
            result = m if result is None else result & m
    return result


@dataclasses.dataclass(frozen=True)
class Mask:
    """The geometry of a mask (hashable: kernels close over it). See the module docstring."""

    causal: bool = False
    window: tuple[int | None, int | None] = (None, None)  # (left, right) in positions
    chunk: int | None = None
    q_position: int = 0  # position of query row 0
    k_position: int = 0  # position of key row 0

    def __post_init__(self):
        left, right = self.window
        for name, value in (("window left", left), ("window right", right)):
            if value is not None and (not isinstance(value, (int, np.integer)) or value < 0):
                raise ValueError(f"Mask: expected a {name} edge that is None or an int >= 0, got {value!r}")
        if self.chunk is not None and (not isinstance(self.chunk, (int, np.integer)) or self.chunk <= 0):
            raise ValueError(f"Mask: expected a chunk size that is None or an int > 0, got {self.chunk!r}")

    @staticmethod
    def bottom_right(seq_q: int, seq_k: int, **rules) -> "Mask":
        """flash_attention's alignment: the last query sits at the last key's position."""
        return Mask(q_position=seq_k - seq_q, **rules)

    @property
    def offset(self) -> int:
        """k_position - q_position: d of key row j for query row i is j - i + offset."""
        return self.k_position - self.q_position

    @property
    def band(self) -> tuple[int | None, int | None]:
        """(lo, hi): the keys a query sees lie at d = s - p in [lo, hi] (None: unbounded)."""
        left, right = self.window
        lo = None if left is None else -left
        hi = right
        if self.causal:
            hi = 0 if hi is None else min(hi, 0)
        return lo, hi

    @property
    def is_full(self) -> bool:
        """Every query sees every key (by the geometry; operands may still mask)."""
        return self.band == (None, None) and self.chunk is None

    def shifted(self, rows: int = 0, keys: int = 0) -> "Mask":
        """The mask of a view that starts `rows` queries and `keys` keys into this one."""
        return dataclasses.replace(self, q_position=self.q_position + rows, k_position=self.k_position + keys)

    # ----------------------------------------------------------------------------------------------
    # Ranges: what loop and grid bounds, DMA clamps and the planner read. Arguments may be Python ints
    # or traced int32 scalars; the results are of the same kind.

    def _chunk_of(self, position):
        """position // chunk, floored, for positions that may be negative (bottom-right alignment
        puts the first queries below 0 when Nq > Nk)."""
        c = self.chunk
        if _is_static(position):
            return position // c
        bias = -(-max(0, -min(self.q_position, self.k_position)) // c) + 1  # keeps the dividend >= 0
        return divide(position + bias * c, c) - bias

    def key_range(self, first_row, last_row, seq_k: int):
        """(first, last): the key rows any of query rows first_row..last_row may see, clipped to
        [0, seq_k); empty when first > last."""
        lo, hi = self.band
        first, last = 0, seq_k - 1
        if lo is not None:
            first = _max(first, first_row - self.offset + lo)
        if hi is not None:
            last = _min(last, last_row - self.offset + hi)
        if self.chunk is not None:
            first = _max(first, self._chunk_of(self.q_position + first_row) * self.chunk - self.k_position)
            last = _min(last, (self._chunk_of(self.q_position + last_row) + 1) * self.chunk - 1 - self.k_position)
        return first, last

    def query_range(self, first_key, last_key, seq_q: int):
        """(first, last): the query rows that may see any of key rows first_key..last_key, clipped to
        [0, seq_q); empty when first > last."""
        lo, hi = self.band
        first, last = 0, seq_q - 1
        if hi is not None:
            first = _max(first, first_key + self.offset - hi)
        if lo is not None:
            last = _min(last, last_key + self.offset - lo)
        if self.chunk is not None:
            first = _max(first, self._chunk_of(self.k_position + first_key) * self.chunk - self.q_position)
            last = _min(last, (self._chunk_of(self.k_position + last_key) + 1) * self.chunk - 1 - self.q_position)
        return first, last

    # ----------------------------------------------------------------------------------------------
    # Tiles

    def band_kind(self, delta: int, rows: int, keys: int) -> str:
        """SKIP, FULL or PARTIAL for a rows x keys tile at delta (module docstring), by the band alone."""
        lo, hi = self.band
        d_first, d_last = delta - (rows - 1), delta + keys - 1
        if (lo is not None and d_last < lo) or (hi is not None and d_first > hi):
            return SKIP
        if (lo is None or d_first >= lo) and (hi is None or d_last <= hi):
            return FULL
        return PARTIAL

    def tile_kind(self, row_start: int, rows: int, key_start: int, keys: int) -> str:
        """SKIP, FULL or PARTIAL for the tile of query rows [row_start, +rows) and key rows
        [key_start, +keys), static, by every rule of the geometry."""
        kind = self.band_kind(key_start - row_start + self.offset, rows, keys)
        if self.chunk is None or kind == SKIP:
            return kind
        q_chunks = (self._chunk_of(self.q_position + row_start), self._chunk_of(self.q_position + row_start + rows - 1))
        k_chunks = (self._chunk_of(self.k_position + key_start), self._chunk_of(self.k_position + key_start + keys - 1))
        if q_chunks[1] < k_chunks[0] or k_chunks[1] < q_chunks[0]:
            return SKIP
        if q_chunks[0] == q_chunks[1] == k_chunks[0] == k_chunks[1]:
            return kind
        return PARTIAL

    def tile_flags(self, row_start, rows: int, key_start, keys: int):
        """(any_visible, needs_mask) for the tile of query rows [row_start, +rows) and key rows
        [key_start, +keys), whose starts may be traced: whether the geometry lets any score of it
        through, and whether it masks any. Python bools where the answer is static."""
        delta = key_start - row_start + self.offset
        lo, hi = self.band
        any_visible, full = True, True
        if lo is not None:
            any_visible = both(any_visible, delta + keys - 1 >= lo)
            full = both(full, delta - (rows - 1) >= lo)
        if hi is not None:
            any_visible = both(any_visible, delta - (rows - 1) <= hi)
            full = both(full, delta + keys - 1 <= hi)
        if self.chunk is not None:
            q_first, q_last = (self._chunk_of(self.q_position + r) for r in (row_start, row_start + rows - 1))
            k_first, k_last = (self._chunk_of(self.k_position + k) for k in (key_start, key_start + keys - 1))
            any_visible = both(any_visible, both(q_first <= k_last, k_first <= q_last))
            full = both(full, both(both(q_first == q_last, k_first == k_last), q_first == k_first))
        return any_visible, negate(full)

    def chunks_align(self, block_q: int, block_k: int) -> bool:
        """Whether no query block or key block straddles a chunk boundary: then a visited tile is
        inside one chunk, and the chunk rule only bounds which tiles are visited."""
        if self.chunk is None:
            return True
        return (self.chunk % block_q == 0 and self.chunk % block_k == 0 and self.q_position % block_q == 0
                and self.k_position % block_k == 0)

    def chunks_in_tiles(self, block_q: int, block_k: int, sub_rows: int) -> bool:
        """Whether the blocks hold whole chunks and straddle none (the blocks and both views' first
        positions multiples of the chunk, the chunk of whole row sub-blocks and 128-lane columns) where
        the chunks do not align (chunks_align): then the chunks a tile's sub-blocks fall in follow from
        the tile's delta alone, and its patterns are static (band_patterns, chunk_columns)."""
        c = self.chunk
        return (c is not None and not self.chunks_align(block_q, block_k) and block_q % c == 0
                and block_k % c == 0 and self.q_position % c == 0 and self.k_position % c == 0
                and c % sub_rows == 0 and c % 128 == 0)

    def static_tiles(self, block_q: int, block_k: int, sub_rows: int) -> bool:
        """Whether every tile of these blocks takes static patterns: the chunks (if any) align to the
        blocks or the blocks hold whole chunks; otherwise tiles across chunks are masked at run time."""
        return self.chunks_align(block_q, block_k) or self.chunks_in_tiles(block_q, block_k, sub_rows)

    def chunk_columns(self, delta: int, row_from: int, keys: int) -> tuple[int, int]:
        """(col_from, col_to): the key columns of a tile at delta, in blocks holding whole chunks
        (chunks_in_tiles), of the chunk of its rows from row_from; (0, 0) when the tile holds none.
        Key column k and row r share a chunk iff k // c == r // c - delta / c (delta a multiple of c).
        Transposed (keys on rows, as the dK/dV kernel's): chunk_columns(-delta, key_from, queries)."""
        c = self.chunk
        col_from = (row_from // c - delta // c) * c
        col_from, col_to = max(0, col_from), min(keys, col_from + c)
        return (col_from, col_to) if col_from < col_to else (0, 0)

    def band_patterns(self, block_q: int, block_k: int, sub_rows: int, seq_q: int, seq_k: int,
                      chunked: bool | None = None):
        """The static tile patterns of the band: ([(delta, kinds)], full_range). For every delta a
        (block_q x block_k) tile of the view's blocks (seq_q x seq_k rows, the last blocks may be
        partial) has, at which the band's edges cross the tile, kinds[c] is
        the kind of sub-block c (rows c * sub_rows .. +sub_rows); full_range = (first, last) is the
        interval of deltas whose tiles are entirely visible (None when there is none), one region.
        chunked (default: chunks_in_tiles with these sub-blocks): blocks holding whole chunks, whose
        every tile is a pattern (its sub-blocks narrowed to their chunk where the chunk is made of them)."""
        # Only the deltas of the view's tiles: a grid of one query block (a tail of rows) against long
        # key blocks meets one, where the lattice of step gcd(block_q, block_k) over the view's extent
        # would unroll a pattern per 128 keys.
        starts = np.arange(-(-seq_k // block_k)) * block_k
        rows = np.arange(-(-seq_q // block_q)) * block_q
        deltas = np.unique(starts[None, :] - rows[:, None]) + self.offset
        if chunked is None:
            chunked = self.chunks_in_tiles(block_q, block_k, sub_rows)
        patterns, full = [], None
        for d in (int(x) for x in deltas):
            kind = self.band_kind(d, block_q, block_k)
            if kind == SKIP:
                continue
            if kind == FULL and not chunked:
                full = (d, d) if full is None else (full[0], d)
                continue
            kinds = [self.band_kind(d - c * sub_rows, sub_rows, block_k) for c in range(block_q // sub_rows)]
            if chunked and self.chunk % sub_rows == 0:  # its sub-blocks see their chunk's columns only
                kinds = [SKIP if k == SKIP or self.chunk_columns(d, c * sub_rows, block_k) == (0, 0) else PARTIAL
                         for c, k in enumerate(kinds)]
                if all(k == SKIP for k in kinds):
                    continue
            patterns.append((d, kinds))
        return patterns, full

    def band_columns(self, delta: int, rows: int, keys: int, lanes: int = 128) -> tuple[int, int]:
        """(col_from, col_to): the key columns of a rows x keys tile at delta that any of its rows may
        see by the band, rounded out to whole `lanes` (the MXU's width); (0, 0) when none."""
        lo, hi = self.band  # column j sees row r iff lo <= delta + j - r <= hi
        col_from = 0 if lo is None else max(0, lo - delta)
        col_to = keys if hi is None else min(keys, rows - 1 - delta + hi + 1)
        if col_from >= col_to:
            return 0, 0
        return col_from // lanes * lanes, min(keys, -(-col_to // lanes) * lanes)

    # ----------------------------------------------------------------------------------------------
    # Scores: the one place they are masked (and soft-capped)

    def visible(self, rows, cols):
        """Boolean (rows x cols) of what the geometry lets through, from broadcastable int32 arrays
        of view-local query and key rows; None when it lets everything through."""
        lo, hi = self.band
        d = cols - rows + self.offset if (lo, hi) != (None, None) else None
        terms = []
        if lo is not None:
            terms.append(d >= lo)
        if hi is not None:
            terms.append(d <= hi)
        if self.chunk is not None:
            terms.append(self._chunk_of(self.q_position + rows) == self._chunk_of(self.k_position + cols))
        return and_masks(*terms)

    def dense(self, seq_q: int, seq_k: int) -> np.ndarray:
        """[seq_q, seq_k] bool: the references' and the tests' form."""
        rows = np.arange(seq_q)[:, None]
        cols = np.arange(seq_k)[None, :]
        p, s = self.q_position + rows, self.k_position + cols
        lo, hi = self.band
        mask = np.ones((seq_q, seq_k), bool)
        if lo is not None:
            mask &= s - p >= lo
        if hi is not None:
            mask &= s - p <= hi
        if self.chunk is not None:
            mask &= (s // self.chunk) == (p // self.chunk)
        return mask


def soft_cap(scores, cap: float | None):
    """cap * tanh(scores / cap) (Gemma 2's logit soft-capping), on scaled scores; identity for None."""
    if cap is None:
        return scores
    return cap * jnp.tanh(scores / cap)


def soft_cap_grad(capped, cap: float | None):
    """d(capped)/d(scores) from the capped scores: 1 - tanh^2 = 1 - (capped / cap)^2."""
    t = capped / cap
    return 1.0 - t * t
