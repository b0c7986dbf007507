"""Tokamax (Google's Pallas kernel library, PyPI `tokamax`, pinned in the `v5e` extra) as the benchmark
runs it: its TPU attention (`PallasMosaicTpuFlashAttention` and its VJP: splash attention) at a given
configuration, on the bench's [B, H, N, D] arrays.

What its API runs on a TPU (0.0.12): a causal or full mask and a logit soft cap. A window
(`local_window_size`) becomes mask bounds (k_start / k_end), which its TPU path rejects
(NotImplementedError), and it takes no segment ids: those masks reach it only as a dense [Nq, Nk]
boolean mask (pallas_flash.bench.cases.supported says so in its rows).

Test-harness adapters for a competitor's code, not product code (../shared/TPU.md):
- its op refuses to trace unless the default device is a TPU: `supported_on` answers True;
- Pallas lowers its `sign` by asking the default device's TPU generation: a v5e's answers, for a
  deviceless compile (not in interpret mode);
- its config reads absl flags, parsing `sys.argv` on first use: parsed here with the program name only;
- `every_block`: its kernels built with their mask info's schedule dropped (which blocks run, read by
  scalar prefetch; the static profile reads it as 0), so that every block of the grid runs, masked by
  its mask function: what the v5e compiler's profile can simulate (see pallas_flash.bench.estimate).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys

import numpy as np

VERSION = "0.0.12"
# (block_q, block_kv, block_kv_compute) forward, (block_q_dkv, block_kv_dkv, block_kv_dkv_compute)
# backward, from its own autotuning candidates (its autotuner needs a TPU; experimental scheduler on,
# head-dim-minor layouts), by the v5e compiler's estimate at N = 4096, D = 128, bf16, full mask, two
# heads (its MHA kernels), each also compiled at H = 16, N = 32768. Forward: (1024, 4096, 1024) 144.5k
# cycles; (1024, 4096, 512) 145.1k, (1024, 2048, 512) 159.3k, (2048, 1024, 512) 176.9k, (1024, 1024, 512)
# 179.7k; with 2048-row query blocks and 2048 or 4096 keys, or 4096-row query blocks, out of VMEM.
BLOCKS = (1024, 4096, 1024, 2048, 1024, 512)
# A training step's: at H = 16 (N = 8192 and 32768, not at one or two heads) the forward that saves
# residuals runs out of VMEM at 2048-row query blocks or 4096 keys, so (1024, 2048, 512). Backward,
# profiled for one KV head at N = 4096 (for two, all but one of its profiles outgrew a 23 GB machine):
# (2048, 1024, 512) 198.3k (two heads: 194.3k a head), (1024, 1024, 512) 202.4k; (2048, 1024, 1024),
# faster (188.0k), is out of VMEM at H = 16, and with a soft cap (2048, 1024, 512) is too.
TRAINING_BLOCKS = (1024, 2048, 512, 2048, 1024, 512)
TRAINING_BLOCKS_SOFT_CAP = (1024, 2048, 512, 1024, 1024, 512)


def blocks(training: bool, soft_cap: bool) -> tuple[int, ...]:
    """Its configuration for a forward (inference) or a training step (see BLOCKS)."""
    if not training:
        return BLOCKS
    return TRAINING_BLOCKS_SOFT_CAP if soft_cap else TRAINING_BLOCKS


def available() -> str | None:
    """None when tokamax at VERSION can be imported, else why not."""
    try:
        import tokamax
    except ImportError as error:
        return f"tokamax is not installed ({error}); pip install \"./python[v5e]\""
    if tokamax.__version__ != VERSION:
        return f"tokamax {tokamax.__version__}: the bench's adapters are for {VERSION}"
    return None


@functools.cache
def _adapted():
    """tokamax's TPU attention modules, adapted once (see the module's docstring)."""
    from absl import flags
    from tokamax._src.ops.attention import pallas_mosaic_tpu as fwd
    from tokamax._src.ops.attention import pallas_mosaic_tpu_vjp as vjp

    if not flags.FLAGS.is_parsed():
        flags.FLAGS(sys.argv[:1])
    fwd.PallasMosaicTpuFlashAttention.supported_on = lambda self, device: True
    vjp.PallasMosaicTpuFlashAttentionVjp.supported_on = lambda self, device: True
    return fwd, vjp


@functools.cache
def _compiling_for_v5e():
    """Pallas asks the default device (here a CPU, where it would raise) for the TPU generation; the
    answers of the v5e the deviceless compile targets. Not needed in interpret mode, and left out there
    (it holds for the rest of the process)."""
    from jax._src.pallas.mosaic import tpu_info

    tpu_info.get_device_kind = lambda: "TPU v5 lite"
    tpu_info.get_num_device_cores = lambda: 1


@contextlib.contextmanager
def _kernels_built(every_block: bool, interpret: bool):
    """While tracing: tokamax's splash kernels built with every block of their grid run, and / or in
    interpret mode."""
    from tokamax._src.ops.attention import pallas_mosaic_tpu_common as common
    from tokamax._src.ops.experimental.tpu.splash_attention import splash_attention_kernel as splash

    original = common.build_splash_kernel

    def build(*args, splash_config, **kwargs):
        if interpret:
            splash_config = dataclasses.replace(splash_config, interpret=True)
        kernel = original(*args, splash_config=splash_config, **kwargs)
        if not every_block:
            return kernel
        return splash.SplashAttentionKernel(_run_every_block(kernel.fwd_mask_info),
                                            _run_every_block(kernel.dkv_mask_info), **kernel.kwargs)

    common.build_splash_kernel = build
    try:
        yield
    finally:
        common.build_splash_kernel = original


@functools.cache
def _building(op_class, every_block: bool, interpret: bool):
    """The tokamax op class whose kernels are built as asked (`_kernels_built`)."""

    class Building(op_class):
        @functools.wraps(op_class._fwd)  # its signature: tokamax binds arguments by it
        def _fwd(self, *args, **kwargs):
            with _kernels_built(every_block, interpret):
                return super()._fwd(*args, **kwargs)

    Building.__name__ = Building.__qualname__ = op_class.__name__
    return Building


def _run_every_block(info):
    """Mask info without its schedule: a static grid over every block, each masked by the mask function
    (its causal q_sequence kept)."""
    if info is None:
        return None
    return info._replace(mask_next=None, active_rows=None, active_cols=None, num_active_blocks=None,
                         block_mask=None, partial_mask_blocks=None)


def attention(causal: bool, soft_cap: float | None, config=BLOCKS, every_block: bool = False,
              interpret: bool = False):
    """f(q, k, v) -> O on [B, H, N, D] arrays (tokamax's own [B, T, N, H] in and out: the swaps
    around it cancel its own), differentiable by tokamax's VJP; scale 1/sqrt(D)."""
    fwd, vjp = _adapted()
    if not interpret:
        _compiling_for_v5e()
    from tokamax._src.ops.experimental.tpu.splash_attention import splash_attention_kernel as splash

    bq, bkv, bkv_compute, bq_dkv, bkv_dkv, bkv_dkv_compute = config
    layout = splash.QKVLayout.HEAD_DIM_MINOR
    # Its backward op builds its kernels when JAX transposes the forward, after this function returns:
    # each op builds them as asked inside its own `_fwd`.
    op = _building(fwd.PallasMosaicTpuFlashAttention, every_block, interpret)(
        config=fwd.Config(block_q=bq, block_kv=bkv, block_kv_compute=bkv_compute, q_layout=layout, k_layout=layout,
                          v_layout=layout, use_experimental_scheduler=True),
        vjp=_building(vjp.PallasMosaicTpuFlashAttentionVjp, every_block, interpret)(
            config=vjp.Config(block_q_dkv=bq_dkv, block_kv_dkv=bkv_dkv, block_kv_dkv_compute=bkv_dkv_compute)))

    def tokamax_attention(q, k, v):
        o = op(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), is_causal=causal, logits_soft_cap=soft_cap)
        return o.swapaxes(1, 2)

    return tokamax_attention


def block_shares(seq_q: int, seq_k: int, causal: bool, config=BLOCKS) -> dict[str, float]:
    """Per kernel ("fwd", "dkv"): the share of its grid's blocks its own mask info runs (tokamax's grid
    is the list of those blocks), against the grid of every block (`every_block`)."""
    _adapted()
    from tokamax._src.ops.attention import base
    from tokamax._src.ops.attention import pallas_mosaic_tpu_common as common
    from tokamax._src.ops.experimental.tpu.splash_attention import splash_attention_kernel as splash

    bq, bkv, _, bq_dkv, bkv_dkv, _ = config
    config = dataclasses.replace(splash.SplashConfig.get_default(), block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                                 block_q_dkv=bq_dkv, block_kv_dkv=bkv_dkv, block_kv_dkv_compute=bkv_dkv)
    kernel = common.build_splash_kernel(mask=base.Mask(is_causal=causal), splash_config=config, q_seq_len=seq_q,
                                        kv_seq_len=seq_k, is_mqa=False, save_residuals=False)
    shares = {}
    for phase, info, (rows, cols) in (("fwd", kernel.fwd_mask_info, (bq, bkv)),
                                      ("dkv", kernel.dkv_mask_info, (bq_dkv, bkv_dkv))):
        grid = -(-seq_q // rows) * -(-seq_k // cols)
        if info is not None and info.num_active_blocks is not None:  # a grid of the blocks that run
            shares[phase] = float(info.num_active_blocks[0]) / grid
        elif info is not None and info.block_mask is not None:  # a grid of every block, some skipped
            shares[phase] = float((np.asarray(info.block_mask) > 0).sum()) / grid
    return shares
