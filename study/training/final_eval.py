"""The final evaluation: each selected configuration once per seed on the test set, the one
function both ``study run`` and ``study train`` evaluate through."""

from __future__ import annotations

from study.config.schema import EvalConfig
from study.data.device import Augmenter, make_split
from study.data.longtail import LTData
from study.training.evaluation import accuracy_report, compute_features, logits_from_features
from study.training.heads import AffineHead, frozen_model, stage1_head_state
from study.training.trainers import pick_device


def evaluate_selected(
    backbone: str,
    stage1_state: dict,
    finals: dict[str, dict],
    data: LTData,
    eval_cfg: EvalConfig | None = None,
    device=None,
    split: str = "test",
    geometry: bool = True,
    workers: int = 0,
) -> dict[str, dict]:
    """Accuracy reports on ``split`` (the test set) of selected models of one seed: ``finals`` maps a
    key to a trial's final state — a stage-1 model (its own backbone and classifier) or a stage-2
    head (``{"head": ..., "buffers"?: ...}``) on ``stage1_state``'s backbone. The backbone's features
    are computed once and shared by every head, except for heads whose stage 2 updated batch-norm
    statistics (``bn_mode: train``), which carry their own buffers; a stage-1 entry that *is*
    ``stage1_state`` shares them too. Both ``study run`` and ``study train`` evaluate through this
    function.

    With ``geometry``, each report also has ``geometry``: the feature measures of
    :func:`study.training.geometry.feature_summary` on the training split and on ``split`` (unaugmented,
    unflipped features of the backbone the head runs on)."""
    from study.training.geometry import feature_summary

    eval_cfg = eval_cfg or EvalConfig()
    device = pick_device(device)
    x, y = data.split(split)
    plain = Augmenter(data.spec, device, False)
    batch = eval_cfg.batch_for(device)
    flip = bool(eval_cfg.tta_flip and data.spec.flip)
    eval_split = make_split(data, split, device, workers=workers)
    train_split = make_split(data, "train", device, workers=workers) if geometry else None
    cache: dict[str, tuple] = {}

    def features(key: str, model_backbone) -> tuple:
        """(eval features, flipped eval features or None, geometry) of one backbone."""
        if key not in cache:
            f = compute_features(model_backbone, eval_split, plain, batch, flip=flip)
            f, ff = f if flip else (f, None)
            geo = None
            if geometry:
                ft = compute_features(model_backbone, train_split, plain, batch)
                geo = {
                    "train": feature_summary(ft, data.train_y, data.train_counts),
                    split: feature_summary(f, y, data.train_counts),
                }
            cache[key] = (f, ff, geo)
        return cache[key]

    out = {}
    for key, state in finals.items():
        if "head" not in state and state is stage1_state:  # the backbone the heads share: one pass
            if "shared" not in cache:
                features("shared", frozen_model(backbone, stage1_state, data, device).backbone)
            head, feats = AffineHead.from_state(stage1_head_state(state)), cache["shared"]
        elif "head" not in state:  # another stage-1 model: its own backbone and classifier
            model = frozen_model(backbone, state, data, device)
            head, feats = AffineHead.from_state(stage1_head_state(state)), features(key, model.backbone)
        elif state.get("buffers"):
            model = frozen_model(backbone, stage1_state, data, device, buffers=state["buffers"])
            head, feats = AffineHead.from_state(state["head"]), features(key, model.backbone)
        else:
            if "shared" not in cache:
                features("shared", frozen_model(backbone, stage1_state, data, device).backbone)
            head, feats = AffineHead.from_state(state["head"]), cache["shared"]
        f, ff, geo = feats
        logits = logits_from_features(head.to(device), f, ff)
        out[key] = accuracy_report(
            logits.argmax(1).cpu().numpy(), y, data.train_counts, data.many_threshold, data.few_threshold
        )
        if geo is not None:
            out[key]["geometry"] = geo
    return out
