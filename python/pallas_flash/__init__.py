"""Pallas-Flash's TPU backend: FlashAttention-2 Pallas kernels for the TPU v5e.

On a TPU the kernels are compiled by Mosaic; on CPU they run in Pallas' TPU interpret mode (slow,
for checking); elsewhere the reference path runs. A later backend may route CPU calls to the C++
kernels (through the XLA FFI) behind the same functions.
"""

from pallas_flash.decode import append_kv, flash_decode, sharded_flash_decode
from pallas_flash.flash_attention import alignment_padding, flash_attention, padding_bytes
from pallas_flash.merge import merge_attention_states
from pallas_flash.planner import BlockSizes, describe_plan, plan_block_sizes
from pallas_flash.reference import reference_attention

__all__ = [
    "BlockSizes",
    "alignment_padding",
    "append_kv",
    "describe_plan",
    "flash_attention",
    "flash_decode",
    "merge_attention_states",
    "padding_bytes",
    "plan_block_sizes",
    "reference_attention",
    "sharded_flash_decode",
]
