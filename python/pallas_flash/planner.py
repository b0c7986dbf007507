"""Block sizes for the TPU v5e, chosen from its VMEM budget and the problem's shape.

A v5e TensorCore has 128 MiB of VMEM and four 128x128 MXUs. Every block is a multiple of 128 rows
(Q and K/V blocks feed the MXU), which also satisfies Mosaic's (8, 128) tiling; a block's head_dim
is the array's (VMEM pads it to 128 lanes, which the formulas below count). The planner keeps the query block as
large as the budget allows (each K/V block read from HBM is then reused by more query rows: the
arithmetic intensity of the forward pass is ~block_q FLOPs per K/V byte) and streams K/V in blocks
of 512 rows.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from pallas_flash.mask import Mask

LANES = 128  # MXU width and the lane count of a vreg: the alignment unit along every MXU dimension


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Rows per block. block_q/block_k: forward (block_q_compute: the rows of one pass of the online
    softmax inside a query block, so that its scores stay in the vector registers; the backward's
    key sub-blocks on diagonal tiles too); *_dkv: the backward kernel (dK, dV and, fused, dQ); *_dq:
    the separate dQ kernel. block_k_compute: the most keys one online-softmax update of a sub-block
    takes (forward and dQ kernels), so that a key block may be longer than the vector registers hold
    and a grid step does more work per fixed cost. fuse_dq: True computes dQ in the dK/dV kernel,
    False in a kernel of its own, None (default) fuses when the dQ accumulators fit VMEM
    (fused_backward_vmem_bytes)."""

    block_q: int
    block_k: int
    block_q_dkv: int
    block_k_dkv: int
    block_q_dq: int
    block_k_dq: int
    block_q_compute: int = 256
    fuse_dq: bool | None = None
    block_k_compute: int = 512

    def __post_init__(self):
        if self.fuse_dq is not None and not isinstance(self.fuse_dq, bool):
            raise ValueError(f"BlockSizes.fuse_dq: expected True, False or None, got {self.fuse_dq!r}")
        for field in dataclasses.fields(self):
            if field.name == "fuse_dq":
                continue
            value = getattr(self, field.name)
            if not isinstance(value, int) or value <= 0 or value % LANES:
                raise ValueError(f"BlockSizes.{field.name}: expected a positive multiple of {LANES}, got {value!r}")
        if self.block_q % self.block_q_compute and self.block_q_compute < self.block_q:
            raise ValueError(f"BlockSizes.block_q_compute: expected a divisor of block_q={self.block_q}, "
                             f"got {self.block_q_compute}")


@functools.cache
def v5e_vmem_bytes() -> int:
    """VMEM capacity of one v5e TensorCore, from JAX's chip table (no TPU needed)."""
    return pltpu.get_tpu_info_for_chip(pltpu.ChipVersion.TPU_V5E, 1).vmem_capacity_bytes


def vmem_budget_bytes() -> int:
    # Half of VMEM: the rest is left to Mosaic's internal scratch and to the compiler's temporaries
    # beyond the ones counted below.
    return v5e_vmem_bytes() // 2


# Compiler temporaries and internal scratch beyond the terms below, calibrated against what the v5e
# compiler gives the kernels (tests/test_v5e_compile.py checks the bound on every compiled shape):
# the formulas come out 1.0-1.6x what it reports.
COMPILER_HEADROOM = 1.15
HEADS_FOR_STATS = 16  # the LSE and D_i blocks hold every head's row of a query block


def forward_vmem_bytes(block_q: int, block_k: int, head_dim: int, itemsize: int, block_q_compute: int = 256,
                       heads: int = HEADS_FOR_STATS, block_k_compute: int = 512) -> int:
    """VMEM the forward kernel holds at once: double-buffered Q, O, K, V blocks and the [heads,
    block_q] LSE block, the fp32 accumulator and replicated running max/sum, per update (a sub-block
    against at most block_k_compute keys) the fp32 scores and probabilities and the operands in fp32,
    and at the last key block the whole block's O in fp32 and its replicated LSE (before and after
    the transpose to a row)."""
    d = round_up(head_dim, LANES)
    rows = min(block_q_compute, block_q)
    keys = min(block_k_compute, block_k)
    pipelined = 2 * (2 * block_q * d + 2 * block_k * d) * itemsize + 2 * heads * block_q * 4
    scratch = block_q * d * 4 + 2 * block_q * LANES * 4
    temporaries = (4 * rows * keys + 2 * keys * d + 2 * rows * d + block_q * (d + 2 * LANES)) * 4
    return int(COMPILER_HEADROOM * (pipelined + scratch + temporaries))


def backward_vmem_bytes(block_q: int, block_k: int, head_dim: int, itemsize: int,
                        heads: int = HEADS_FOR_STATS) -> int:
    """The dK/dV kernel's (the larger of the two backward kernels): Q and dO streamed, K and V
    resident, dK and dV out, all double-buffered, the LSE and D_i blocks, the fp32 dK and dV
    accumulators, and the (block_k, block_q) fp32 score, probability and dS tiles."""
    d = round_up(head_dim, LANES)
    pipelined = 2 * (2 * block_q * d + 4 * block_k * d) * itemsize + 2 * 2 * heads * block_q * 4
    scratch = 2 * block_k * d * 4
    temporaries = (2 * block_q * block_k + 2 * block_k * d) * 4
    return int(COMPILER_HEADROOM * (pipelined + scratch + temporaries))


def fused_backward_vmem_bytes(block_q: int, block_k: int, head_dim: int, itemsize: int, seq_q: int, group: int,
                              heads: int = HEADS_FOR_STATS) -> int:
    """The backward kernel with dQ fused in: backward_vmem_bytes, plus K^T, the fp32 dQ^T of every
    query block of a GQA group (resident across the key blocks: group x Nq x D x 4 bytes, 16 MiB for
    one head of 32768 x 128), one block's dQ on its way out and the (D, block_q) fp32 product."""
    d = round_up(head_dim, LANES)
    accumulators = group * round_up(seq_q, block_q) * round_up(head_dim, 8) * 4
    extra = head_dim * block_k * itemsize + block_q * d * itemsize + head_dim * block_q * 4
    fused = int(COMPILER_HEADROOM * (accumulators + extra))
    return backward_vmem_bytes(block_q, block_k, head_dim, itemsize, heads) + fused


def fuses_dq(blocks: BlockSizes, seq_q: int, group: int, head_dim: int, itemsize: int) -> bool:
    """Whether the backward computes dQ in the dK/dV kernel: blocks.fuse_dq, or when unset, whether
    that kernel's dQ accumulators fit the budget (up to Nq ~ 90k at D = 128 for one head per KV head)."""
    if blocks.fuse_dq is not None:
        return blocks.fuse_dq
    return fused_backward_vmem_bytes(blocks.block_q_dkv, blocks.block_k_dkv, head_dim, itemsize, seq_q,
                                     group) <= vmem_budget_bytes()


def _largest_within(candidates, extent: int) -> int:
    """The largest candidate no longer than the (128-aligned) extent: a length that is not a multiple
    of it ends in a partial block whose missing rows the kernels skip (in sub-blocks of rows and
    128-lane columns), so the block needs not divide the length."""
    return next((c for c in candidates if c <= extent), candidates[-1])


UNBOUNDED = 4096  # the largest block any candidate list holds


def _chunk_block(mask: Mask | None) -> int | None:
    """The largest block (a power of two, 128..4096) that holds the rows of one chunk only, on both
    axes (the chunk and the view's first positions its multiples), where blocks should stay within
    it; None: no bound. A tile inside one chunk takes the static band patterns
    (tiles.visit_row_sub_blocks; the backward's key sub-blocks), while a tile across a chunk boundary
    is masked per 256-row sub-block under a run-time condition (forward; each drains the MXU
    pipeline) or whole (backward). v5e compiler estimate, one head, N = 16384 causal, forward at the
    2048 x 2048 blocks of a bounded span against blocks of the chunk: chunks of 512 201 833 cycles
    against 68 036 (training step 441 695 against 198 323), of 256 201 825 against 80 601, of 128
    201 858 against 136 478. Taken where that block is the chunk or at least 512 rows: a smaller
    block than the chunk pays a grid step (~900 cycles) per 128 or 256 keys of it (chunks of 384 in
    128-row blocks: 3 steps a query block; not profiled, the simulator cannot run a division by 384)."""
    if mask is None or mask.chunk is None:
        return None
    block = next((b for b in (4096, 2048, 1024, 512, 256, 128)
                  if mask.chunk % b == 0 and mask.q_position % b == 0 and mask.k_position % b == 0), None)
    return block if block is not None and (block >= 512 or block == mask.chunk) else None


def _within(candidates, bound: int) -> list[int]:
    return [c for c in candidates if c <= bound]


def _static_or_within_chunk(blocks_within, mask: Mask | None, sub_rows) -> tuple[int, int]:
    """blocks_within(bound) -> (block_q, block_k) unbounded, where every tile of them takes static
    patterns (Mask.static_tiles with the kernel's sub-blocks, sub_rows(block_q, block_k)); else
    bounded to one chunk (_chunk_block), where a block of the chunk's length or of 512 rows can."""
    blocks = blocks_within(UNBOUNDED)
    if mask is None or mask.static_tiles(*blocks, sub_rows(*blocks)):
        return blocks
    return blocks_within(_chunk_block(mask) or UNBOUNDED)


def plan_block_sizes(seq_q: int, seq_k: int, head_dim: int, dtype=jnp.bfloat16, causal: bool = False,
                     mask: Mask | None = None, segments: bool = False) -> BlockSizes:
    """Blocks chosen from the v5e compiler's estimates (pallas-flash-bench, B=1, D=128, bf16; mask: the
    geometry, whose causal rule overrides `causal`):
    - forward: the largest query block (4096 down to 128 rows) that fits the budget and the length
      (any length: the last block may be partial, tiles.edge_visits; one of at most 128 rows is the
      forward's tail call, flash_forward.tail_blocks), swept in sub-blocks of 256 rows
      against at most 512 keys per online-softmax update, and K/V blocks of 1024 rows: a grid step
      has a fixed cost (~900 cycles: the DMA bookkeeping and the MXU pipeline drained at the end of
      its straight-line region), which a longer key block spreads over more updates (N=16384 causal
      at 2048 x 512: 80% of peak, 2048 x 1024: 84%, full mask 4096 x 512 90%, x 1024 92%). A window
      or chunks (a bounded span of keys per row, whose edge tiles hold little work): 2048-row K/V
      blocks (causal window 4096: 69% at 2048 x 512, 73% x 1024, 76% x 2048; 2048 x 2048 compiles
      ~1.5x longer than x 1024, which is why the unbounded masks stay at 1024). Causal, at most
      2048 query rows: a 4096-row block unrolls 9 diagonal patterns of 16 sub-blocks, 3x the compile
      time (~25 s on 2 cores) for 3%;
    - with a bounded span or segment ids (packed documents: segments=True; each row's keys end at
      its document's, whose diagonal tiles are a causal mask's), 2048-row K/V blocks updated 256 keys
      at a time: a band edge's sub-blocks then update in equal 256-key chunks (at 512, every other
      sub-block ends in a chunk of 256 next to full ones). Causal window 4096 at N = 32768, 2048 x
      2048, forward: 636 524 cycles a head at 512 keys an update, 600 748 at 256 (-5.6%); 8 documents
      of 4096: 366 297 at 2048 x 1024 and 512, 342 187 at 2048 x 2048 and 256 (-6.6%; 328 003 at
      4096-row query blocks, which compile twice as long). The unbounded masks keep 512: causal
      N = 32768 at 2048 x 1024 is 2% slower at 256 (the full mask would gain 0.7%, not taken);
    - chunks: the blocks as planned where they hold whole chunks (chunks of 256 to 2048 in 2048-row
      forward blocks, to 1024 in the backward's: static patterns per chunk, Mask.chunks_in_tiles) or
      lie inside one, else at most the largest block that holds one chunk's rows only
      (_chunk_block), where that is the chunk or at least 512 rows.
      Forward, one head, N = 16384 causal: chunks of 512 201 833 cycles in 2048 x 2048 blocks before
      the patterns per chunk (a tile across chunks masked per sub-block at run time), 68 036 in blocks
      of 512, 48 445 in 2048 x 2048 with them; chunks of 256 201 825, 80 601, 40 021; chunks of 1024
      70 945 in blocks of 1024, 65 269 in 2048 x 2048. The backward (training step's), chunks of
      512: 241 127 across chunks in 1024 blocks, 131 176 in blocks of 512, 112 595 in 1024 blocks
      with the patterns per chunk; chunks of 256: 241 127, 160 126 in 256 blocks, 96 435. Long chunks
      (Llama 4's 8192) keep 2048-row blocks: 4096-row query blocks are 5% faster and compile 3x
      longer (forward, one head, N = 16384: 320 237 cycles at 2048 x 2048, 304 143 at 4096 x 2048,
      302 545 at 4096 x 4096; H = 16 at N = 32768 compiles in 18, 53 and 90 s);
    - backward: square blocks of up to 1024 (with dQ fused, 90% of its MXU bound at N = 4096; 512-row
      query or key blocks cost +4%, 2048 x 1024 +3%, 1024 x 2048 -2% but more diagonal work when causal),
      bounded spans included: causal window 4096 (N = 8192, training step's backward) 317 555 cycles at
      1024 x 1024, 334 774 at 2048 x 1024; documents of 4096 (as chunks, N = 16384) 437 457 against
      424 233 (-3.0%) at 2048 x 1024 and 424 887 at 1024 x 2048, but the ids are known at run time only,
      and documents shorter than a block compute their tiles whole: 3x the backward's pairs of 1024 x 1024
      blocks for documents of at most 1024 tokens (a tile's rows past the diagonal are other documents')."""
    if mask is not None:
        causal = mask.causal
    bounded_span = segments or (mask is not None and (mask.band[0] is not None or mask.chunk is not None))
    itemsize = jnp.dtype(dtype).itemsize
    budget = vmem_budget_bytes()
    nq = round_up(seq_q, LANES)
    nk = round_up(seq_k, LANES)

    def forward_blocks(bound: int):
        block_k = _largest_within(_within((2048, 1024, 512, 256, 128) if bounded_span else (1024, 512, 256, 128),
                                          bound), nk)
        candidates = _within((2048, 1024, 512, 256, 128) if causal else (4096, 2048, 1024, 512, 256, 128), bound)
        fitting = [c for c in candidates if forward_vmem_bytes(c, block_k, head_dim, itemsize) <= budget]
        return _largest_within(fitting or [LANES], nq), block_k

    def backward_blocks(bound: int):
        fitting = _within([c for c in (1024, 512, 256, 128) if backward_vmem_bytes(c, c, head_dim, itemsize) <= budget],
                          bound)
        return _largest_within(fitting or [LANES], nq), _largest_within(fitting or [LANES], nk)

    block_q, block_k = _static_or_within_chunk(forward_blocks, mask, sub_rows=lambda block_q, block_k: 256)
    block_bwd_q, block_bwd_k = _static_or_within_chunk(backward_blocks, mask,
                                                       sub_rows=lambda block_q, block_k: min(256, block_k))
    return BlockSizes(block_q, block_k, block_bwd_q, block_bwd_k, block_bwd_q, block_bwd_k, block_q_compute=256,
                      block_k_compute=256 if bounded_span else 512)


def describe_plan(batch: int, heads: int, seq_len: int, head_dim: int, dtype=jnp.bfloat16, kv_heads: int | None = None,
                  causal: bool = False, window: int | tuple[int | None, int | None] | None = None,
                  chunk: int | None = None, segments: bool = False) -> str:
    """One line: the plan for a [batch, heads, seq_len, head_dim] self-attention (kv_heads: GQA; causal,
    window and chunk as flash_attention takes them; segments: with segment ids) and its VMEM use; the
    forward grid's key axis has the steps of the widest range of key blocks a query block sees by
    the geometry (with segment ids at most that many: the ids' widest range sets it at run time)."""
    edges = (None, None) if window is None else ((window, window) if isinstance(window, int) else tuple(window))
    mask = Mask.bottom_right(seq_len, seq_len, causal=causal, window=edges, chunk=chunk)
    blocks = plan_block_sizes(seq_len, seq_len, head_dim, dtype, mask=mask, segments=segments)
    itemsize = jnp.dtype(dtype).itemsize
    group = heads // (kv_heads or heads)
    fwd = forward_vmem_bytes(blocks.block_q, blocks.block_k, head_dim, itemsize, blocks.block_q_compute,
                             block_k_compute=blocks.block_k_compute)
    fused = fuses_dq(blocks, seq_len, group, head_dim, itemsize)
    if fused:
        bwd = fused_backward_vmem_bytes(blocks.block_q_dkv, blocks.block_k_dkv, head_dim, itemsize, seq_len, group)
    else:
        bwd = backward_vmem_bytes(blocks.block_q_dkv, blocks.block_k_dkv, head_dim, itemsize)
    # The kernels' own grids (tiles.static_steps); they import this module.
    from pallas_flash.flash_forward import has_tail, tail_blocks
    from pallas_flash.tiles import Grid, Problem, static_steps

    def grid_of(rows: int, first_row: int, block_q: int, block_k: int) -> tuple[int, int]:
        """(query blocks, key steps) of the forward's grid over `rows` query rows from first_row."""
        problem = Problem(rows, seq_len, 1.0, mask.shifted(rows=first_row), group, interpret=False)
        grid = Grid.of(block_q, block_k, rows, seq_len)
        return grid.num_q_blocks, static_steps(problem, grid, per_q_block=True)[0]

    tail = has_tail(seq_len, blocks)
    body = seq_len - seq_len % blocks.block_q if tail else seq_len
    q_blocks, key_steps = grid_of(body, 0, blocks.block_q, blocks.block_k)
    tail_grid = ""
    if tail:
        tail_sizes = tail_blocks(seq_len, blocks, head_dim, itemsize)
        _, tail_steps = grid_of(seq_len - body, body, tail_sizes.block_q, tail_sizes.block_k)
        tail_grid = f" + tail {batch}x1x{heads}x{tail_steps} ({tail_sizes.block_k}-row K/V)"
    rules = [" causal" if causal else "", f" window={edges}" if window is not None else "",
             f" chunk={chunk}" if chunk is not None else "", " segment ids" if segments else ""]
    mib = 1 << 20
    return (
        f"B={batch} H={heads} N={seq_len} D={head_dim} {jnp.dtype(dtype).name}{''.join(rules)}: "
        f"fwd block_q={blocks.block_q} block_k={blocks.block_k} ({blocks.block_k_compute} keys an update) "
        f"VMEM {fwd / mib:.1f} MiB; "
        f"bwd block_q={blocks.block_q_dkv} block_k={blocks.block_k_dkv} "
        f"{'dQ fused' if fused else 'dQ in its own kernel'} VMEM {bwd / mib:.1f} MiB; "
        f"budget {vmem_budget_bytes() / mib:.0f} of {v5e_vmem_bytes() / mib:.0f} MiB (v5e); "
        f"grid fwd {batch}x{q_blocks}x{heads}x{key_steps}{' at most' if segments else ''}{tail_grid}"
    )
