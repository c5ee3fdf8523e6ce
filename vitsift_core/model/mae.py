"""Masked autoencoder (He et al. 2022) around any timm ViT encoder, with the official MAE decoder, and
the official checkpoints' loader. Masks are (B, N) bool, True = masked, the same count in every row.
"""
from __future__ import annotations

import argparse
import re
from functools import partial
from pathlib import Path

import numpy as np
import timm
import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from vitsift_core.model.registry import read_state_dict, seeded

# top-level names of the official checkpoint's encoder and decoder parameters
OFFICIAL_ENCODER_KEYS = ("cls_token", "pos_embed", "patch_embed", "blocks", "norm")
OFFICIAL_DECODER_KEYS = ("mask_token", "decoder_embed", "decoder_pos_embed", "decoder_blocks",
                         "decoder_norm", "decoder_pred")


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int], n_prefix: int = 0) -> torch.Tensor:
    """The official MAE's fixed 2-D sin-cos position embedding, (n_prefix + Gr * Gc, dim) float32:
    column index in the first half of the channels, row index in the second; prefix rows zero."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    g_r, g_c = int(grid[0]), int(grid[1])
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    rows, cols = np.meshgrid(np.arange(g_r, dtype=np.float64), np.arange(g_c, dtype=np.float64),
                             indexing="ij")

    def one(pos):
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([one(cols), one(rows)], axis=1)
    if n_prefix:
        emb = np.concatenate([np.zeros((n_prefix, dim)), emb], axis=0)
    return torch.from_numpy(emb).float()


def masked_to_ids(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``mask`` (B, N) bool -> ``(ids_keep (B, V), ids_restore (B, N), V)``: visible patches first
    in index order (a stable sort), so ``ids_restore`` puts [visible..., mask tokens...] back."""
    if mask.dtype != torch.bool or mask.ndim != 2:
        raise ValueError(f"mask must be (B, N) bool, got {tuple(mask.shape)} {mask.dtype}")
    n_masked = mask.sum(1)
    if n_masked.numel() and bool((n_masked != n_masked[0]).any()):
        raise ValueError(f"every row of a mask batch needs the same number of masked patches, got "
                         f"{sorted(set(n_masked.tolist()))}; run such masks one image at a time")
    n_visible = mask.shape[1] - (int(n_masked[0]) if n_masked.numel() else 0)
    ids_shuffle = torch.argsort(mask.to(torch.int8), dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    return ids_shuffle[:, :n_visible], ids_restore, n_visible


class MAE(nn.Module):
    """A timm ViT encoder (square patches, absolute ``pos_embed``) plus the official MAE decoder.
    ``fixed_pos_embed``: frozen sin-cos encoder positions; ``init='mae'`` re-initialises the encoder
    like the official code, ``'none'`` keeps its own init (the decoder is MAE-initialised either way).
    """

    def __init__(self, encoder: nn.Module, decoder_embed_dim: int = 512, decoder_depth: int = 8,
                 decoder_num_heads: int = 16, mlp_ratio: float = 4.0, norm_pix_loss: bool = False,
                 fixed_pos_embed: bool = True, init: str = "mae"):
        super().__init__()
        for need in ("patch_embed", "blocks", "norm"):
            if not hasattr(encoder, need):
                raise ValueError(f"encoder {type(encoder).__name__} has no .{need}: not a timm ViT")
        if getattr(encoder, "pos_embed", None) is None:
            raise ValueError("the MAE needs an encoder with an absolute position embedding (pos_embed)")
        if getattr(encoder, "dynamic_img_size", False):
            raise ValueError("dynamic_img_size encoders are not supported; build it at a fixed img_size")
        ps = encoder.patch_embed.patch_size
        ps = (ps, ps) if isinstance(ps, int) else tuple(ps)
        if ps[0] != ps[1]:
            raise ValueError(f"square patches only, got {ps}")
        self.encoder = encoder
        self.patch_size = int(ps[0])
        self.grid = tuple(int(g) for g in encoder.patch_embed.grid_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.num_prefix_tokens = int(getattr(encoder, "num_prefix_tokens", 1))
        self.embed_dim = int(encoder.embed_dim)
        self.norm_pix_loss = bool(norm_pix_loss)
        self.has_decoder = True  # False for encoder-only official checkpoints
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_embed = nn.Linear(self.embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, self.num_prefix_tokens + self.num_patches, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size ** 2 * 3, bias=True)
        self._init(init, fixed_pos_embed)

    def _init(self, init: str, fixed_pos_embed: bool) -> None:
        if init not in ("mae", "none"):
            raise ValueError(f"init must be 'mae' or 'none', got {init!r}")
        self.decoder_pos_embed.data.copy_(
            sincos_pos_embed_2d(self.decoder_pos_embed.shape[-1], self.grid, self.num_prefix_tokens)[None])
        enc = self.encoder
        if fixed_pos_embed:
            n_pre = 0 if getattr(enc, "no_embed_class", False) else self.num_prefix_tokens
            enc.pos_embed.data.copy_(sincos_pos_embed_2d(self.embed_dim, self.grid, n_pre)[None])
            enc.pos_embed.requires_grad_(False)

        def linear_ln(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

        if init == "mae":
            w = enc.patch_embed.proj.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            for name in ("cls_token", "reg_token"):
                t = getattr(enc, name, None)
                if t is not None:
                    nn.init.normal_(t, std=0.02)
            enc.blocks.apply(linear_ln)
            enc.norm.apply(linear_ln)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            m.apply(linear_ln)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, P*P*3), patch pixels in (row, col, channel) order as the official."""
        p = self.patch_size
        b, c, h, w = imgs.shape
        if h % p or w % p or (h // p, w // p) != self.grid:
            raise ValueError(f"images {h}x{w} do not match the {self.grid} grid of {p}px patches")
        x = imgs.reshape(b, c, h // p, p, w // p, p)
        x = torch.einsum("bchpwq->bhwpqc", x)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, P*P*3) -> (B, 3, H, W)."""
        p = self.patch_size
        g_r, g_c = self.grid
        x = x.reshape(x.shape[0], g_r, g_c, p, p, 3)
        x = torch.einsum("bhwpqc->bchpwq", x)
        return x.reshape(x.shape[0], 3, g_r * p, g_c * p)

    def _prefix_and_pos(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Patch tokens with their position embedding added; prefix tokens (with theirs)."""
        enc = self.encoder
        pos = enc.pos_embed
        npt = self.num_prefix_tokens
        no_embed_class = getattr(enc, "no_embed_class", False)
        x = x + (pos if no_embed_class else pos[:, npt:])
        pre = []
        if getattr(enc, "cls_token", None) is not None:
            pre.append(enc.cls_token)
        if getattr(enc, "reg_token", None) is not None:
            pre.append(enc.reg_token)
        if not pre:
            return x, None
        prefix = torch.cat(pre, dim=1)
        if not no_embed_class:
            prefix = prefix + pos[:, :npt]
        return x, prefix.expand(x.shape[0], -1, -1)

    def forward_encoder(self, imgs: torch.Tensor, mask: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode the visible patches (all when ``mask`` is None) -> (latent (B, npt + V, D),
        ids_restore (B, N))."""
        x, ids_restore = self.embed_visible(imgs, mask)
        enc = self.encoder
        for blk in enc.blocks:
            x = blk(x)
        return enc.norm(x), ids_restore

    def embed_visible(self, imgs: torch.Tensor, mask: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's input tokens (B, npt + V, D) before its first block (patch embedding, position
        embedding, visible patches kept, prefix tokens, ``norm_pre``) and ids_restore (B, N)."""
        enc = self.encoder
        x = enc.patch_embed(imgs)
        if x.ndim == 4:  # NHWC output (timm flatten=False)
            x = x.flatten(1, 2)
        x, prefix = self._prefix_and_pos(x)
        b, n, d = x.shape
        if mask is None:
            mask = torch.zeros(b, n, dtype=torch.bool, device=x.device)
        ids_keep, ids_restore, _ = masked_to_ids(mask.to(x.device))
        x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, d))
        if prefix is not None:
            x = torch.cat([prefix, x], dim=1)
        x = enc.norm_pre(x) if hasattr(enc, "norm_pre") else x
        return x, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """``latent`` (B, npt + V, D) -> pixel predictions (B, N, P*P*3) for every patch."""
        npt = self.num_prefix_tokens
        x = self.decoder_embed(latent)
        b, t, d = x.shape
        n = ids_restore.shape[1]
        tokens = torch.cat([x[:, npt:], self.mask_token.expand(b, n - (t - npt), -1)], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore[..., None].expand(-1, -1, d))
        x = torch.cat([x[:, :npt], tokens], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, npt:]

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """What the decoder regresses: patchified input, per-patch normalised with norm_pix_loss."""
        t = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = t.mean(dim=-1, keepdim=True)
            var = t.var(dim=-1, keepdim=True)
            t = (t - mean) / (var + 1e-6) ** 0.5
        return t

    def patch_errors(self, imgs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, (B, N), in the loss's pixel space."""
        return ((pred.float() - self.target(imgs).float()) ** 2).mean(dim=-1)

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor):
        """-> (loss, pred (B, N, P*P*3), mask); loss = mean patch error over the masked patches only."""
        if mask.shape != (imgs.shape[0], self.num_patches):
            raise ValueError(f"mask shape {tuple(mask.shape)} != (batch, N) = "
                             f"({imgs.shape[0]}, {self.num_patches})")
        latent, ids_restore = self.forward_encoder(imgs, mask)
        return self.decode_loss(imgs, latent, ids_restore, mask)

    def decode_loss(self, imgs: torch.Tensor, latent: torch.Tensor, ids_restore: torch.Tensor, mask: torch.Tensor):
        """:meth:`forward` from the encoder's output ``latent`` (B, npt + V, D) for ``mask`` (B, N)."""
        pred = self.forward_decoder(latent, ids_restore)
        err = self.patch_errors(imgs, pred)
        m = mask.to(err.dtype)
        loss = (err * m).sum() / m.sum().clamp_min(1)
        return loss, pred, mask

    @torch.no_grad()
    def features(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, D) float32 features of unmasked images: the final CLS token, else the mean patch token."""
        latent, _ = self.forward_encoder(imgs, None)
        if getattr(self.encoder, "cls_token", None) is not None:
            return latent[:, 0].float()
        return latent[:, self.num_prefix_tokens:].mean(1).float()

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Display of a masked batch: ``pred_img`` (B, 3, H, W) (norm_pix_loss undone with each
        patch's true mean/std, as the official visualisation), ``pasted`` (input with the masked
        patches predicted), ``errors`` (B, N) in loss space, ``mask``."""
        latent, ids_restore = self.forward_encoder(imgs, mask)
        pred = self.forward_decoder(latent, ids_restore).float()
        errors = self.patch_errors(imgs, pred)
        if self.norm_pix_loss:
            t = self.patchify(imgs.float())
            pred = pred * (t.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + t.mean(dim=-1, keepdim=True)
        pred_img = self.unpatchify(pred)
        m = self.unpatchify(mask[..., None].float().expand(-1, -1, self.patch_size ** 2 * 3))
        pasted = imgs.float() * (1 - m) + pred_img * m
        return {"pred_img": pred_img, "pasted": pasted, "errors": errors, "mask": mask}


def build_mae(encoder: str = "vit_tiny_patch16_224", *, img_size: int | None = None,
              patch_size: int | None = None, depth: int | None = None, embed_dim: int | None = None,
              num_heads: int | None = None, decoder_embed_dim: int = 512, decoder_depth: int = 8,
              decoder_num_heads: int = 16, mlp_ratio: float = 4.0, norm_pix_loss: bool = False,
              fixed_pos_embed: bool = True, init: str = "mae", seed: int | None = None) -> MAE:
    """A fresh MAE on ``timm.create_model(encoder, pretrained=False, num_classes=0)``; the size
    arguments override the architecture's (None keeps them); ``seed``: init under this torch seed."""
    kw: dict = {"num_classes": 0, "dynamic_img_size": False}
    for k, v in (("img_size", img_size), ("patch_size", patch_size), ("depth", depth),
                 ("embed_dim", embed_dim), ("num_heads", num_heads)):
        if v is not None:
            kw[k] = int(v)

    def make():
        enc = timm.create_model(encoder, pretrained=False, **kw)
        return MAE(enc, decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio,
                   norm_pix_loss, fixed_pos_embed, init)

    return make() if seed is None else seeded(int(seed), make)


#: the one class an official checkpoint may hold beyond tensors and plain data: training checkpoints
#: of facebookresearch/mae (``misc.save_model``) carry the run's ``args``, an attribute bag whose
#: values still pass torch's weights-only checks; anything else is refused (model.registry)
OFFICIAL_ALLOWED_CLASSES = (argparse.Namespace,)
_HEADS_BY_DIM = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}


def official_to_vitsift(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official MAE keys -> :class:`MAE`'s (encoder keys get ``encoder.``): ``(mapped, ignored)``;
    classifier leftovers (``head.*``, ``fc_norm.*``) are ignored, anything else raises KeyError."""
    out, ignored, unknown = {}, [], []
    for k, v in sd.items():
        top = k.split(".", 1)[0]
        if top in OFFICIAL_DECODER_KEYS:
            out[k] = v
        elif top in OFFICIAL_ENCODER_KEYS:
            out["encoder." + k] = v
        elif top in ("head", "fc_norm"):
            ignored.append(k)
        else:
            unknown.append(k)
    if unknown:
        more = " ..." if len(unknown) > 10 else ""
        raise KeyError(f"keys not in the official MAE layout: {unknown[:10]}{more}")
    return out, ignored


def _depth(sd, prefix: str) -> int:
    idx = {int(m.group(1)) for k in sd for m in [re.match(rf"{prefix}\.(\d+)\.", k)] if m}
    return max(idx) + 1 if idx else 0


def _official_arch(sd: dict, num_heads: int | None) -> dict:
    """The encoder's VisionTransformer arguments, read from the checkpoint's tensors."""
    if "cls_token" not in sd or "patch_embed.proj.weight" not in sd or "pos_embed" not in sd:
        raise KeyError("not an official MAE checkpoint: "
                       "cls_token / pos_embed / patch_embed.proj.weight missing")
    dim = int(sd["cls_token"].shape[-1])
    patch = int(sd["patch_embed.proj.weight"].shape[-1])
    n_tok = int(sd["pos_embed"].shape[1])
    g = int(round((n_tok - 1) ** 0.5))
    if g * g != n_tok - 1:
        raise ValueError(f"pos_embed has {n_tok} rows: not 1 + a square grid")
    heads = num_heads or _HEADS_BY_DIM.get(dim)
    if heads is None:
        raise ValueError(f"cannot infer the number of heads for width {dim}; pass num_heads")
    return dict(img_size=g * patch, patch_size=patch, embed_dim=dim, depth=_depth(sd, "blocks"),
                num_heads=heads, mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / dim)


def _load_checked(mae: MAE, mapped: dict, has_decoder: bool) -> None:
    own = mae.state_dict()
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in mapped.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    extra = [k for k in mapped if k not in own]
    if bad or extra:
        raise ValueError("checkpoint does not fit the inferred architecture: "
                         + "; ".join(bad + extra)[:2000])
    missing = [k for k in own if k not in mapped]
    missing_enc = [k for k in missing if k.startswith("encoder.")]
    if missing_enc:
        raise KeyError(f"checkpoint lacks encoder tensors: {missing_enc[:10]}")
    if has_decoder and missing:
        raise KeyError(f"checkpoint has a decoder but lacks: {missing[:10]}")
    mae.load_state_dict({k: v.float() for k, v in mapped.items()}, strict=False)


def load_official_mae(path_or_sd, *, num_heads: int | None = None, decoder_num_heads: int = 16,
                      norm_pix_loss: bool = False, device: str | torch.device = "cpu") -> MAE:
    """An :class:`MAE` with an official checkpoint's weights (file or state dict), every shape checked.

    The architecture comes from the tensors, the heads from ``num_heads`` (default by width) and
    ``decoder_num_heads``. Encoder-only files give ``has_decoder = False`` (features only).
    """
    if not isinstance(path_or_sd, dict):
        path_or_sd = Path(path_or_sd).expanduser()
        if not path_or_sd.is_file():
            raise FileNotFoundError(f"MAE checkpoint not found: {path_or_sd}")
    sd = read_state_dict(path_or_sd, allow=OFFICIAL_ALLOWED_CLASSES)
    arch = _official_arch(sd, num_heads)
    has_decoder = "decoder_embed.weight" in sd
    dec_dim = int(sd["decoder_embed.weight"].shape[0]) if has_decoder else 512
    dec_depth = _depth(sd, "decoder_blocks") if has_decoder else 8
    enc = VisionTransformer(**arch, qkv_bias=True, num_classes=0, class_token=True, global_pool="token")
    mae = MAE(enc, dec_dim, dec_depth, decoder_num_heads, arch["mlp_ratio"], norm_pix_loss,
              fixed_pos_embed=True, init="mae")
    mapped, _ignored = official_to_vitsift(sd)
    _load_checked(mae, mapped, has_decoder)
    mae.has_decoder = has_decoder
    return mae.to(device).eval()
