"""The two towers of the MIM model: one image encoder (ViT) and one text encoder (transformer).

In the 3-tower model the query-photo and product-photo "towers" are the same image encoder; in the 4-tower
model the title and short-query "towers" are the same text encoder. So a trained model is exactly one
`ImageTower` and one `TextTower`, both ending in a projection and L2 normalisation into one embedding space.

Written for clean export: plain matmul/softmax attention (no fused kernels that trace into odd ONNX ops), named
submodules, and LayerNorm/softmax that an FP16 build can pin to FP32 by node type.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mim.model.config import ModelConfig, TextConfig, VisionConfig

# Additive attention bias for padding. Not -inf: an FP16 engine would turn -inf - -inf into NaN, and -1e4 is
# representable in FP16 while still zeroing the weight after softmax.
MASK_BIAS = -1.0e4


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

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        b, t, w = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, H, T, Dh)
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # (B, H, T, T)
        if bias is not None:
            scores = scores + bias  # (B, 1, 1, T) padding, or (B, 1, T, T) with a causal mask; broadcast over heads
        attn = scores.softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(b, t, w)
        return self.out(y)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


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

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), bias)
        return x + self.mlp(self.ln_2(x))


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
