"""A small GPT: byte-level (vocab 256) decoder-only transformer with pre-LN blocks and causal
self-attention through `F.scaled_dot_product_attention` (nanoGPT's layout, no weight tying so
that embedding and head can live in different pipeline stages).

    model = build_gpt(block_size=128, n_layer=4, d_model=128, n_head=4)
    logits = model(torch.randint(0, 256, (8, 128)))    # (8, 128, 256)

Blocks: embedding (token + learned position), `n_layer` transformer blocks, head
(final LayerNorm + Linear). Train with the flattened cross entropy of
`layerpipe.data.loss_fn("language")`.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from layerpipe.errors import PlanError


class Embedding(nn.Module):
    """(B, T) byte ids -> (B, T, d_model): token embedding plus learned position embedding."""

    def __init__(self, vocab_size: int, block_size: int, d_model: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.block_size = block_size
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(block_size, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[-1]
        if t > self.block_size:
            raise PlanError(f"sequence length {t} exceeds the model's block size {self.block_size}")
        pos = torch.arange(t, device=idx.device)
        return self.drop(self.tok(idx) + self.pos(pos))


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_head:
            raise PlanError(f"d_model {d_model} is not divisible by n_head {n_head}")
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        # (B, T, C) -> (B, heads, T, C / heads)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_drop(self.proj(y))


class TransformerBlock(nn.Module):
    """x + attn(LN(x)), then x + MLP(LN(x)) with a 4x GELU MLP."""

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Head(nn.Module):
    """Final LayerNorm and the linear map to vocabulary logits, (B, T, vocab)."""

    def __init__(self, d_model: int, vocab_size: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.ln(x))


def _init_weights(model: nn.Module, n_layer: int) -> None:
    # GPT-2 initialisation: N(0, 0.02), zero biases, residual projections scaled by
    # 1/sqrt(2 n_layer) so the residual stream's variance does not grow with depth
    residual = {m for blk in model if isinstance(blk, TransformerBlock) for m in (blk.attn.proj, blk.mlp[2])}
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            std = 0.02 / math.sqrt(2 * n_layer) if m in residual else 0.02
            nn.init.normal_(m.weight, mean=0.0, std=std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def build_gpt(
    *,
    vocab_size: int = 256,
    block_size: int = 128,
    n_layer: int = 4,
    d_model: int = 128,
    n_head: int = 4,
    dropout: float = 0.0,
) -> nn.Sequential:
    """Return `nn.Sequential(Embedding, n_layer x TransformerBlock, Head)`."""
    if n_layer < 1 or block_size < 1:
        raise PlanError("gpt needs n_layer >= 1 and block_size >= 1")
    model = nn.Sequential(
        Embedding(vocab_size, block_size, d_model, dropout),
        *(TransformerBlock(d_model, n_head, dropout) for _ in range(n_layer)),
        Head(d_model, vocab_size),
    )
    _init_weights(model, n_layer)
    return model
