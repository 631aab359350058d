"""Independent reference forwards of the four VFMs, written from the authors' loaders (test helper).

Each function builds a checkpoint in the official file layout from random tensors and computes
what the authors' model computes with it (NVlabs/RADIO ``ViTPatchGenerator`` + timm blocks,
facebookresearch/dinov2 ``DinoVisionTransformer``, facebookresearch/dinov3 with RoPE, PE-Spatial's
``VisionTransformer`` with ``Rope2D``), with plain tensor operations on the file's tensors: no
timm module is called, so a wrong key conversion or a different position rule shows up.
Width 64, 4 heads (head dim 16), 2 blocks: the sizes of the ``vfm:tiny_*`` configurations.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

D, HEADS, DEPTH = 64, 4, 2
HD = D // HEADS


def _rand(gen: torch.Generator, *shape: int, scale: float = 0.2) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale


def _block_tensors(gen: torch.Generator, prefix: str, pe: bool = False, layer_scale: bool = True,
                   dinov3_bias_mask: bool = False) -> dict[str, torch.Tensor]:
    """One block's tensors under the official key names (PE: open_clip-style names)."""
    if pe:
        names = {"n1": "ln_1", "qkvw": "attn.in_proj_weight", "qkvb": "attn.in_proj_bias", "proj": "attn.out_proj",
                 "n2": "ln_2", "fc1": "mlp.c_fc", "fc2": "mlp.c_proj"}
    else:
        names = {"n1": "norm1", "qkvw": "attn.qkv.weight", "qkvb": "attn.qkv.bias", "proj": "attn.proj",
                 "n2": "norm2", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
    t = {
        f"{prefix}{names['n1']}.weight": 1 + _rand(gen, D), f"{prefix}{names['n1']}.bias": _rand(gen, D),
        f"{prefix}{names['qkvw']}": _rand(gen, 3 * D, D), f"{prefix}{names['qkvb']}": _rand(gen, 3 * D),
        f"{prefix}{names['proj']}.weight": _rand(gen, D, D), f"{prefix}{names['proj']}.bias": _rand(gen, D),
        f"{prefix}{names['n2']}.weight": 1 + _rand(gen, D), f"{prefix}{names['n2']}.bias": _rand(gen, D),
        f"{prefix}{names['fc1']}.weight": _rand(gen, 4 * D, D), f"{prefix}{names['fc1']}.bias": _rand(gen, 4 * D),
        f"{prefix}{names['fc2']}.weight": _rand(gen, D, 4 * D), f"{prefix}{names['fc2']}.bias": _rand(gen, D),
    }
    if layer_scale:
        t[f"{prefix}ls1.gamma"] = 0.5 + _rand(gen, D)
        t[f"{prefix}ls2.gamma"] = 0.5 + _rand(gen, D)
    if dinov3_bias_mask:  # DINOv3 LinearKMaskedBias: q and v biases used, k bias multiplied by 0
        t[f"{prefix}attn.qkv.bias_mask"] = torch.cat([torch.ones(D), torch.zeros(D), torch.ones(D)])
    t["_names"] = names  # type: ignore[assignment]
    return t


def _block(x: torch.Tensor, t: dict, prefix: str, eps: float, rope=None, bias_mask: bool = False) -> torch.Tensor:
    """Pre-norm ViT block with the file's tensors; ``rope(q_or_k)`` rotates (B, H, T, hd)."""
    n = t["_names"]
    b, tok, _ = x.shape
    h = F.layer_norm(x, (D,), t[f"{prefix}{n['n1']}.weight"], t[f"{prefix}{n['n1']}.bias"], eps)
    bias = t[f"{prefix}{n['qkvb']}"]
    if bias_mask:
        bias = bias * t[f"{prefix}attn.qkv.bias_mask"]
    q, k, v = (h @ t[f"{prefix}{n['qkvw']}"].T + bias).split(D, dim=-1)
    q, k, v = (z.reshape(b, tok, HEADS, HD).transpose(1, 2) for z in (q, k, v))
    if rope is not None:
        q, k = rope(q), rope(k)
    a = ((q @ k.transpose(-1, -2)) * HD**-0.5).softmax(-1) @ v
    a = a.transpose(1, 2).reshape(b, tok, D) @ t[f"{prefix}{n['proj']}.weight"].T + t[f"{prefix}{n['proj']}.bias"]
    x = x + a * t.get(f"{prefix}ls1.gamma", 1.0)
    h = F.layer_norm(x, (D,), t[f"{prefix}{n['n2']}.weight"], t[f"{prefix}{n['n2']}.bias"], eps)
    h = F.gelu(h @ t[f"{prefix}{n['fc1']}.weight"].T + t[f"{prefix}{n['fc1']}.bias"])
    h = h @ t[f"{prefix}{n['fc2']}.weight"].T + t[f"{prefix}{n['fc2']}.bias"]
    return x + h * t.get(f"{prefix}ls2.gamma", 1.0)


def _strip(blocks: list[dict]) -> dict[str, torch.Tensor]:
    return {k: v for t in blocks for k, v in t.items() if k != "_names"}


# --- C-RADIOv3 ---------------------------------------------------------------------------------

RADIO_PATCH, RADIO_GRID, RADIO_PREFIX = 16, 128, 8  # 128 x 128 positions (2048 px); 1 CLS + 7 registers


def radio_checkpoint(seed: int = 0, hub_format: bool = True) -> tuple[dict, list[dict]]:
    """A C-RADIOv3 checkpoint: torch.hub layout (``args``, ``state_dict`` with ``base_model.`` /
    ``input_conditioner.`` and teacher heads) or the Hugging Face ``radio_model.`` layout."""
    gen = torch.Generator().manual_seed(seed)
    blocks = [_block_tensors(gen, f"blocks.{i}.") for i in range(DEPTH)]
    model = {
        "patch_generator.embedder.weight": _rand(gen, D, 3 * RADIO_PATCH**2),
        "patch_generator.pos_embed": _rand(gen, 1, RADIO_GRID**2, D),
        "patch_generator.cls_token.token": _rand(gen, RADIO_PREFIX, D),
        **_strip(blocks),
    }
    cond = {"norm_mean": torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1),
            "norm_std": torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)}
    if hub_format:
        sd = {**{f"base_model.{k}": v for k, v in model.items()}, **{f"input_conditioner.{k}": v for k, v in cond.items()},
              "_heads.0.weight": _rand(gen, 8, D), "_feature_projections.0.weight": _rand(gen, 8, D)}
        return {"args": argparse.Namespace(model="vit_large_patch16_224", dtype=torch.float16,
                                           teachers=[{"name": "clip"}]), "state_dict": sd}, blocks
    sd = {**{f"radio_model.model.{k}": v for k, v in model.items()},
          **{f"radio_model.input_conditioner.{k}": v for k, v in cond.items()}, "radio_model.summary_idxs": torch.arange(3)}
    return sd, blocks


def radio_reference(sd: dict, blocks: list[dict], x: torch.Tensor) -> torch.Tensor:
    """RADIO's spatial features of a conditioned input ``(1, 3, H, W)``: ``(N, D)``."""
    g = {k.split("patch_generator.", 1)[1]: v for k, v in sd.items() if "patch_generator." in k}
    p = RADIO_PATCH
    gh, gw = x.shape[-2] // p, x.shape[-1] // p
    patches = x.reshape(1, 3, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(1, gh * gw, 3 * p * p)  # (c yy xx)
    emb = patches @ g["embedder.weight"].T
    pos = g["pos_embed"].reshape(1, RADIO_GRID, RADIO_GRID, D).permute(0, 3, 1, 2)
    if (gh, gw) != (RADIO_GRID, RADIO_GRID):  # CPE eval: square of the longer side, top-left window
        side = max(gh, gw)
        pos = F.interpolate(pos, size=(side, side), mode="bilinear", align_corners=False)[:, :, :gh, :gw]
    tokens = torch.cat([g["cls_token.token"][None], emb + pos.flatten(2).transpose(1, 2)], dim=1)
    for i, t in enumerate(blocks):
        tokens = _block(tokens, t, f"blocks.{i}.", 1e-6)
    return tokens[0, RADIO_PREFIX:]


# --- DINOv2 ------------------------------------------------------------------------------------

DINOV2_PATCH, DINOV2_GRID = 14, 37


def dinov2_checkpoint(seed: int = 0) -> tuple[dict, list[dict]]:
    gen = torch.Generator().manual_seed(seed)
    blocks = [_block_tensors(gen, f"blocks.{i}.") for i in range(DEPTH)]
    sd = {"cls_token": _rand(gen, 1, 1, D), "pos_embed": _rand(gen, 1, 1 + DINOV2_GRID**2, D),
          "register_tokens": _rand(gen, 1, 4, D), "mask_token": _rand(gen, 1, D),
          "patch_embed.proj.weight": _rand(gen, D, 3, DINOV2_PATCH, DINOV2_PATCH), "patch_embed.proj.bias": _rand(gen, D),
          "norm.weight": 1 + _rand(gen, D), "norm.bias": _rand(gen, D), **_strip(blocks)}
    return sd, blocks


def dinov2_reference(sd: dict, blocks: list[dict], x: torch.Tensor) -> torch.Tensor:
    """DINOv2 (register model): last block, final norm, patch tokens ``(N, D)``."""
    p, g = DINOV2_PATCH, DINOV2_GRID
    patches = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)
    gh, gw = patches.shape[-2:]
    tokens = torch.cat([sd["cls_token"], patches.flatten(2).transpose(1, 2)], dim=1)
    pos = sd["pos_embed"]
    if (gh, gw) != (g, g):  # interpolate_pos_encoding: bicubic, antialias, to the size (offset 0)
        patch_pos = F.interpolate(pos[:, 1:].reshape(1, g, g, D).permute(0, 3, 1, 2), size=(gh, gw),
                                  mode="bicubic", antialias=True)
        pos = torch.cat([pos[:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, gh * gw, D)], dim=1)
    tokens = tokens + pos
    tokens = torch.cat([tokens[:, :1], sd["register_tokens"], tokens[:, 1:]], dim=1)
    for i, t in enumerate(blocks):
        tokens = _block(tokens, t, f"blocks.{i}.", 1e-6)
    tokens = F.layer_norm(tokens, (D,), sd["norm.weight"], sd["norm.bias"], 1e-6)
    return tokens[0, 5:]


# --- DINOv3 ------------------------------------------------------------------------------------

DINOV3_PATCH = 16


def dinov3_checkpoint(seed: int = 0) -> tuple[dict, list[dict]]:
    gen = torch.Generator().manual_seed(seed)
    blocks = [_block_tensors(gen, f"blocks.{i}.", dinov3_bias_mask=True) for i in range(DEPTH)]
    # the release stores its RoPE periods rounded to bfloat16; scaled here so that loading them is visible
    periods = (1.3 * 100 ** (2 * torch.arange(HD // 4, dtype=torch.float32) / (HD // 2))).bfloat16().float()
    sd = {"cls_token": _rand(gen, 1, 1, D), "storage_tokens": _rand(gen, 1, 4, D), "mask_token": _rand(gen, 1, D),
          "patch_embed.proj.weight": _rand(gen, D, 3, DINOV3_PATCH, DINOV3_PATCH), "patch_embed.proj.bias": _rand(gen, D),
          "rope_embed.periods": periods, "norm.weight": 1 + _rand(gen, D), "norm.bias": _rand(gen, D), **_strip(blocks)}
    return sd, blocks


def dinov3_rope(periods: torch.Tensor, gh: int, gw: int, prefix: int):
    """DINOv3 RopePositionEmbedding (eval, normalize_coords='separate') + rope_apply on patch tokens."""
    ch, cw = torch.arange(0.5, gh) / gh, torch.arange(0.5, gw) / gw
    coords = torch.stack(torch.meshgrid(ch, cw, indexing="ij"), dim=-1).flatten(0, 1) * 2.0 - 1.0
    angles = (2 * math.pi * coords[:, :, None] / periods[None, None, :]).flatten(1, 2).tile(2)
    sin, cos = angles.sin(), angles.cos()

    def rope(z: torch.Tensor) -> torch.Tensor:
        head, body = z[:, :, :prefix], z[:, :, prefix:]
        x1, x2 = body.chunk(2, dim=-1)
        return torch.cat([head, body * cos + torch.cat([-x2, x1], dim=-1) * sin], dim=2)

    return rope


def dinov3_reference(sd: dict, blocks: list[dict], x: torch.Tensor) -> torch.Tensor:
    """DINOv3: cls + 4 storage tokens + patches, RoPE, last block, final norm, patch tokens ``(N, D)``."""
    patches = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=DINOV3_PATCH)
    gh, gw = patches.shape[-2:]
    tokens = torch.cat([sd["cls_token"], sd["storage_tokens"], patches.flatten(2).transpose(1, 2)], dim=1)
    rope = dinov3_rope(sd["rope_embed.periods"], gh, gw, 5)
    for i, t in enumerate(blocks):
        tokens = _block(tokens, t, f"blocks.{i}.", 1e-5, rope=rope, bias_mask=True)
    tokens = F.layer_norm(tokens, (D,), sd["norm.weight"], sd["norm.bias"], 1e-5)
    return tokens[0, 5:]


# --- PE-Spatial --------------------------------------------------------------------------------

PE_PATCH, PE_GRID = 14, 32


def pe_checkpoint(seed: int = 0) -> tuple[dict, list[dict]]:
    gen = torch.Generator().manual_seed(seed)
    blocks = [_block_tensors(gen, f"transformer.resblocks.{i}.", pe=True, layer_scale=False) for i in range(DEPTH)]
    sd = {"conv1.weight": _rand(gen, D, 3, PE_PATCH, PE_PATCH), "class_embedding": _rand(gen, D),
          "positional_embedding": _rand(gen, 1 + PE_GRID**2, D), "ln_pre.weight": 1 + _rand(gen, D),
          "ln_pre.bias": _rand(gen, D), **_strip(blocks)}
    return sd, blocks


def pe_reference(sd: dict, blocks: list[dict], x: torch.Tensor) -> torch.Tensor:
    """PE-Spatial ``forward_features(x, strip_cls_token=True)`` (no ln_post): ``(N, D)``."""
    patches = F.conv2d(x, sd["conv1.weight"], stride=PE_PATCH)  # floor grid
    gh, gw = patches.shape[-2:]
    tokens = torch.cat([sd["class_embedding"].view(1, 1, D), patches.flatten(2).transpose(1, 2)], dim=1)
    pos = sd["positional_embedding"]
    if (gh, gw) != (PE_GRID, PE_GRID):  # _sample_abs_posemb: bilinear, align_corners=False
        patch_pos = F.interpolate(pos[1:].reshape(1, PE_GRID, PE_GRID, D).permute(0, 3, 1, 2), size=(gh, gw),
                                  mode="bilinear", align_corners=False)
        pos = torch.cat([pos[:1], patch_pos.permute(0, 2, 3, 1).reshape(gh * gw, D)], dim=0)
    tokens = F.layer_norm(tokens + pos[None], (D,), sd["ln_pre.weight"], sd["ln_pre.bias"], 1e-5)
    # Rope2D: RotaryEmbedding(head_dim // 2) "lang" freqs, positions 1.., CLS at 0, x then y, pairs interleaved
    freqs = 1.0 / (10000 ** (torch.arange(0, HD // 2, 2)[: HD // 4].float() / (HD // 2)))
    fy = ((torch.arange(gh) + 1).float()[:, None] * freqs).repeat_interleave(2, -1)[:, None].expand(gh, gw, -1)
    fx = ((torch.arange(gw) + 1).float()[:, None] * freqs).repeat_interleave(2, -1)[None].expand(gh, gw, -1)
    angles = torch.cat([torch.zeros(1, HD), torch.cat([fx, fy], dim=-1).reshape(gh * gw, HD)], dim=0)

    def rope(z: torch.Tensor) -> torch.Tensor:
        pairs = z.reshape(*z.shape[:-1], HD // 2, 2)
        rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).reshape(z.shape)
        return z * angles.cos() + rotated * angles.sin()

    for i, t in enumerate(blocks):
        tokens = _block(tokens, t, f"transformer.resblocks.{i}.", 1e-5, rope=rope)
    return tokens[0, 1:]
