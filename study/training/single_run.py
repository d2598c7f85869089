"""``study train``: one stage-1 + stage-2 run at the values a space fixes or defaults to, no search.

Each stage is one multi-seed trial (``study.training.trial``) in ``OUT/stage1`` and ``OUT/stage2-<method>``;
running the same command again resumes an interrupted run. The selected epochs come from the
selection split; the test set is evaluated once per seed at the end.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from study.config.spaces import StudySpace
from study.errors import UserError
from study.fsutil import atomic_write_json, json_plain, read_json, safe_torch_load
from study.layout import TrainPaths, final_weights
from study.training.trial import COMPLETED, TrialSpec, run_trial


def _mean_std(values: list) -> tuple[Any, Any]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None, None
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0


def aggregate(blocks: list[dict | None]) -> tuple[dict | None, dict | None]:
    """Mean and std over seeds of nested metric blocks (numbers, and lists element-wise)."""
    blocks = [b for b in blocks if b is not None]
    if not blocks:
        return None, None
    mean: dict = {}
    std: dict = {}
    for key, v in blocks[0].items():
        vals = [b.get(key) for b in blocks]
        if isinstance(v, dict):
            mean[key], std[key] = aggregate(vals)
        elif isinstance(v, list) and v and all(isinstance(x, (int, float)) or x is None for x in v):
            cols = list(zip(*vals))
            pairs = [_mean_std(list(c)) for c in cols]
            mean[key] = [p[0] for p in pairs]
            std[key] = [p[1] for p in pairs]
        elif isinstance(v, (int, float)) and not isinstance(v, bool) or v is None:
            mean[key], std[key] = _mean_std(vals)
    return mean, std


def _groups(report: dict | None) -> dict | None:
    if report is None:
        return None
    return {k: report[k] for k in ("all", "many", "medium", "few", "per_class")}


def train_once(
    space: StudySpace,
    out: Path,
    data_dir: str | None = None,
    method: str | None = None,
    device: str | None = None,
    console: Callable[[str], None] = print,
    variant: str | None = None,
) -> dict:
    """Run one stage-1 variant (default: the first that feeds stage 2) and one stage-2 method for
    every seed; write and return ``OUT/metrics.json``."""
    from study.data.longtail import load_data, loader_workers
    from study.provenance import provenance
    from study.training.final_eval import evaluate_selected

    method = method or space.train_method
    if method not in space.stage2:
        raise UserError(f"--method {method}: not among this space's stage-2 methods ({', '.join(space.stage2)})")
    variant = variant or space.train_variant
    if variant not in space.variants:
        raise UserError(f"--variant {variant}: not among this space's stage-1 variants ({', '.join(space.variants)})")
    paths = TrainPaths(out)
    out = paths.root
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder")
    identity = {"space": space.to_dict(), "method": method, "variant": variant}
    run_file = paths.run
    if run_file.exists():
        try:
            previous = read_json(run_file)
        except (OSError, ValueError):
            previous = None
        if previous != json_plain(identity):
            raise UserError(
                f"{out} holds a run with a different configuration; pass another --out "
                f"or delete that folder to start over"
            )
    data = load_data(space.data, data_dir)  # before writing anything: a missing dataset writes nothing
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_file, identity)

    cfg1 = space.variants[variant].config
    backbone = cfg1.backbone
    seeds = space.seeds
    workers = loader_workers(data)  # a file dataset's images are decoded in worker processes
    console(
        f"stage 1 ({variant}): {backbone} on {space.data.dataset} ({len(data.train_y)} training images, "
        f"selection on {data.selection_split}), seeds {list(seeds)}"
    )
    rec1 = run_trial(
        TrialSpec("stage1", cfg1, seeds, space.eval, paths.stage1, backbone, experiment="stage1", workers=workers),
        data,
        device,
        log=console,
    )
    if rec1.status != COMPLETED:
        raise UserError(f"stage 1 {rec1.status}: {rec1.reason}; lower the learning rate or weight decay")
    cfg2 = space.stage2[method]
    console(f"stage 2: method {method}")
    rec2 = run_trial(
        TrialSpec(
            "stage2",
            cfg2,
            seeds,
            space.eval,
            paths.stage2(method),
            backbone,
            stage1_dir=paths.stage1,
            experiment=f"stage2-{method}",
            workers=workers,
        ),
        data,
        device,
        log=console,
    )
    if rec2.status != COMPLETED:
        raise UserError(f"stage 2 {rec2.status}: {rec2.reason}; lower the learning rate or weight decay")

    has_val = data.selection_split == "val"
    runs = []
    for seed in seeds:
        s1_state = safe_torch_load(final_weights(paths.stage1, seed))
        tests = evaluate_selected(
            backbone,
            s1_state,
            {"stage1": s1_state, "stage2": safe_torch_load(final_weights(paths.stage2(method), seed))},
            data,
            space.eval,
            device,
            workers=workers,
        )
        test1, test2 = tests["stage1"], tests["stage2"]
        p1, p2 = rec1.per_seed[str(seed)], rec2.per_seed[str(seed)]
        runs.append(
            {
                "seed": seed,
                "stage1": {
                    "val": _groups(p1["selection"]) if has_val else None,
                    "test": _groups(test1),
                    "best_epoch": p1["best_epoch"],
                    "weight_norms": p1["weight_norms"],
                    "balance": p1["balance"],
                    "maxnorm_radius": p1["maxnorm_radius"],
                    "geometry": test1.get("geometry"),
                },
                "stage2": {
                    "method": method,
                    "val": _groups(p2["selection"]) if has_val else None,
                    "test": _groups(test2),
                    "best_epoch": p2["best_epoch"],
                    "weight_norms": p2["weight_norms"],
                    "balance": p2["balance"],
                    "maxnorm_radius": p2["maxnorm_radius"],
                    "maxnorm_binding": p2.get("maxnorm_binding"),
                    "maxnorm_rows_clipped": p2.get("maxnorm_rows_clipped"),
                    "tau": p2["tau"],
                    "geometry": test2.get("geometry"),
                },
            }
        )
    mean, std = {}, {}
    for stage in ("stage1", "stage2"):
        mean[stage], std[stage] = aggregate([r[stage] for r in runs])
    mean["stage2"]["method"] = std["stage2"]["method"] = method
    metrics = {
        "protocol": space.protocol,
        "selection_split": data.selection_split,
        "dataset": space.data.dataset,
        "variant": variant,
        "method": method,
        "runs": runs,
        "mean": mean,
        "std": std,
        "config": {"space": space.to_dict(), "stage1": json_plain(cfg1), "stage2": json_plain(cfg2)},
        "provenance": provenance(seeds, data, {"space_file": space.source}),
    }
    atomic_write_json(paths.metrics, metrics)
    return metrics


def summary_rows(metrics: dict) -> list[tuple[str, str, dict, dict]]:
    """(label, split, mean block, std block) rows for printing."""
    rows = []
    variant = metrics.get("variant", "")
    for stage, label in (("stage1", f"stage 1 ({variant})"), ("stage2", f"stage 2 ({metrics['method']})")):
        for split in ("val", "test"):
            m = metrics["mean"][stage].get(split)
            s = metrics["std"][stage].get(split)
            if m:
                rows.append((label, split, m, s))
    return rows
