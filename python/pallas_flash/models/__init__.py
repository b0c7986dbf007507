"""A Llama-style decoder in plain JAX whose attention is swappable (pallas_flash.models.attention):
the model the kernels are measured inside of (pallas_flash.bench.model). llama: configurations,
weights, the layers and the loss; train: AdamW steps, FSDP over a mesh; generate: prefill and a
decode loop over a paged KV cache."""

from pallas_flash.models.attention import ATTENTION_IMPLS, attention_fn
from pallas_flash.models.llama import CONFIGS, LlamaConfig, config

__all__ = ["ATTENTION_IMPLS", "CONFIGS", "LlamaConfig", "attention_fn", "config"]
