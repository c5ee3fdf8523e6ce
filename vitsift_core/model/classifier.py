"""The supervised twin of :class:`~vitsift_core.model.mae.MAE`: the same encoder (built and initialised
by ``build_mae``, so both objectives start from identical weights) with a linear head on the final CLS
token, trained with cross-entropy on the image labels (``vitsift pretrain --objective supervised``).
"""
from __future__ import annotations

import torch
from torch import nn

from vitsift_core.model.mae import MAE
from vitsift_core.model.registry import seeded


class SupervisedViT(nn.Module):
    """``encoder`` of an MAE (the decoder is dropped) + ``head``: Linear(D, n_classes), seeded.

    Shares MAE's encoder pass (``forward_encoder``, ``features``) so k-NN, probe and the theta
    scores read the encoder exactly as for an MAE run; ``forward(x, y)`` -> (loss, logits, y)
    mirrors MAE's ``(loss, pred, mask)`` so one training step serves both objectives.
    """

    # the MAE's encoder-side methods only use the attributes copied in __init__
    forward_encoder = MAE.forward_encoder
    embed_visible = MAE.embed_visible
    _prefix_and_pos = MAE._prefix_and_pos
    features = MAE.features

    def __init__(self, mae: MAE, n_classes: int, seed: int = 0):
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"a supervised objective needs at least 2 classes, got {n_classes}")
        self.encoder = mae.encoder
        for k in ("patch_size", "grid", "num_patches", "num_prefix_tokens", "embed_dim"):
            setattr(self, k, getattr(mae, k))
        self.n_classes = int(n_classes)

        def head():
            h = nn.Linear(self.embed_dim, self.n_classes)
            nn.init.trunc_normal_(h.weight, std=0.02)   # timm's ViT head init (bias 0)
            nn.init.zeros_(h.bias)
            return h

        self.head = seeded(int(seed) + 7919, head)      # its own stream: the encoder's init is untouched

    def logits(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, n_classes) from the final CLS token (mean patch token without CLS)."""
        latent, _ = self.forward_encoder(imgs, None)
        z = latent[:, 0] if getattr(self.encoder, "cls_token", None) is not None \
            else latent[:, self.num_prefix_tokens:].mean(1)
        return self.head(z)

    def forward(self, imgs: torch.Tensor, labels: torch.Tensor):
        """-> (mean cross-entropy, logits (B, n_classes), labels (B,))."""
        if labels.shape != (imgs.shape[0],):
            raise ValueError(f"labels must be (batch,) = ({imgs.shape[0]},), got {tuple(labels.shape)}")
        out = self.logits(imgs)
        return nn.functional.cross_entropy(out.float(), labels.long()), out, labels

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, labels: torch.Tensor) -> int:
        """Number of images in the batch whose arg-max class is their label."""
        return int((self.logits(x).argmax(1) == labels).sum())
