"""PNG plots of a study's results (``study plot``; written to ``STUDY/plots/`` when a study finishes).

- ``weight_norms.png``: per-class classifier weight norm against class index, one small panel per
  stage-1 baseline and stage-2 method (the paper's Figure 2 layout), mean over seeds with a min-max
  band, one shared y axis;
- ``per_class_accuracy.png``: per-class test accuracy against class index, one line per method, with
  the many/medium/few boundaries marked;
- ``search-<stage>-<method>.png``: for each searched stage/method, the objective by trial with the
  best-so-far line, and the objective against each searched parameter (log axis for ``loguniform``).

Matplotlib is imported lazily and used through ``Figure`` objects only (no pyplot, so no GUI backend
and no global state); nothing here imports torch or Ray.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from study.config.groups import shot_groups
from study.fsutil import atomic_write_bytes
from study.layout import COMPLETED, FAILURE_STATUSES, ExperimentInfo
from study.results.builders import label, long_label, split_word
from study.results.loading import Results, as_results


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _methods(res: Results) -> list[tuple[ExperimentInfo, str]]:
    return [(e, m) for e in res.experiments for m in res.methods(e)]


def _title(res: Results, exp: ExperimentInfo, method: str) -> str:
    return long_label(res, exp, method) + (" (stage 1)" if exp.stage == "stage1" else "")


def _groups(res: Results) -> list[str]:
    """Each class's group (classes sorted by training count); empty without counts or thresholds."""
    data = res.header.data
    counts, many, few = data.train_counts or [], data.many_threshold, data.few_threshold
    if not counts or many is None or few is None:
        return []
    return [str(g) for g in shot_groups(counts, many, few)]


def _mark_groups(ax: Any, res: Results, text: bool = False) -> None:
    groups = _groups(res)
    marks = [(i - 0.5, groups[i]) for i in range(1, len(groups)) if groups[i] != groups[i - 1]]
    for x, _ in marks:
        ax.axvline(x, color="0.6", ls=":", lw=1)
    if text and groups:
        edges = [-0.5] + [x for x, _ in marks] + [len(groups) - 0.5]
        names = [groups[0]] + [g for _, g in marks]
        for (lo, hi), g in zip(zip(edges, edges[1:]), names):
            ax.text(
                (lo + hi) / 2,
                1.01,
                g,
                transform=ax.get_xaxis_transform(),
                ha="center",
                va="bottom",
                fontsize=8,
                color="0.35",
            )


def weight_norm_figure(res: Results) -> Any:
    """Figure 2 layout: one panel per method, mean per-class weight norm over seeds with a min-max
    band, shared y axis. None when no method has per-class norms."""
    pc = res.per_class.dropna(subset=["weight_norm"])
    panels = [(e, m, pc[(pc["experiment"] == e.name) & (pc["method"] == m)]) for e, m in _methods(res)]
    panels = [p for p in panels if not p[2].empty]
    if not panels:
        return None
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = _figure(3.0 * ncols, 2.3 * nrows + 0.4)
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False).ravel()
    for ax, (e, m, df) in zip(axes, panels):
        g = df.groupby("class")["weight_norm"]
        x = np.asarray(g.mean().index, dtype=float)
        ax.fill_between(x, g.min().to_numpy(), g.max().to_numpy(), color="C0", alpha=0.25, lw=0)
        ax.plot(x, g.mean().to_numpy(), "o-", color="C0", ms=3, lw=1.2)
        _mark_groups(ax, res)
        ax.set_title(_title(res, e, m), fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    for ax in axes[::ncols]:
        ax.set_ylabel("weight norm")
    for j in range(ncols):  # the lowest panel of each column carries the x axis (the last row may be short)
        ax = axes[max(i for i in range(j, len(panels), ncols))]
        ax.xaxis.set_tick_params(labelbottom=True)
        ax.set_xlabel("class index (by training count)")
    n = int(pc["seed"].nunique())
    fig.suptitle(
        f"Per-class classifier weight norms ({res.header.study}; mean over {n} seed{'s' * (n != 1)}, band = min-max)",
        fontsize=10,
    )
    return fig


def accuracy_figure(res: Results) -> Any:
    """Per-class test accuracy (mean over seeds), one line per method, many/medium/few marked. None
    when there are no test results yet."""
    pc = res.per_class.dropna(subset=["test_acc"])
    lines = [(e, m, pc[(pc["experiment"] == e.name) & (pc["method"] == m)]) for e, m in _methods(res)]
    lines = [p for p in lines if not p[2].empty]
    if not lines:
        return None
    fig = _figure(9.5, 4.8)
    ax = fig.subplots()
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    for k, (e, m, df) in enumerate(lines):
        acc = df.groupby("class")["test_acc"].mean() * 100
        style = "--" if e.stage == "stage1" else "-"
        ax.plot(acc.index, acc.to_numpy(), style, marker="o", ms=3, lw=1.3, color=cmap(k % 20), label=_title(res, e, m))
    _mark_groups(ax, res, text=True)
    ax.set_xlabel("class index (by training count)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.suptitle(f"Per-class test accuracy ({res.header.study}; mean over seeds)", fontsize=10)
    return fig


def search_figure(res: Results, exp: ExperimentInfo, method: str) -> Any:
    """Objective by trial with the best-so-far line, then objective against each searched parameter
    (log x axis for ``loguniform`` ones, x range = the search range). None without searched trials."""
    searched = res.searched(exp, method)
    trials = res.trial_list(exp, method)
    if not searched or trials.empty:
        return None
    spec = res.header.search_space(exp, method)
    trials = trials.assign(order=np.arange(1, len(trials) + 1), obj=trials["objective"] * 100)
    ok = trials[trials["status"] == COMPLETED].dropna(subset=["obj"])
    other = trials[~trials.index.isin(ok.index)].dropna(subset=["obj"])
    bad = trials[trials["status"].isin(FAILURE_STATUSES)]
    waiting = trials[~trials["status"].isin(FAILURE_STATUSES) & trials["obj"].isna()]
    sel = trials[trials["selected"]]
    fig = _figure(3.4 * (1 + len(searched)), 3.2)
    axes = fig.subplots(1, 1 + len(searched), squeeze=False, sharey=True)[0]

    def points(ax: Any, x: str) -> None:
        if not ok.empty:
            ax.scatter(ok[x], ok["obj"], s=22, color="C0", label="completed", zorder=3)
        if not other.empty:
            ax.scatter(other[x], other["obj"], s=22, color="0.6", label="stopped early", zorder=2)
        if not sel.empty:
            ax.scatter(sel[x], sel["obj"], s=120, marker="*", color="C3", label="selected", zorder=4)
        # trials without an objective sit on the bottom edge, so failures and gaps stay visible
        for df, style, name in (
            (bad, {"marker": "x", "c": "C3"}, "diverged/failed"),
            (waiting, {"marker": "o", "facecolors": "none", "edgecolors": "0.5"}, "no result yet"),
        ):
            if not df.empty:
                ax.scatter(
                    df[x],
                    np.full(len(df), 0.03),
                    transform=ax.get_xaxis_transform(),
                    s=25,
                    label=name,
                    zorder=4,
                    **style,
                )
        ax.grid(alpha=0.3)

    ax = axes[0]
    points(ax, "order")
    if not ok.empty:
        best = ok.set_index("order")["obj"].reindex(trials["order"]).cummax().ffill()
        ax.step(best.index, best.to_numpy(), where="post", color="C1", lw=1.5, label="best so far")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlim(0.5, len(trials) + 0.5)
    ax.set_xlabel("trial (in start order)")
    ax.set_ylabel(f"objective: {split_word(res)} All acc. (%)")
    if trials["obj"].isna().all():
        ax.set_ylim(0, 100)
    ax.legend(fontsize=7, loc="best")
    for ax, p in zip(axes[1:], searched):
        col = f"param.{p}"
        if col not in trials.columns:
            ax.set_visible(False)
            continue
        points(ax, col)
        dist = spec.get(p) or {}
        log = "loguniform" in dist
        if log:
            ax.set_xscale("log")
        bounds = dist.get("loguniform") or dist.get("uniform") or dist.get("int")
        if bounds:  # the whole search range shows where the sampler looked (and limits are never empty)
            lo, hi = float(bounds[0]), float(bounds[1])
            pad = 0.05 * (hi - lo or 1)
            ax.set_xlim(*((lo / 1.3, hi * 1.3) if log else (lo - pad, hi + pad)))
        ax.set_xlabel(p + (" (log scale)" if log else ""))
    n = len(trials)
    fig.suptitle(
        f"Search of {exp.name}/{method} ({label(exp, method)}): {n} trial{'s' * (n != 1)}, {len(ok)} completed",
        fontsize=10,
    )
    return fig


def _norm_evolution(res: Results, exp: ExperimentInfo, method: str):
    """Seed-mean per-epoch per-class norms (epochs x classes) of the selected trial, or None."""
    import json

    from study.layout import NORMS_FILE, StageMarker

    marker = StageMarker.read(res.paths.stage_marker(exp.name))
    sel = marker.selection(method) if marker else None
    if sel is None:
        return None
    path = res.paths.trial_dir(exp.name, sel.trial_index, sel.trial_id) / NORMS_FILE
    try:
        per_seed = [np.asarray(v, dtype=float) for v in json.loads(path.read_text()).values() if v]
    except (OSError, ValueError):
        return None
    shapes = {a.shape for a in per_seed}
    if not per_seed or len(shapes) != 1 or len(next(iter(shapes))) != 2:
        return None
    return np.mean(per_seed, axis=0)


def norm_evolution_figure(res: Results) -> Any:
    """The weight-norm evolution (as the WB authors' ``plot_weights_evolution``): for every stage-1
    variant and every stage-2 method that trains, the selected configuration's per-class classifier
    norm at the end of each epoch (mean over seeds), epochs down, classes (largest first) across.
    None when no trained method wrote its norms."""
    panels = [(e, m, a) for e, m in _methods(res) if (a := _norm_evolution(res, e, m)) is not None]
    if not panels:
        return None
    cols = min(4, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig = _figure(3.2 * cols, 2.6 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (e, m, a) in zip(axes.flat, panels):
        im = ax.imshow(
            a,
            aspect="auto",
            interpolation="nearest",
            cmap="viridis",
            extent=(-0.5, a.shape[1] - 0.5, a.shape[0] + 0.5, 0.5),
        )
        ax.set_title(_title(res, e, m), fontsize=8)
        ax.set_xlabel("class (by training count)", fontsize=7)
        ax.set_ylabel("epoch", fontsize=7)
        ax.tick_params(labelsize=6)
        fig.colorbar(im, ax=ax, shrink=0.8).ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(
        f"Per-class classifier weight norm by epoch ({res.header.study}; selected configurations, mean over seeds)",
        fontsize=10,
    )
    return fig


def write_plots(
    root: str | os.PathLike | Results, out: str | os.PathLike | None = None
) -> tuple[list[Path], list[str]]:
    """Write every plot of a study into ``out`` (default ``STUDY/plots``). Returns the written files
    and a note for each plot skipped for lack of data."""
    res = as_results(root)
    folder = Path(out) if out else res.paths.plots
    folder.mkdir(parents=True, exist_ok=True)
    written, skipped = [], []
    for name, _, png, why in plot_pngs(res):
        if png is None:
            skipped.append(f"skipped {name}: {why}")
        else:
            # through memory and an atomic rename: a stopped or parallel writer never leaves half a PNG
            atomic_write_bytes(folder / name, png)
            written.append(folder / name)
    return written, skipped


def plot_jobs(res: Results) -> list[tuple[str, str, Callable[[], Any], str]]:
    """Every plot of a study as (file name, what it shows, a function drawing the figure or returning
    None when the data are missing, why it would be missing), in the order they are shown."""
    jobs = [
        (
            "weight_norms.png",
            "Per-class classifier weight norms",
            lambda: weight_norm_figure(res),
            "no per-class weight norms",
        ),
        (
            "per_class_accuracy.png",
            "Per-class test accuracy",
            lambda: accuracy_figure(res),
            "no per-class test accuracies",
        ),
        (
            "weight_norm_evolution.png",
            "Per-class weight norms, epoch by epoch",
            lambda: norm_evolution_figure(res),
            "no per-epoch weight norms",
        ),
    ]
    for e, m in _methods(res):
        if res.searched(e, m):
            jobs.append(
                (
                    f"search-{e.name}-{m}.png",
                    f"Search history of {e.name}/{m}",
                    lambda e=e, m=m: search_figure(res, e, m),
                    f"no trials of {e.name}/{m}",
                )
            )
    return jobs


def plot_pngs(res: Results) -> list[tuple[str, str, bytes | None, str]]:
    """:func:`plot_jobs` drawn: (file name, what it shows, the PNG's bytes or None, why it is missing)."""
    out = []
    for name, title, make, why in plot_jobs(res):
        fig = make()
        if fig is None:
            out.append((name, title, None, why))
            continue
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        out.append((name, title, buf.getvalue(), why))
    return out


def write_all_plots(root: str | os.PathLike | Results) -> list[Path]:
    """The plots of a study in ``STUDY/plots/``; returns the written files."""
    return write_plots(root)[0]


class PlotProcess:
    """A study's plots drawn in a child process, beside the driver's own finishing work.

    Matplotlib draws in single-threaded Python (about a second for a small study's plots, several
    for a large one), while the driver writes ``optuna.db`` and the tables: on a machine with more
    than one core the two overlap. Started early (at stage 2's first result), the child also
    imports matplotlib and the analysis modules while the trials run. ``write(root)`` starts the plots of a
    complete study; ``wait()`` returns the files written, or raises with the child's error. The
    child reads its one request from a pipe, so it exits by itself when the driver goes away."""

    def __init__(self) -> None:
        env = dict(os.environ, MPLBACKEND="Agg")
        # the child imports this package as the driver did, also from a source checkout
        here = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from study.results.plots import _serve; _serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )

    def write(self, root: str | os.PathLike) -> None:
        """Start drawing the plots of the complete study at ``root`` (returns at once)."""
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(f"{Path(root).resolve()}\n")
            self._proc.stdin.flush()
        except OSError:  # the child has died: wait() says so (not a broken pipe of our own output)
            pass

    def wait(self) -> list[Path]:
        """The PNGs the child wrote; raises RuntimeError with its error when it failed."""
        out, _ = self._proc.communicate()
        try:
            reply = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            reply = {"error": f"the plot process exited with status {self._proc.returncode} and no reply"}
        if "error" in reply:
            raise RuntimeError(f"writing the plots failed: {reply['error']}")
        return [Path(p) for p in reply["written"]]

    def close(self) -> None:
        """Stop the child if it still runs (a stopped study, or an error before ``wait``)."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.communicate()


def _serve() -> None:
    """The child of :class:`PlotProcess`: import now, then plot the one study named on stdin."""
    import traceback

    import matplotlib.figure  # noqa: F401  (imported while the study still runs)

    from study.results.loading import load_results

    root = sys.stdin.readline().strip()
    if not root:
        return  # the driver stopped before the plots
    try:
        written = write_all_plots(load_results(root, complete=True))  # done.json comes after the plots
        reply = {"written": [str(p) for p in written]}
    except Exception:  # noqa: BLE001
        reply = {"error": traceback.format_exc(limit=-3).strip().replace("\n", " | ")}
    print(json.dumps(reply), flush=True)


def plot_command(study: str | os.PathLike, out: str | os.PathLike | None = None) -> int:
    """``study plot``: write the PNGs and print their paths (and what was skipped)."""
    written, skipped = write_plots(study, out)
    for p in written:
        print(p)
    for s in skipped:
        print(s)
    return 0
