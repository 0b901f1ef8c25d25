"""The two towers of the MIM model: one image encoder (ViT) and one text encoder (transformer).

In the 3-tower model the query-photo and product-photo "towers" are the same image encoder; in the 4-tower
model the title and short-query "towers" are the same text encoder. So a trained model is exactly one
`ImageTower` and one `TextTower`, both ending in a projection and L2 normalisation into one embedding space.

Attention has two forms computing the same function. Training and torch serving use the fused kernel
(`torch.nn.functional.scaled_dot_product_attention`: flash / memory-efficient / cuDNN on a GPU, a flash kernel on
the CPU), which never writes the (B, heads, T, T) score matrix. The ONNX exporter traces the explicit form inside
`explicit_attention()`: plain MatMul / Softmax nodes that graph surgery and an FP16 build can pin to FP32 by node
type. That context is the only switch between them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from mim.model.config import ModelConfig, TextConfig, VisionConfig

# Additive attention bias for padding. Not -inf: an FP16 engine would turn -inf - -inf into NaN, and -1e4 is
# representable in FP16 while still zeroing the weight after softmax.
MASK_BIAS = -1.0e4


# Which attention form the towers run: fused unless inside `explicit_attention()`. A module-level flag, not a
# context variable: torch.compile guards on a global's value (and recompiles when it changes), while it would
# have to break its graph to read a ContextVar.
_FUSED_ATTENTION = True


@contextmanager
def explicit_attention() -> Iterator[None]:
    """Run the towers with explicit matmul/softmax attention (the form the ONNX exporter traces). The two forms
    are the same function up to float rounding (tests/test_model.py checks it, padded causal text included)."""
    global _FUSED_ATTENTION
    before, _FUSED_ATTENTION = _FUSED_ATTENTION, False
    try:
        yield
    finally:
        _FUSED_ATTENTION = before


def fused_attention() -> bool:
    """True when the towers run `scaled_dot_product_attention` (everywhere but inside `explicit_attention()`)."""
    return _FUSED_ATTENTION


def l2_normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    # x * rsqrt(max(|x|^2, eps)) exports as a few plain ops and keeps zero rows finite.
    return x * torch.rsqrt(torch.clamp((x * x).sum(dim=-1, keepdim=True), min=eps))


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        """`bias`: additive, broadcast over heads. Fused form: `causal` adds the causal mask inside the kernel.
        Explicit form: `bias` already holds the causal mask and `causal` must be False."""
        b, t, w = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, H, T, Dh) strided views: the kernel reads them in place
        if _FUSED_ATTENTION:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=causal)  # (B, H, T, Dh)
            return self.out(y.transpose(1, 2).reshape(b, t, w))
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # (B, H, T, T)
        if bias is not None:
            scores = scores + bias  # (B, 1, 1, T) padding, or (B, 1, T, T) with a causal mask; broadcast over heads
        attn = scores.softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(b, t, w)
        return self.out(y)

    def query_one(self, x: torch.Tensor, xq: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Fused attention for one query row per sequence: `xq` (B, 1, W) queries the keys and values of every
        position of `x` (B, T, W); `mask` (B, 1, 1, T), additive or boolean (True = attend). The query
        projection runs on B rows instead of B x T: the rows of the fused qkv weight are [q; k; v]."""
        b, t, w = x.shape
        weight, bias = self.qkv.weight, self.qkv.bias
        q = F.linear(xq, weight[:w], bias[:w]).reshape(b, 1, self.heads, self.head_dim).transpose(1, 2)
        kv = F.linear(x, weight[w:], bias[w:]).reshape(b, t, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask)  # (B, H, 1, Dh)
        return self.out(y.transpose(1, 2).reshape(b, 1, w))


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP weights were trained with."""

    SCALE = 1.702

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.SCALE * x)


def activation(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name == "quick_gelu":
        return QuickGELU()
    raise ValueError(f"unknown activation {name!r}; expected 'gelu' or 'quick_gelu'")


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, act: str = "gelu"):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), activation(act), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), bias, causal)
        return x + self.mlp(self.ln_2(x))

    def forward_at(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The block's output at one position per sequence, (B, W); `pos` (B,) int64, `mask` as in
        `Attention.query_one`. Pooling reads one position of the last block, so only its keys and values are
        needed everywhere: the query, attention output and MLP run on B rows, about 5/6 of the block saved."""
        w = x.shape[2]
        at = pos[:, None, None].expand(-1, 1, w)  # (B, 1, W) gather index
        h = self.ln_1(x)
        y = x.gather(1, at) + self.attn.query_one(h, h.gather(1, at), mask)  # (B, 1, W)
        return (y + self.mlp(self.ln_2(y)))[:, 0]


class ImageTower(nn.Module):
    """pixel_values (B, 3, S, S) float32 -> image_embeds (B, D), unit L2 norm."""

    def __init__(self, cfg: VisionConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        # CLIP's patch convolution has no bias; an imported checkpoint sets this one to zeros, which is exact.
        self.patch_embed = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        scale = cfg.width**-0.5
        self.cls_token = nn.Parameter(scale * torch.randn(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(scale * torch.randn(1, cfg.num_patches + 1, cfg.width))
        self.ln_pre = nn.LayerNorm(cfg.width)
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.activation) for _ in range(cfg.layers)
        )
        self.ln_post = nn.LayerNorm(cfg.width)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)  # (B, N, W)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (B, N+1, W)
        x = self.ln_pre(x)
        if _FUSED_ATTENTION:  # the last block only where [CLS] is read (Block.forward_at)
            for blk in self.blocks[:-1]:
                x = blk(x)
            cls_out = self.blocks[-1].forward_at(x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device))
            return l2_normalize(self.proj(self.ln_post(cls_out)))
        for blk in self.blocks:
            x = blk(x)
        return l2_normalize(self.proj(self.ln_post(x[:, 0])))


class TextTower(nn.Module):
    """(input_ids, attention_mask) (B, T) int64 -> text_embeds (B, D), unit L2 norm.

    Pools the [CLS] position (cfg.pooling "cls") or the last attended position, where CLIP's tokenizer puts
    its end-of-text token ("eot"). The position comes from the mask, not from a token id, so it does not
    depend on the vocabulary and exports as one Gather."""

    def __init__(self, cfg: TextConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(0.01 * torch.randn(1, cfg.context_length, cfg.width))
        self.blocks = nn.ModuleList(
            Block(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.activation) for _ in range(cfg.layers)
        )
        self.ln_final = nn.LayerNorm(cfg.width)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)
        if cfg.causal:
            # (1, 1, T, T): MASK_BIAS above the diagonal. Not persistent: derived from the config, so
            # checkpoints hold weights only.
            causal = torch.triu(torch.full((cfg.context_length, cfg.context_length), MASK_BIAS), diagonal=1)
            self.register_buffer("causal_bias", causal[None, None], persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        x = self.token_embed(input_ids) + self.pos_embed[:, :t]  # (B, T, W)
        if _FUSED_ATTENTION:
            return l2_normalize(self.proj(self.ln_final(self._fused_pooled(x, attention_mask))))
        bias = (1.0 - attention_mask.to(x.dtype))[:, None, None, :] * MASK_BIAS  # (B, 1, 1, T)
        if self.cfg.causal:
            bias = bias + self.causal_bias[:, :, :t, :t]  # (B, 1, T, T)
        for blk in self.blocks:
            x = blk(x, bias)
        if self.cfg.pooling == "eot":
            last = (attention_mask.sum(dim=1) - 1).clamp(min=0)  # (B,) index of the last attended token
            pooled = x.gather(1, last[:, None, None].expand(-1, 1, x.shape[2]))[:, 0]  # (B, W)
        else:
            pooled = x[:, 0]
        return l2_normalize(self.proj(self.ln_final(pooled)))

    def _fused_pooled(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The pooled (B, W) output of the blocks with fused attention; the last block runs only at the pooled
        position (Block.forward_at)."""
        b, t = attention_mask.shape
        if self.cfg.pooling == "eot":
            pos = (attention_mask.sum(dim=1) - 1).clamp(min=0)  # (B,) the last attended token
        else:
            pos = torch.zeros(b, dtype=torch.long, device=x.device)
        if self.cfg.causal:
            # Right padding: a real token i attends only to j <= i, all real, so the causal mask alone gives the
            # real positions (the pooled one among them) exactly what causal + padding gives, and keeps the
            # kernel on its mask-free path (flash attention). Padded positions differ, and nothing reads them.
            bias = None
            last_mask = (torch.arange(t, device=x.device)[None, :] <= pos[:, None])[:, None, None, :]  # (B,1,1,T)
        else:
            bias = (1.0 - attention_mask.to(x.dtype))[:, None, None, :] * MASK_BIAS  # (B, 1, 1, T)
            last_mask = bias
        for blk in self.blocks[:-1]:
            x = blk(x, bias, self.cfg.causal)
        return self.blocks[-1].forward_at(x, pos, last_mask)


class MIMModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.image = ImageTower(cfg.vision, cfg.embed_dim)
        self.text = TextTower(cfg.text, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(cfg.init_logit_scale))

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        s = self.cfg.vision.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, s, s):
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; expected (batch, 3, {s}, {s}) for the "
                f"{self.cfg.name!r} model; preprocess images with mim.model.preprocess first"
            )
        return self.image(pixel_values)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        t = self.cfg.text.context_length
        if input_ids.ndim != 2 or input_ids.shape[1] != t or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} / attention_mask {tuple(attention_mask.shape)}; expected both "
                f"(batch, {t}); tokenize with the checkpoint's tokenizer"
            )
        return self.text(input_ids, attention_mask)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=self.cfg.max_logit_scale)
