"""Read-outs of an encoder during pre-training (pretrain.py): CLS features for k-NN and the probe, the
theta scores a score-ordered guided curriculum masks by, and a supervised head's accuracy."""
from __future__ import annotations

import numpy as np
import torch

from vitsift_core.experiments.mae_data import TrainData, to_input
from vitsift_core.model.classifier import SupervisedViT
from vitsift_core.model.collectors import PatchScoreCollector
from vitsift_core.model.infer import amp_precision, forward_autocast, infer


@torch.no_grad()
def encode(model, images: np.ndarray, device, batch_size: int = 256, amp: bool = False) -> torch.Tensor:
    """CLS features (n, D) float32 on CPU of full images, in eval mode."""
    was = model.training
    model.eval()
    out = []
    for s in range(0, len(images), batch_size):
        x = to_input(images[s:s + batch_size], device)
        with forward_autocast(device, amp_precision(amp)):
            out.append(model.features(x).float().cpu())
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0, model.embed_dim)


def theta_scores(model, images: np.ndarray, counts: np.ndarray, layer: int, device,
                 batch_size: int = 256, precision: str = "auto") -> np.ndarray:
    """Per-patch theta score s_i of ``layer`` (heads averaged) of every image: (n, N) float32."""
    was = model.training
    model.eval()
    out = []
    col = PatchScoreCollector([layer], gamma=1.0, weighted=True, exclude_self=False)
    for s in range(0, len(images), batch_size):
        x = to_input(images[s:s + batch_size], device)
        col.start_batch(torch.from_numpy(np.asarray(counts[s:s + batch_size])).to(device))
        infer(model.encoder, x, forward=lambda xs: model.forward_encoder(xs, None), collector=col,
              layers=[layer], stop_early=True, precision=precision)
        out.append(col.finish_batch()[0][:, 0].numpy())
    model.train(was)
    return np.concatenate(out)


@torch.no_grad()
def head_accuracy(model: SupervisedViT, data: TrainData, cfg, device) -> float:
    """Share of the val images whose arg-max class of the supervised head is their label."""
    was, right = model.training, 0
    model.eval()
    for s in range(0, len(data.val), cfg.eval_batch_size):
        x = to_input(data.val.images[s:s + cfg.eval_batch_size], device)
        with forward_autocast(device, amp_precision(cfg.amp)):
            right += model.accuracy(x, torch.from_numpy(data.y_val[s:s + cfg.eval_batch_size]).to(device))
    model.train(was)
    return right / max(len(data.val), 1)
