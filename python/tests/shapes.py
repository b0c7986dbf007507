"""The shape grid the kernel tests sweep, in one place. Sizes stay small: every kernel runs in the
TPU interpret mode on the CPU."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    heads_q: int
    heads_kv: int
    seq_q: int
    seq_k: int
    dim: int

    def __str__(self):
        return f"B{self.batch}_Hq{self.heads_q}_Hkv{self.heads_kv}_Nq{self.seq_q}_Nk{self.seq_k}_D{self.dim}"


FORWARD_SHAPES = [
    Shape(1, 1, 1, 1, 1, 64),  # N = 1
    Shape(1, 2, 2, 128, 256, 128),  # aligned: no padding copy
    Shape(2, 2, 1, 200, 300, 64),  # odd lengths, MQA
    Shape(1, 4, 2, 300, 130, 96),  # D = 96, Nq > Nk: causal rows with no visible key
    Shape(1, 8, 2, 70, 390, 40),  # GQA 4, Nq < Nk
]

GRAD_SHAPES = [
    Shape(1, 2, 2, 130, 130, 64),
    Shape(1, 4, 2, 200, 300, 96),
    Shape(1, 4, 1, 300, 200, 32),
]
