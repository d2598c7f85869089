"""A plug-in file: one training loss, registered under the name a space uses (``loss: poly1``).

    plugins: [./my_losses.py]          # in the space file; relative to the space file's folder
    stage1:
      variants:
        poly1: {loss: poly1}

Poly-1 (Leng et al., ICLR 2022): cross-entropy plus epsilon (1 - p_t), epsilon = 1.
"""

import torch
import torch.nn.functional as F

import study

EPSILON = 1.0  # a plug-in's own constant; the stage's config (cfg) carries every built-in field


@study.register_loss("poly1", description="Poly-1: CE + epsilon (1 - p_t) (Leng et al. 2022)")
def make_poly1(cfg, counts, device):
    """Called once per trial and seed: ``cfg`` is the stage's configuration, ``counts`` the training
    images per class. Returns the loss of a batch."""

    def loss(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        ce = F.cross_entropy(logits.float(), y, reduction="none")
        pt = torch.exp(-ce)
        per_sample = ce + EPSILON * (1 - pt)
        if weights is None:  # weights: deferred re-weighting (drw_epoch) from its epoch on
            return per_sample.mean()
        w = weights[y]
        return (w * per_sample).sum() / w.sum()

    return loss
