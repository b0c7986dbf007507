"""A Llama-style decoder in plain JAX, sized like published models, with random weights: what the
attention kernels are measured inside of (pallas_flash.bench.model).

Plain JAX rather than Flax: the parameters are one dict of arrays, each layer's stacked on a leading
[layers] axis and run by `lax.scan`, so a 16- or 32-layer model compiles as one layer's program (the
v5e compiler takes seconds, not minutes) and the mesh shardings are a dict of PartitionSpecs.

The layer: RMSNorm -> Q, K, V projections -> RoPE -> causal GQA attention (any implementation of
pallas_flash.models.attention, inside `jax.named_scope("attention")` so a compiled program's ops can be
attributed to it) -> output projection, residual; RMSNorm -> SwiGLU MLP, residual. Tied embeddings.
Activations [B, N, W]; Q, K, V are projected straight into [B, H, N, D], the kernels' layout, so no
transpose sits between the projections and the kernels.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    name: str
    vocab: int
    layers: int
    width: int  # model width W
    heads: int
    kv_heads: int
    head_dim: int
    mlp_width: int  # SwiGLU hidden width F
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5
    window: int | None = None  # sliding-window attention (left edge, positions); None: full causal
    logits_soft_cap: float | None = None
    # With a window: every global_every-th layer (the last of each run of global_every) attends to
    # every earlier key, the others within the window (Gemma 2: 2, Gemma 3: 6); None: all windowed.
    global_every: int | None = None

    def __post_init__(self):
        for field in ("vocab", "layers", "width", "heads", "kv_heads", "head_dim", "mlp_width"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"LlamaConfig: expected {field} an int >= 1, got {value!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"LlamaConfig: expected kv_heads dividing heads, got {self.heads} and {self.kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig: expected an even head_dim (RoPE rotates pairs), got {self.head_dim}")
        if self.global_every is not None:
            if self.window is None or not isinstance(self.global_every, int) or self.global_every < 1:
                raise ValueError(f"LlamaConfig: expected global_every an int >= 1 with a window, got "
                                 f"{self.global_every!r} (window {self.window!r})")
            if self.layers % self.global_every:
                raise ValueError(f"LlamaConfig: expected layers a multiple of global_every, got {self.layers} and "
                                 f"{self.global_every}")

    def with_layers(self, layers: int) -> LlamaConfig:
        return dataclasses.replace(self, name=f"{self.name}-{layers}l", layers=layers)

    def layer_windows(self) -> tuple[int | None, ...]:
        """The attention window of each layer of one run of the layer pattern (it repeats through the
        model): (window,) when every layer has the same; Gemma 2's (4096, None)."""
        if self.global_every is None:
            return (self.window,)
        return (self.window,) * (self.global_every - 1) + (None,)

    @property
    def params_count(self) -> int:
        return sum(math.prod(s) for s in jax.tree.leaves(param_shapes(self), is_leaf=lambda x: isinstance(x, tuple)))

    def matmul_params(self) -> int:
        """Weights each token multiplies by: every layer's projections and MLP, and the tied head
        (the embedding lookup is a gather, not a product)."""
        w, d = self.width, self.head_dim
        per_layer = w * d * (self.heads + 2 * self.kv_heads) + self.heads * d * w + 3 * w * self.mlp_width
        return self.layers * per_layer + self.vocab * w

    def attention_pairs(self, seq: int, context: int | None = None) -> float:
        """Visible (query, key) pairs of one sequence in a layer (the mean over the layer pattern): `seq`
        new tokens after `context - seq` cached ones (context None: seq), causal and within the window."""
        context = seq if context is None else context
        windows = self.layer_windows()
        return sum(_pairs(seq, context - seq, context if w is None else w) for w in windows) / len(windows)

    def flops(self, seq: int, batch: int, *, context: int | None = None, backward: bool = False) -> float:
        """Model FLOPs of a pass over `batch` sequences of `seq` new tokens (the usual count: 2 per
        multiply-add of every matmul and attention product, x3 with the backward; rematerialised work
        is not counted, so MFU is of the model's FLOPs, not the hardware's)."""
        dense = 2.0 * self.matmul_params() * seq * batch
        attention = 4.0 * self.heads * self.head_dim * self.attention_pairs(seq, context) * batch * self.layers
        return (dense + attention) * (3 if backward else 1)

    def attention_flops(self, seq: int, batch: int, *, context: int | None = None, backward: bool = False) -> float:
        pairs = self.attention_pairs(seq, context)
        return 4.0 * self.heads * self.head_dim * pairs * batch * self.layers * (3 if backward else 1)


def _pairs(seq: int, start: int, left: int) -> float:
    """attention_pairs in closed form: query i sees min(start + i, left) + 1 keys."""
    ramp = max(0, min(seq, left - start + 1))  # queries before the window is full
    first, last = start, start + ramp - 1
    ramped = (first + last) * ramp / 2 + ramp
    return ramped + (seq - ramp) * (left + 1)


# Published shapes (Meta's model cards / config.json): Llama-3.2-1B and Llama-3.1-8B. Both tie the
# embeddings here; Llama-3.1-8B does not (its separate head adds 525M parameters and 1.05 GFLOP a token).
CONFIGS = {
    "llama-1b": LlamaConfig("llama-1b", vocab=128256, layers=16, width=2048, heads=32, kv_heads=8, head_dim=64,
                            mlp_width=8192),
    "llama-8b": LlamaConfig("llama-8b", vocab=128256, layers=32, width=4096, heads=32, kv_heads=8, head_dim=128,
                            mlp_width=14336),
    # Gemma-2-2B's shapes (config.json: 26 layers, width 2304, 8 heads of 256, 4 KV heads, MLP 9216,
    # vocabulary 256000) and its attention: a 4096-position window on every other layer, the others
    # global, logits soft-capped at 50. The block stays Llama's (SwiGLU, one norm each side, no final
    # soft cap, no embedding scale): what differs there is not attention.
    "gemma2-2b": LlamaConfig("gemma2-2b", vocab=256000, layers=26, width=2304, heads=8, kv_heads=4, head_dim=256,
                             mlp_width=9216, rope_theta=10000.0, norm_eps=1e-6, window=4096, logits_soft_cap=50.0,
                             global_every=2),
    # Tests: every shape small, GQA 4:2, an odd vocabulary.
    "tiny": LlamaConfig("tiny", vocab=97, layers=2, width=64, heads=4, kv_heads=2, head_dim=16, mlp_width=128),
}


def config(name: str) -> LlamaConfig:
    """A named configuration; "llama-1b:4" is llama-1b's layer shapes with 4 layers, "llama-1b:4:32000"
    also with a vocabulary of 32000 (a smaller head, for a CPU)."""
    base, *rest = name.split(":")
    if base not in CONFIGS:
        raise ValueError(f"--model: unknown model {base!r}; expected one of {', '.join(CONFIGS)} "
                         f"(optionally ':LAYERS' or ':LAYERS:VOCAB')")
    if len(rest) > 2 or not all(x.isdigit() and int(x) >= 1 for x in rest):
        raise ValueError(f"--model: expected {base}[:LAYERS[:VOCAB]] with ints >= 1, got {name!r}")
    c = CONFIGS[base]
    if rest:
        c = c.with_layers(int(rest[0]))
    if len(rest) == 2:
        c = dataclasses.replace(c, name=f"{c.name}-v{rest[1]}", vocab=int(rest[1]))
    return c


# --------------------------------------------------------------------------------------------------
# Parameters


def param_shapes(c: LlamaConfig) -> dict:
    L, W, H, K, D, F = c.layers, c.width, c.heads, c.kv_heads, c.head_dim, c.mlp_width
    return {
        "embed": (c.vocab, W),
        "layers": {
            "attn_norm": (L, W), "wq": (L, W, H, D), "wk": (L, W, K, D), "wv": (L, W, K, D), "wo": (L, H, D, W),
            "mlp_norm": (L, W), "w_gate": (L, W, F), "w_up": (L, W, F), "w_down": (L, F, W),
        },
        "final_norm": (W,),
    }


def init_params(c: LlamaConfig, key, dtype=jnp.float32) -> dict:
    """Random weights: norms 1, every matrix normal with std 1/sqrt(fan-in), the embedding included
    (fan-in W as the tied head: its logits start at O(1), the loss near log(vocab))."""
    shapes = param_shapes(c)
    leaves, tree = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
        shapes, is_leaf=lambda x: isinstance(x, tuple))[0]]
    keys = jax.random.split(key, len(leaves))
    fan_in = {"wq": c.width, "wk": c.width, "wv": c.width, "wo": c.heads * c.head_dim, "w_gate": c.width,
              "w_up": c.width, "w_down": c.mlp_width}
    values = []
    for path, shape, k in zip(paths, leaves, keys):
        leaf = path.split("'")[-2]
        if leaf.endswith("norm"):
            values.append(jnp.ones(shape, dtype))
        else:
            std = 1.0 / math.sqrt(c.width if leaf == "embed" else fan_in[leaf])
            values.append((jax.random.normal(k, shape, jnp.float32) * std).astype(dtype))
    return jax.tree.unflatten(tree, values)


# --------------------------------------------------------------------------------------------------
# The layers


def rms_norm(x, scale, eps):
    x32 = x.astype(jnp.float32)
    normed = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * scale.astype(jnp.float32)).astype(x.dtype)


def rope(x, positions, theta):
    """Rotary embedding of x [B, H, N, D] at positions [B, N] (rotate-half pairing, D/2 frequencies;
    Llama 3's long-context frequency scaling is left out: the weights are random)."""
    half = x.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions.astype(jnp.float32)[:, None, :, None] * freq  # [B, 1, N, D/2]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def project_qkv(c: LlamaConfig, p: dict, x, positions):
    """The attention block's input side: q [B, H, N, D], k and v [B, Hkv, N, D], RoPE applied."""
    h = rms_norm(x, p["attn_norm"], c.norm_eps)
    q = jnp.einsum("bnw,whd->bhnd", h, p["wq"].astype(x.dtype))
    k = jnp.einsum("bnw,whd->bhnd", h, p["wk"].astype(x.dtype))
    v = jnp.einsum("bnw,whd->bhnd", h, p["wv"].astype(x.dtype))
    return rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta), v


def finish_layer(c: LlamaConfig, p: dict, x, o):
    """The output projection of the attention o [B, H, N, D], the residual, and the MLP block."""
    x = x + jnp.einsum("bhnd,hdw->bnw", o, p["wo"].astype(x.dtype))
    h = rms_norm(x, p["mlp_norm"], c.norm_eps)
    gate = jnp.einsum("bnw,wf->bnf", h, p["w_gate"].astype(x.dtype))
    up = jnp.einsum("bnw,wf->bnf", h, p["w_up"].astype(x.dtype))
    return x + jnp.einsum("bnf,fw->bnw", jax.nn.silu(gate) * up, p["w_down"].astype(x.dtype))


def head(c: LlamaConfig, params: dict, x):
    """Final norm and the tied head: logits [..., vocab] in float32."""
    h = rms_norm(x, params["final_norm"], c.norm_eps)
    return jnp.einsum("...w,vw->...v", h, params["embed"].astype(x.dtype), preferred_element_type=jnp.float32)


def embed(params: dict, tokens, dtype):
    """The embedding rows of tokens [B, N]: [B, N, W]. Tokens split over an explicit mesh keep their
    split (the lookup's result sharding is otherwise ambiguous to JAX)."""
    sharding = jax.typeof(tokens).sharding
    spec = getattr(sharding, "spec", None)
    if spec is not None and any(axis is not None for axis in spec):
        out = NamedSharding(sharding.mesh, P(*spec, None))
        return params["embed"].at[tokens].get(out_sharding=out).astype(dtype)
    return jnp.take(params["embed"], tokens, axis=0).astype(dtype)


def scan_layers(c: LlamaConfig, layer, carry, xs):
    """Runs layer(carry, x, window) -> carry over the model's layers, x each layer's slice of the
    stacked xs (leading axis: layers) and window its own (a Python value: the kernels' masks are
    static). One lax.scan step per run of the layer pattern, its layers unrolled, so a model still
    compiles as one pattern's program."""
    windows = c.layer_windows()
    runs = jax.tree.map(lambda a: a.reshape(a.shape[0] // len(windows), len(windows), *a.shape[1:]), xs)

    def run(carry, xs_run):
        for i, window in enumerate(windows):
            carry = layer(carry, jax.tree.map(lambda a: a[i], xs_run), window)
        return carry, None

    carry, _ = lax.scan(run, carry, runs)
    return carry


def hidden_states(c: LlamaConfig, params: dict, tokens, attention, *, dtype=jnp.bfloat16, remat: bool = True,
                  weights=None):
    """The final layer's output [B, N, W] for tokens [B, N] at positions 0..N-1. `attention(q, k, v,
    window=W)` is causal attention on [B, H, N, D] within W positions (pallas_flash.models.attention),
    called with each layer's window. remat: each layer's activations are recomputed in the backward
    from its input (what a long sequence needs to fit). weights: applied to each layer's weights (and
    the embedding) where they are used: FSDP's gather (pallas_flash.models.train); None uses them as
    they are."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    weights = weights or (lambda tree: tree)

    def layer(x, p, window):
        p = weights(p)
        q, k, v = project_qkv(c, p, x, positions)
        with jax.named_scope("attention"):
            o = attention(q, k, v, window=window)
        return finish_layer(c, p, x, o)

    body = jax.checkpoint(layer, static_argnums=(2,)) if remat else layer
    return scan_layers(c, body, embed({"embed": weights(params["embed"])}, tokens, dtype), params["layers"])


def forward(c: LlamaConfig, params: dict, tokens, attention, *, dtype=jnp.bfloat16, remat: bool = True):
    """Logits [B, N, vocab] (float32) of tokens [B, N]."""
    return head(c, params, hidden_states(c, params, tokens, attention, dtype=dtype, remat=remat))


def loss(c: LlamaConfig, params: dict, tokens, attention, *, dtype=jnp.bfloat16, remat: bool = True,
         loss_chunk: int = 2048, weights=None):
    """Mean next-token cross-entropy of tokens [B, N] (the last position predicts nothing). The head
    and the loss run over `loss_chunk` positions at a time, each chunk rematerialised in the backward:
    the float32 logits of a whole sequence (N x 128256 x 4 bytes, 4 GiB at N = 8192) never exist."""
    x = hidden_states(c, params, tokens, attention, dtype=dtype, remat=remat, weights=weights)[:, :-1]
    if weights is not None:
        params = {"embed": weights(params["embed"]), "final_norm": weights(params["final_norm"])}
    targets = tokens[:, 1:]
    n = x.shape[1]
    chunk = min(loss_chunk, n)
    pad = -n % chunk
    x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=-1)
    xs = x.reshape(x.shape[0], -1, chunk, x.shape[2]).swapaxes(0, 1)
    ts = targets.reshape(targets.shape[0], -1, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def chunk_loss(total, part):
        h, t = part
        logits = head(c, params, h)
        logp = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(logp, jnp.maximum(t, 0)[..., None], axis=-1)[..., 0]
        return total - jnp.sum(jnp.where(t >= 0, picked, 0.0)), None

    total, _ = lax.scan(chunk_loss, jnp.zeros((), jnp.float32), (xs, ts))
    return total / (n * tokens.shape[0])
