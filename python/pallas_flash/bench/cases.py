"""What the benchmark runs: one `Case` per row (implementation, pass, shape), and how each is built
as a jitted function with its arguments, abstract (for the v5e compiler) or real (to measure).

Implementations:
- pallas_flash: this package's kernels (flash_attention, flash_decode, sharded_flash_decode).
- jax_flash_attention: jax.experimental.pallas.ops.tpu.flash_attention, at given block sizes
  (the report sweeps them and keeps the best for the shape). MHA only: K and V are repeated for GQA.
- jax_splash: JAX's splash attention (its CausalMask, FullMask, LocalMask, ChunkedCausalMask, segment
  ids, logit soft cap), vmapped over the batch; profiled running every block (`Case.every_block`).
- tokamax: Google's tokamax (pinned; pallas_flash.bench.tokamax_adapter), its TPU attention (splash) through
  its own op, at its configuration `tokamax_adapter.BLOCKS`: causal or full, soft cap; profiled running
  every block too.

A case's mask: `causal`, plus `mask`, the rules of --mask beyond it ("window:4096", "chunk:8192",
"segments:8", "softcap:50", joined by "+"); FLOPs count the (query, key) pairs it lets through.
- xla_reference: plain XLA attention (pallas_flash.reference.naive_attention): the scores materialised.
- jax_paged_attention (decode): JAX's paged_attention kernel over the same cache in 128-row pages.
- jax_cudnn, jax_xla (GPU): jax.nn.dot_product_attention with implementation="cudnn" / "xla".
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import pallas_flash as pf
from pallas_flash.bench import tokamax_adapter
from pallas_flash.planner import fuses_dq
from pallas_flash.reference import naive_attention

ATTENTION_IMPLS = ("pallas_flash", "jax_flash_attention", "jax_splash", "tokamax", "xla_reference")
# Profiled with every block of their grid run (`Case.every_block`): their schedule is in scalar prefetch.
EVERY_BLOCK_IMPLS = ("jax_splash", "tokamax")
DECODE_IMPLS = ("pallas_flash", "jax_paged_attention", "xla_reference")
GPU_IMPLS = ("jax_cudnn", "jax_xla")
PASSES = ("fwd", "bwd", "fwd+bwd", "decode")
DTYPES = {"bf16": jnp.bfloat16, "fp32": jnp.float32}
JAX_PAGED_KEYS_PER_BLOCK = 2048  # jax_paged_attention's compute block: 16 pages of 128
# The compiler's static profile runs a kernel's own DMAs from offsets past ~2 GiB into an array
# tens of times slower than the same bundles below (a minimal manual-DMA kernel streaming one bf16
# [B, 8, 65536, 128] array: 2.34M cycles at B = 17, 2.125 GiB; 36.7M at 18, 2.25 GiB; 200M at 24;
# the bundles identical but for loop bounds. XLA fusions and BlockSpec pipelines reading the same
# arrays scale linearly, so this is the simulator's, not the kernel's). A decode whose cache
# arrays are larger on a chip is profiled for a part of its batch (`Case.for_profile`).
SIMULATED_ARRAY_BYTES = 2**31

# JAX flash_attention's forward candidates (block_q, block_k_major, block_k) and backward block sizes.
JAX_FORWARD_BLOCKS = tuple((bq, bkm, 512) for bq in (512, 1024, 2048) for bkm in (512, 1024, 2048))
JAX_BACKWARD_BLOCKS = (512, 1024)


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark row. Decode: seq_q is the new tokens per sequence, seq_k the context."""

    impl: str
    pass_: str
    batch: int
    heads: int
    kv_heads: int
    seq_q: int
    seq_k: int
    dim: int
    dtype: str
    causal: bool
    mesh: str = "1x1"
    page_size: int = 0  # decode: 0 a contiguous cache, else page pools and a page table
    heads_per_row: int = 1  # decode (pallas_flash): KV heads packed per cache row (flash_decode's packed layout)
    # Block sizes, fixed (None: the implementation's own choice). pallas_flash: BlockSizes' fields;
    # jax_flash_attention: (block_q, block_k_major, block_k, backward block).
    blocks: tuple[int, ...] | None = None
    trace_time_lengths: bool = False  # decode: every sequence fills the cache, known at trace time
    mask: str = ""  # rules beyond `causal`: "window:W", "chunk:C", "segments:S", "softcap:X", joined by "+"
    # Attention over the mesh: context_parallel_attention's strategy ("all_gather", "ring"), the sequence
    # split over every chip of `mesh`; "" runs on one chip.
    context_parallel: str = ""
    # jax_splash, tokamax: their mask info dropped, so that every block of the grid runs (and is masked):
    # what the static profile can simulate, which reads the mask info (scalar prefetch) as 0.
    every_block: bool = False

    def rules(self) -> MaskRules:
        return MaskRules.parse(self.mask)

    @property
    def mask_name(self) -> str:
        return " ".join(["causal" if self.causal else "full"] + ([self.mask] if self.mask else []))

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def devices(self) -> int:
        rows, cols = (int(x) for x in self.mesh.split("x"))
        return rows * cols

    def for_profile(self) -> Case:
        """What the static profile simulates. Attention: the same kernel for one KV head's group of
        one sequence: the estimate scales linearly in batch and KV heads (independent grid rows), and
        simulating every grid step of the full shape would take minutes. Decode (cheap to simulate):
        the whole shape, with its lengths as trace-time constants (the simulator reads
        scalar-prefetch values as 0); a decode step's fixed costs (the merge, head transitions) do
        not scale with heads, so a scaled profile would overstate them. A batch whose caches pass
        SIMULATED_ARRAY_BYTES is profiled in equal parts (`profile_scale` of them). Splash and tokamax:
        with every block of their grid run (`every_block`), the schedule the simulator cannot read."""
        if self.pass_ == "decode":
            return dataclasses.replace(self, batch=self.batch // self._decode_batch_parts(), trace_time_lengths=True)
        kv_heads = self._profile_kv_heads()
        return dataclasses.replace(self, batch=1, kv_heads=kv_heads, heads=self.group * kv_heads,
                                   every_block=self.impl in EVERY_BLOCK_IMPLS)

    @property
    def profile_scale(self) -> int:
        if self.pass_ == "decode":
            return self._decode_batch_parts()
        return self.batch * self.kv_heads // self._profile_kv_heads()

    def _profile_kv_heads(self) -> int:
        """KV heads of an attention profile: one, but for tokamax, which runs other kernels (its MQA
        kernels) for one KV head than for several, two (or all of an odd number). Its backward alone
        (a training step's backward part) for one: its MQA backward kernel takes 2% more cycles a head
        than its MHA one at N = 4096, whose profiles there outgrow a 23 GB machine."""
        if self.impl != "tokamax" or self.kv_heads == 1 or self.pass_ == "bwd":
            return 1
        return 2 if self.kv_heads % 2 == 0 else self.kv_heads

    def cache_bytes_per_device(self) -> int:
        """Decode: the bytes of the K cache (or page pool) one chip holds; V's are the same."""
        return self.batch * self.kv_heads * self.seq_k * self.dim * jnp.dtype(DTYPES[self.dtype]).itemsize // self.devices

    def cache_bytes_read_per_device(self) -> int:
        """Decode: the bytes of K one chip reads, the positions within the window where there is one
        (V's are the same)."""
        return self.cache_bytes_per_device() * self.positions_read() // self.seq_k

    def positions_read(self) -> int:
        """Decode: the cached positions a token reads, those within the window where there is one."""
        window = self.rules().window
        return self.seq_k if window is None else min(self.seq_k, window + 1)

    def _decode_batch_parts(self) -> int:
        """In how many equal parts of the batch a decode is profiled: the fewest (a divisor of the
        batch) whose cache arrays stay within SIMULATED_ARRAY_BYTES on a chip. The batch's grid rows are
        independent and alike (every sequence fills the cache), so cycles scale by the parts."""
        return next((p for p in range(1, self.batch + 1) if self.batch % p == 0
                     and self.cache_bytes_per_device() / p <= SIMULATED_ARRAY_BYTES), self.batch)

    def flops(self) -> float:
        """Useful FLOPs, FlashAttention's convention: 4 B Hq D per (query, key) pair the mask lets
        through (Nq x Nk without one; about half for causal self-attention) for a forward (QK^T and
        PV); a backward is 2.5 forwards, fwd+bwd 3.5. Decode counts every cached position (within the
        window where there is one)."""
        pairs = self.seq_q * self.positions_read() if self.pass_ == "decode" else self.rules().visible_pairs(
            self.seq_q, self.seq_k, self.causal)
        forward = 4.0 * self.batch * self.heads * self.dim * pairs
        return forward * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5, "decode": 1.0}[self.pass_]

    def tokens(self) -> int:
        """Query tokens one call processes (new tokens for decode)."""
        return self.batch * self.seq_q

    def key(self) -> dict:
        return {
            "impl": self.impl, "pass": self.pass_, "batch": self.batch, "heads": self.heads,
            "kv_heads": self.kv_heads, "seq_q": self.seq_q, "seq_k": self.seq_k, "dim": self.dim,
            "dtype": self.dtype, "causal": self.causal, "mask": self.mask_name,
            "context": self.seq_k if self.pass_ == "decode" else None,
            "mesh": self.mesh if self.pass_ == "decode" or self.context_parallel else None,
            "context_parallel": self.context_parallel or None,
            "page_size": self.page_size if self.pass_ == "decode" else None,
            "heads_per_row": self.heads_per_row if self.heads_per_row != 1 else None,
        }

    def as_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Case:
        data = dict(data)
        if data.get("blocks") is not None:
            data["blocks"] = tuple(data["blocks"])
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class MaskRules:
    """The rules of a --mask item beyond causality."""

    window: int | None = None
    chunk: int | None = None
    segments: int | None = None  # equal packed documents per sequence
    soft_cap: float | None = None

    @staticmethod
    def parse(text: str) -> MaskRules:
        fields = {}
        for item in filter(None, text.split("+")):
            name, _, value = item.partition(":")
            kind = {"window": int, "chunk": int, "segments": int, "softcap": float}.get(name)
            try:
                number = kind(value) if kind else None
            except ValueError:
                number = None
            if number is None or number < 0 or (name != "window" and number <= 0):
                raise ValueError(f"--mask: expected causal, full, or window:W, chunk:C, segments:S, softcap:X "
                                 f"(numbers > 0) joined by '+', got {item!r}")
            fields["soft_cap" if name == "softcap" else name] = number
        return MaskRules(**fields)

    def span(self, seq: int, causal: bool) -> int | None:
        """How far a row's keys reach when that is bounded independently of N (a causal window, chunks,
        documents of seq / segments): the work then grows linearly in the number of such spans."""
        if self.segments is not None:
            return seq // self.segments
        if self.chunk is not None:
            return self.chunk
        return self.window + 1 if self.window is not None and causal else None

    def as_chunks(self, seq: int) -> str:
        """The rules with equal documents written as the chunks of the same geometry (for a fit through
        shorter lengths that keeps each document's length)."""
        parts = [f"chunk:{seq // self.segments}" if self.segments else (f"chunk:{self.chunk}" if self.chunk else "")]
        parts += [f"window:{self.window}" if self.window is not None else "",
                  f"softcap:{self.soft_cap:g}" if self.soft_cap is not None else ""]
        return "+".join(filter(None, parts))

    def geometry(self, seq_q: int, seq_k: int, causal: bool) -> pf.Mask:
        chunk = self.chunk if self.segments is None else seq_q // self.segments
        return pf.Mask.bottom_right(seq_q, seq_k, causal=causal, window=(self.window, None), chunk=chunk)

    def visible_pairs(self, seq_q: int, seq_k: int, causal: bool) -> int:
        """The (query, key) pairs of one head the mask lets through (equal documents: as chunks)."""
        mask = self.geometry(seq_q, seq_k, causal)
        rows = np.arange(seq_q)
        total = 0
        for start in range(0, seq_q, 4096):  # per row, vectorised in slices
            r = rows[start:start + 4096]
            p = mask.q_position + r
            lo, hi = mask.band
            first = np.zeros_like(r) if lo is None else np.maximum(0, p + lo)
            end = np.full_like(r, seq_k) if hi is None else np.minimum(seq_k, p + hi + 1)
            if mask.chunk is not None:
                start_pos = np.floor_divide(p, mask.chunk) * mask.chunk
                first, end = np.maximum(first, start_pos), np.minimum(end, start_pos + mask.chunk)
            total += int(np.maximum(end - first, 0).sum())
        return total


def fixed_blocks(case: Case) -> Case:
    """The case with its implementation's block sizes written out (the planner's for pallas_flash, the
    JAX default for jax_flash_attention), so that a smaller shape can be profiled with the same kernel."""
    if case.blocks or case.pass_ == "decode":
        return case
    if case.impl == "pallas_flash":
        dtype = DTYPES[case.dtype]
        # The plan flash_attention makes for this call: documents are segment ids, not geometry.
        geometry = dataclasses.replace(case.rules(), segments=None).geometry(case.seq_q, case.seq_k, case.causal)
        blocks = pf.plan_block_sizes(case.seq_q, case.seq_k, case.dim, dtype, mask=geometry,
                                     segments=case.rules().segments is not None)
        # The backward's choice at this length, kept at the shorter lengths it is fitted through.
        fuse = fuses_dq(blocks, case.seq_q, case.group, case.dim, jnp.dtype(dtype).itemsize)
        return dataclasses.replace(case, blocks=dataclasses.astuple(dataclasses.replace(blocks, fuse_dq=fuse)))
    if case.impl == "jax_flash_attention":
        return dataclasses.replace(case, blocks=(1024, 1024, 512, 1024))
    if case.impl == "jax_splash":
        return dataclasses.replace(case, blocks=SPLASH_BLOCKS)
    if case.impl == "tokamax":
        return dataclasses.replace(case, blocks=tokamax_adapter.blocks(case.pass_ != "fwd",
                                                                       case.rules().soft_cap is not None))
    return case


def supported(case: Case) -> str | None:
    """Why a case cannot run (None when it can)."""
    if case.pass_ == "decode":
        if case.impl not in DECODE_IMPLS + GPU_IMPLS:
            return f"{case.impl} has no decode"
        if case.impl == "jax_paged_attention" and (case.seq_q != 1 or case.mesh != "1x1" or not case.page_size):
            return "jax_paged_attention: one query token, one device, a paged cache"
        if case.impl == "xla_reference" and (case.mesh != "1x1" or case.page_size):
            return "xla_reference: one device, a contiguous cache"
        if case.page_size and case.seq_k % (case.page_size * case.devices):
            return f"context {case.seq_k}: expected a multiple of the page size x devices"
        if case.heads_per_row != 1 and (case.impl != "pallas_flash" or case.kv_heads % case.heads_per_row):
            return "KV heads packed per row: pallas_flash, a number dividing the KV heads"
        rules = case.rules()
        if not case.causal:
            return "decode: new tokens see the cache before them (causal)"
        if case.mask and (case.impl != "pallas_flash" or rules.chunk is not None or rules.segments is not None):
            return "decode masks: pallas_flash, window and softcap"
        return None
    if case.heads_per_row != 1:
        return "KV heads packed per row: decode only"
    if case.impl == "jax_paged_attention":
        return "jax_paged_attention is decode only"
    if case.context_parallel:
        parts = 2 * case.devices if case.causal else case.devices
        if case.impl != "pallas_flash" or case.pass_ not in ("fwd", "fwd+bwd") or case.mask:
            return "context parallelism: pallas_flash, fwd or fwd+bwd, causal or full"
        if case.devices < 2 or case.seq_q != case.seq_k or case.seq_q % parts:
            return f"context parallelism: a mesh of several chips and N divisible by {parts}"
    rules = case.rules()
    if case.mask and case.impl in ("xla_reference", "jax_flash_attention", *GPU_IMPLS) and (
            rules.window is not None or rules.chunk is not None or rules.soft_cap is not None or
            (rules.segments is not None and case.impl != "jax_flash_attention")):
        return f"{case.impl}: no {case.mask} mask"
    if case.impl in ("jax_flash_attention", "jax_splash", "tokamax") and case.dim % 128 and case.dim != 64:
        return f"{case.impl}: head_dim {case.dim} unsupported"
    if case.impl == "tokamax":
        if rules.window is not None or rules.chunk is not None or rules.segments is not None:
            return (f"tokamax {tokamax_adapter.VERSION} on a TPU: no {case.mask} mask (a window becomes mask bounds, "
                    "which its TPU path rejects; no segment ids; only a dense boolean mask)")
        return tokamax_adapter.available()
    return None


# --------------------------------------------------------------------------------------------------
# Building a case


class Placement:
    """Where arrays live: `abstract` (shapes on the v5e topology, for the compiler) or real arrays on
    this host's devices (to measure)."""

    def __init__(self, abstract: bool, seed: int = 0):
        self.abstract = abstract
        self._key = jax.random.PRNGKey(seed)

    def mesh(self, shape: str) -> jax.sharding.Mesh:
        rows, cols = (int(x) for x in shape.split("x"))
        if self.abstract:
            from pallas_flash import v5e

            devices = np.array(v5e.topology().devices[: rows * cols])
        else:
            devices = np.array(jax.devices()[: rows * cols])
        if devices.size != rows * cols:
            raise ValueError(f"--mesh {shape}: expected {rows * cols} devices, this host has {devices.size}")
        return jax.sharding.Mesh(devices.reshape(rows, cols), ("x", "y"))

    def sharding(self, mesh=None, spec=None):
        if mesh is not None:
            return NamedSharding(mesh, spec)
        if self.abstract:
            from pallas_flash import v5e

            return v5e.chip()
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def array(self, shape, dtype, sharding=None, fill=None):
        sharding = sharding or self.sharding()
        if self.abstract:
            return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)
        if fill is not None:
            value = jnp.full(shape, fill, dtype)
        else:
            self._key, key = jax.random.split(self._key)
            value = jax.random.normal(key, shape, jnp.float32).astype(dtype)
        return jax.device_put(value, sharding)

    def index_array(self, values, sharding=None):
        values = np.asarray(values, np.int32)
        if self.abstract:
            return jax.ShapeDtypeStruct(values.shape, jnp.int32, sharding=sharding or self.sharding())
        return jax.device_put(values, sharding or self.sharding())


def jax_flash_block_sizes(case: Case):
    from jax.experimental.pallas.ops.tpu import flash_attention as jfa

    bq, bkm, bk, bwd = case.blocks or (1024, 1024, 512, 1024)
    clamp_q, clamp_k = (lambda b: min(b, case.seq_q)), (lambda b: min(b, case.seq_k))
    return jfa.BlockSizes(
        block_q=clamp_q(bq), block_k_major=clamp_k(bkm), block_k=clamp_k(bk), block_b=1,
        block_q_major_dkv=clamp_q(bwd), block_k_major_dkv=clamp_k(bwd), block_k_dkv=clamp_k(bwd),
        block_q_dkv=clamp_q(bwd), block_k_major_dq=clamp_k(bwd), block_k_dq=clamp_k(bwd), block_q_dq=clamp_q(bwd))


def _attention_fn(case: Case, abstract: bool = False):
    """f(q, k, v) -> O for the case's implementation, q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D]; abstract:
    built for the v5e compiler (deviceless), not to run."""
    scale = 1.0 / math.sqrt(case.dim)
    causal = case.causal

    def repeat_kv(k, v):
        return jnp.repeat(k, case.group, axis=1), jnp.repeat(v, case.group, axis=1)

    rules = case.rules()
    if case.impl == "pallas_flash":
        blocks = pf.BlockSizes(*case.blocks) if case.blocks else None
        # Equal documents run as segment ids; compiled for the v5e (abstract) through the same geometry
        # as chunks: the static profile cannot run a kernel with the ids' block ranges (scalar
        # prefetch: libtpu aborts), and equal documents aligned to the blocks visit exactly the tiles
        # chunks do, in a grid of as many steps (the ids set its step count: tiles.segment_steps),
        # with the same code (a tile of one id runs without the ids' mask). Checked with the ranges
        # fixed at trace time, one head, 2 documents of 4096, causal, 2048 x 2048 blocks: forward
        # 89 270 cycles with ids, 89 119 as chunks; training step 307 032 and 306 732.
        ids = _document_ids(case) if rules.segments and not abstract else None
        chunk = case.seq_q // rules.segments if rules.segments and ids is None else rules.chunk
        return lambda q, k, v: pf.flash_attention(q, k, v, causal=causal, window=(rules.window, None) if rules.window
                                                  is not None else None, chunk=chunk, segment_ids=ids,
                                                  logits_soft_cap=rules.soft_cap, block_sizes=blocks,
                                                  interpret=False)
    if case.impl == "xla_reference":
        return lambda q, k, v: naive_attention(q, k, v, causal=causal)
    if case.impl == "jax_flash_attention":
        from jax.experimental.pallas.ops.tpu import flash_attention as jfa

        blocks = jax_flash_block_sizes(case)
        ids = None
        if rules.segments:
            ids = _document_ids(case)
            ids = jfa.SegmentIds(q=ids, kv=ids)

        def jax_flash(q, k, v):
            k, v = repeat_kv(k, v) if case.group > 1 else (k, v)
            return jfa.flash_attention(q, k, v, segment_ids=ids, causal=causal, sm_scale=scale, block_sizes=blocks)

        return jax_flash
    if case.impl == "jax_splash":
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

        kernel = splash_kernel(case)
        ids = None
        if rules.segments:
            ids = _document_ids(case)

        def jax_splash(q, k, v):
            k, v = repeat_kv(k, v) if case.group > 1 else (k, v)
            if ids is None:
                return jax.vmap(kernel)(q * jnp.asarray(scale, q.dtype), k, v)
            segments = splash.SegmentIds(q=ids, kv=ids)
            return jax.vmap(kernel)(q * jnp.asarray(scale, q.dtype), k, v, segment_ids=segments)

        return jax_splash
    if case.impl == "tokamax":
        return tokamax_adapter.attention(causal, rules.soft_cap, fixed_blocks(case).blocks, every_block=case.every_block)
    if case.impl in GPU_IMPLS:
        implementation = {"jax_cudnn": "cudnn", "jax_xla": "xla"}[case.impl]

        def jax_sdpa(q, k, v):  # [B, H, N, D] -> jax.nn's [B, N, H, D]
            o = jax.nn.dot_product_attention(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), is_causal=causal,
                                             implementation=implementation)
            return o.swapaxes(1, 2)

        return jax_sdpa
    raise ValueError(f"--impl: unknown implementation {case.impl!r}")


def _document_ids(case: Case):
    """[B, N] int32 ids of `segments` equal packed documents per sequence (a constant of the program)."""
    n = case.seq_q
    ids = (np.arange(n) * case.rules().segments // n).astype(np.int32)
    return jnp.asarray(np.broadcast_to(ids, (case.batch, n)))


SPLASH_BLOCKS = (1024, 1024, 512)  # jax_splash's (block_q, block_kv, block_kv_compute), every pass


def splash_kernel(case: Case, documents_as_chunks: bool = False, interpret: bool = False):
    """JAX's splash attention for the case (one head's mask for each query head), at the case's blocks:
    its mask info (which blocks run, scalar-prefetched) computed from the mask here, or dropped for
    `case.every_block`. Equal documents are segment ids over a causal or full mask (splash's mask cannot
    follow runtime segment ids), or with `documents_as_chunks` the chunked causal mask of the same
    geometry (what splash would skip if the documents were known when its mask is built)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    rules = case.rules()
    shape = (case.seq_q, case.seq_k)
    offset = case.seq_k - case.seq_q
    chunk = case.seq_q // rules.segments if rules.segments and documents_as_chunks else rules.chunk
    if rules.window is not None:
        head_mask = masks.LocalMask(shape, window_size=(rules.window, 0 if case.causal else None), offset=offset)
    elif chunk is not None:
        head_mask = masks.ChunkedCausalMask(shape, chunk_size=chunk)
    else:
        head_mask = masks.CausalMask(shape, offset=offset) if case.causal else masks.FullMask(shape)
    bq, bk, bc = case.blocks or SPLASH_BLOCKS
    bq, bk = min(bq, case.seq_q), min(bk, case.seq_k)
    bc = min(bc, bk)
    blocks = splash.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bc, block_q_dkv=bq, block_kv_dkv=bk,
                               block_kv_dkv_compute=bc, block_q_dq=bq, block_kv_dq=bk)
    kernel = splash.make_splash_mha(masks.MultiHeadMask([head_mask] * case.heads), block_sizes=blocks,
                                    head_shards=1, q_seq_shards=1, attn_logits_soft_cap=rules.soft_cap,
                                    interpret=interpret)
    if not case.every_block:
        return kernel
    return splash.SplashAttentionKernel(*(_run_every_block(info) for info in (
        kernel.fwd_mask_info, kernel.dq_mask_info, kernel.dkv_mask_info)), **kernel.kwargs)


def _run_every_block(info):
    """Splash mask info without its schedule (which blocks run, in SMEM): splash then runs every block of
    its grid and masks each with its mask function (the mask itself is kept)."""
    return None if info is None else info._replace(data_next=None, mask_next=None, block_mask=None)


def block_shares(case: Case) -> dict[str, float]:
    """Per kernel of splash or tokamax ("fwd", "dq", "dkv"): the share of its grid's blocks that its mask
    info runs, against a grid of every block (`Case.every_block`). Equal documents: as chunks (see
    splash_kernel). The same for every pass and head count of a mask and shape: computed once (splash's
    mask processing takes seconds at N = 32768)."""
    return dict(_block_shares(dataclasses.replace(fixed_blocks(case), pass_="fwd", batch=1, heads=1, kv_heads=1,
                                                  every_block=False)))


@functools.lru_cache(maxsize=None)
def _block_shares(case: Case) -> dict[str, float]:
    if case.impl == "tokamax":
        return tokamax_adapter.block_shares(case.seq_q, case.seq_k, case.causal, case.blocks)
    kernel = splash_kernel(case, documents_as_chunks=True)
    bq, bk = kernel.kwargs["block_sizes"].block_q, kernel.kwargs["block_sizes"].block_kv
    blocks = -(-case.seq_q // bq) * -(-case.seq_k // bk)
    shares = {}
    for phase, info in (("fwd", kernel.fwd_mask_info), ("dq", kernel.dq_mask_info), ("dkv", kernel.dkv_mask_info)):
        if info is not None and info.block_mask is not None:
            shares[phase] = float((np.asarray(info.block_mask) > 0).sum()) / blocks
    return shares


def _decode_fn(case: Case, place: Placement):
    """(f, args) for a decode step: T new tokens of B sequences against a full cache of `context`."""
    dtype = DTYPES[case.dtype]
    batch, tokens, context = case.batch, case.seq_q, case.seq_k
    # Profiling passes the (full) length as a Python int: a trace-time constant, not an SMEM read.
    static_length = context if case.trace_time_lengths else None
    pages_per_seq = context // case.page_size if case.page_size else 0
    rows, row_dim = case.kv_heads // case.heads_per_row, case.dim * case.heads_per_row  # a cache row's heads
    rules = case.rules()  # a window reads only its positions; a soft cap changes no byte
    if case.impl == "jax_paged_attention":
        from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

        q = place.array((batch, case.heads, tokens, case.dim), dtype)
        pool = place.array((case.kv_heads, batch * pages_per_seq, case.page_size, case.dim), dtype)
        table = place.index_array(page_order(batch, pages_per_seq, 1))
        per_block = max(1, min(JAX_PAGED_KEYS_PER_BLOCK // case.page_size, pages_per_seq))

        def paged(q, k_pages, v_pages, lengths, table):
            return paged_attention(q[:, :, 0], k_pages, v_pages, lengths, table,
                                   pages_per_compute_block=per_block)[:, :, None]

        return paged, (q, pool, pool, place.index_array(np.full(batch, context)), table)

    if case.mesh != "1x1":
        mesh = place.mesh(case.mesh)
        replicated = place.sharding(mesh, P())
        axes = ("x", "y")
        q = place.array((batch, case.heads, tokens, case.dim), dtype, replicated)
        if case.page_size:  # device i's pages hold positions [i C/S, (i+1) C/S): its part of the table
            cache = place.array((batch * pages_per_seq, rows, case.page_size, row_dim), dtype,
                                place.sharding(mesh, P(axes, None, None, None)))
            table = place.index_array(page_order(batch, pages_per_seq, case.devices), place.sharding(mesh, P(None, axes)))
        else:
            cache = place.array((batch, rows, context, row_dim), dtype, place.sharding(mesh, P(None, None, axes, None)))
            table = None

        def sharded_decode(q, k, v, lengths, table):
            return pf.sharded_flash_decode(q, k, v, static_length or lengths, mesh, page_table=table, interpret=False,
                                           window=rules.window, logits_soft_cap=rules.soft_cap)

        return sharded_decode, (q, cache, cache, place.index_array(np.full(batch, context), replicated), table)

    q = place.array((batch, case.heads, tokens, case.dim), dtype)
    if case.page_size:
        cache = place.array((batch * pages_per_seq, rows, case.page_size, row_dim), dtype)
        table = place.index_array(page_order(batch, pages_per_seq, 1))
    else:
        cache = place.array((batch, rows, context, row_dim), dtype)
        table = None
    if case.impl == "xla_reference":
        return (lambda q, k, v: naive_attention(q, k, v, causal=True)), (q, cache, cache)
    if case.impl in GPU_IMPLS:
        return _attention_fn(dataclasses.replace(case, causal=True)), (q, cache, cache)

    def decode(q, k, v, lengths, table):
        return pf.flash_decode(q, k, v, static_length or lengths, page_table=table, interpret=False,
                               window=rules.window, logits_soft_cap=rules.soft_cap)

    return decode, (q, cache, cache, place.index_array(np.full(batch, context)), table)


def page_order(batch: int, pages_per_seq: int, devices: int, seed: int = 0) -> np.ndarray:
    """A page table [B, pages_per_seq] naming every page of a pool of B x pages_per_seq once, in a
    shuffled order (as a serving cache's allocator leaves them), within each device's part of the
    pool for the part of the table that device holds."""
    rng = np.random.default_rng(seed)
    part = pages_per_seq // devices
    table = np.empty((batch, pages_per_seq), np.int64)
    for i in range(devices):
        pages = rng.permutation(batch * part) + i * batch * part
        table[:, i * part:(i + 1) * part] = pages.reshape(batch, part)
    return table


def compile_for_v5e(case: Case):
    """The case compiled for the v5e: on one chip with row-major parameters and results (the layout
    the [B, H, N, D] kernels read, ours and JAX's alike, as a producer inside a real program would
    write it); on a mesh with the shardings' default layouts."""
    from pallas_flash import v5e

    fn, args = build(case, Placement(abstract=True))
    if case.mesh != "1x1":
        return v5e.compile_for_v5e(fn, *args)
    return v5e.compile_row_major(fn, *args)


def build(case: Case, place: Placement):
    """(f, args): the jitted-to-be function of the case and its arguments."""
    reason = supported(case)
    if reason:
        raise ValueError(reason)
    if case.pass_ == "decode":
        return _decode_fn(case, place)
    dtype = DTYPES[case.dtype]
    sharding = None
    if case.context_parallel:  # the sequence split over every chip of the mesh
        mesh = place.mesh(case.mesh)
        sharding = place.sharding(mesh, P(None, None, ("x", "y"), None))
    q = place.array((case.batch, case.heads, case.seq_q, case.dim), dtype, sharding)
    k = place.array((case.batch, case.kv_heads, case.seq_k, case.dim), dtype, sharding)
    v = place.array((case.batch, case.kv_heads, case.seq_k, case.dim), dtype, sharding)
    if case.context_parallel:
        def attention(q, k, v):
            return pf.context_parallel_attention(q, k, v, mesh, ("x", "y"), strategy=case.context_parallel,
                                                 causal=case.causal, interpret=False)
    else:
        attention = _attention_fn(case, abstract=place.abstract)
    if case.pass_ == "fwd":
        return attention, (q, k, v)
    do = place.array(q.shape, dtype, sharding)
    if case.pass_ == "fwd+bwd":
        def train_step(q, k, v, do):
            o, vjp = jax.vjp(attention, q, k, v)
            return (o, *vjp(do))

        return train_step, (q, k, v, do)
    # bwd: the backward alone, its residuals (what the forward saved) as inputs.
    residuals = jax.eval_shape(lambda q, k, v: jax.vjp(attention, q, k, v)[1], q, k, v)
    if place.abstract:
        residuals = jax.tree.map(lambda r: jax.ShapeDtypeStruct(r.shape, r.dtype, sharding=place.sharding()),
                                 residuals)
    else:
        residuals = jax.jit(lambda q, k, v: jax.vjp(attention, q, k, v)[1])(q, k, v)
    return (lambda vjp, do: vjp(do)), (residuals, do)
