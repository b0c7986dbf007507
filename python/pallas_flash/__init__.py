"""Pallas-Flash for JAX: FlashAttention-2 Pallas kernels for the TPU v5e, and on CPU the project's C++
kernels through the XLA FFI. dot_product_attention takes jax.nn.dot_product_attention's arguments
([B, T, N, H]); flash_attention, flash_decode and the rest take [B, H, N, D].

On a TPU the kernels are compiled by Mosaic; on CPU the C++ kernels run (pallas_flash.cpu_kernels;
interpret=True runs the Pallas kernels in TPU interpret mode instead, to check them); elsewhere the
jax.numpy reference path runs.
"""

from pallas_flash.context_parallel import context_parallel_attention, zigzag_permutation
from pallas_flash.decode import append_kv, flash_decode, sharded_append_kv, sharded_flash_decode
from pallas_flash.dot_product_attention import dot_product_attention
from pallas_flash.flash_attention import alignment_padding, flash_attention
from pallas_flash.mask import Mask
from pallas_flash.merge import merge_attention_states
from pallas_flash.planner import BlockSizes, describe_plan, plan_block_sizes
from pallas_flash.reference import reference_attention

__all__ = [
    "BlockSizes",
    "Mask",
    "alignment_padding",
    "append_kv",
    "context_parallel_attention",
    "describe_plan",
    "dot_product_attention",
    "flash_attention",
    "flash_decode",
    "merge_attention_states",
    "plan_block_sizes",
    "reference_attention",
    "sharded_append_kv",
    "sharded_flash_decode",
    "zigzag_permutation",
]
