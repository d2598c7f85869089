"""Features of a frozen backbone, computed once and, for file datasets, cached on disk."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from study.training.evaluation import compute_features


@dataclass(frozen=True)
class FeatureCache:
    """Where the features of a stage-1 trial are cached when trials do not share the results folder:
    ``local``, a folder on this node, and ``shared``, the stage-1 trial's folder in the study's store
    (``study.store``), which every node can read: the first node to compute a split puts it there,
    the others copy it instead of running the backbone again."""

    local: Path
    shared: Any = None


def cached_features(backbone, split, plain, batch: int, amp: bool, cache_dir, name: str):
    """The features of ``split`` under a frozen backbone in eval mode (``compute_features``).

    With ``cache_dir`` (file datasets: the stage-1 trial's folder), they are computed once per
    (stage-1 model, seed, split) and kept there as an fp16 ``features-<name>.npy`` (ImageNet-LT's
    training split with a 2048-d ResNeXt-50: 115,846 x 2048 x 2 bytes = 0.47 GB); every later
    stage-2 trial reads the file instead of running the backbone over the images again. A lock
    file makes concurrent trials wait for the first one's pass rather than repeat it. fp16 keeps
    about three significant digits of each feature, far below what a linear head can resolve; the
    head itself trains in fp32 (the features are cast per batch)."""
    if cache_dir is None:
        return compute_features(backbone, split, plain, batch, amp=amp)
    import fcntl

    import numpy as np

    from study.layout import features_file

    shared = cache_dir.shared if isinstance(cache_dir, FeatureCache) else None
    local = cache_dir.local if isinstance(cache_dir, FeatureCache) else cache_dir
    path = features_file(local, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if not path.exists():
            data = shared.get(path.name) if shared is not None else None
            if data is None:
                buf = io.BytesIO()
                np.save(buf, compute_features(backbone, split, plain, batch, amp=amp).half().cpu().numpy())
                data = buf.getvalue()
                if shared is not None and not shared.exists(path.name):
                    shared.put(path.name, data)  # a node that computed it too puts the same bytes
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
    return torch.from_numpy(np.load(path)).to(split.y.device)
