"""One self-contained HTML page per study (``study report``; also ``STUDY/report.html`` when a study
finishes): what was studied, in words; the main, ablation and analysis tables with their captions
(the cells ``study table`` prints, through :func:`study.results.tables.render`); the comparison with
another study; the published numbers a shipped space reproduces; every figure of ``study plot``
embedded as a base64 PNG; provenance and, for an unfinished study, what is missing.

The page makes no request of any kind: no script, no font, no stylesheet outside it. It is rendered
by Jinja2 with autoescaping, so every string that comes from a space file, a path or a trial is
escaped; only the table fragments, escaped by their renderer, are inserted as they are. ``--pdf``
prints the page with a headless Chromium. Reads files only: no torch, no Ray.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from study.config.groups import shot_groups
from study.errors import UserError
from study.fsutil import atomic_write_bytes, atomic_write_text
from study.results.builders import build_table, compare_table, missing_parts, notes
from study.results.loading import Results, as_results, load_results
from study.results.records import fmt_value
from study.results.tables import render

TEMPLATE = "report.html.j2"
PUBLISHED_DIR = Path(__file__).resolve().parent.parent / "search_spaces" / "published"
"""Published numbers by space name (``<space>.yaml``: source, metric, rows naming the study's
(experiment, method)); shown beside the study's own when its space has a file here."""
BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
"""Executables tried for ``--pdf``, in order (``STUDY_CHROMIUM`` names one explicitly)."""


# --- the parts of the page ---------------------------------------------------------------------------------


def _counts_words(counts: list[int]) -> str:
    if not counts:
        return "?"
    shown = ", ".join(map(str, counts)) if len(counts) <= 12 else f"{counts[0]}, {counts[1]}, …, {counts[-1]}"
    return f"{sum(counts):,} images ({shown} per class)"


def _groups_words(res: Results) -> str:
    d = res.header.data
    if not d.train_counts or d.many_threshold is None or d.few_threshold is None:
        return "?"
    g = list(shot_groups(d.train_counts, d.many_threshold, d.few_threshold))
    return (
        f"Many (> {d.many_threshold}) {g.count('many')}, Medium ({d.few_threshold}–{d.many_threshold}) "
        f"{g.count('medium')}, Few (< {d.few_threshold}) {g.count('few')} classes"
    )


def _selection_words(res: Results) -> str:
    split = res.header.data.selection_split or "val"
    if split == "test":
        return (
            f"on the test set (protocol {res.header.protocol}, as the reference code does: "
            "test accuracies are optimistic)"
        )
    val = (res.header.space.get("data") or {}).get("val_per_class")
    carved = f"{val} images per class carved from the training data" if val else "a split of the training data"
    return f"on a validation split ({carved}; protocol {res.header.protocol}); the test set is evaluated once"


def _dist_words(spec: Any) -> str:
    if isinstance(spec, dict) and len(spec) >= 1:
        kind = next((k for k in spec if k != "default"), None)
        if kind is not None:
            vals = spec[kind]
            if isinstance(vals, list) and kind != "choice":
                return f"{kind} [{', '.join(fmt_value(v) for v in vals)}]"
            return f"{kind} {{{', '.join(fmt_value(v) for v in (vals or []))}}}"
    return str(spec)


def _plan_words(res: Results, exp, method: str, fixed: dict | None = None) -> str:
    info = exp.methods[method]
    searched = res.header.search_space(exp, method)
    parts = [f"{k} ∈ {_dist_words(v)}" for k, v in searched.items()]
    parts += [f"{k} = {fmt_value(v)}" for k, v in (fixed or {}).items() if k not in searched]
    n = info.budget
    what = f"{n} configuration{'s' * (n != 1)}" + (" searched" if searched else "")
    return f"{method}: {what}" + (f" — {'; '.join(parts)}" if parts else "")


def _variant_differences(res: Results) -> dict[str, dict]:
    """Per stage-1 variant, the fixed fields whose values differ between the variants (what makes
    each one what it is)."""
    variants = ((res.header.space.get("stage1") or {}).get("variants")) or {}
    configs = {v: dict((body or {}).get("config") or {}) for v, body in variants.items()}
    keys = sorted({k for c in configs.values() for k in c})
    differing = [k for k in keys if len({repr(c.get(k)) for c in configs.values()}) > 1]
    return {v: {k: c.get(k) for k in differing} for v, c in configs.items()}


def _studied(res: Results) -> tuple[list[tuple[str, str]], list[str], list[dict]]:
    d = res.header.data
    ifac = d.imbalance_factor
    facts = [
        (
            "Dataset",
            f"{d.dataset or '?'}, {d.num_classes or '?'} classes, imbalance factor "
            f"{fmt_value(ifac) if ifac is not None else '?'}",
        ),
        ("Training set", _counts_words(list(d.train_counts or []))),
        ("Groups", _groups_words(res)),
        ("Selection", _selection_words(res)),
        ("Backbone", res.header.backbone or "?"),
        ("Seeds", ", ".join(map(str, res.seeds)) + " (every configuration is trained for every seed)"),
    ]
    s1 = res.header.experiment("stage1")
    diffs = _variant_differences(res)
    stage1 = [_plan_words(res, s1, v, diffs.get(v)) for v in (s1.methods if s1 else [])]
    stage2 = [
        {"variant": e.variant or e.name, "lines": [_plan_words(res, e, m) for m in e.methods]}
        for e in res.header.stage2_experiments()
    ]
    return facts, stage1, stage2


def _table_sections(res: Results, against: Results | None) -> list[dict]:
    sections = [{"id": "main", "title": "Main table", "kind": "main"}]
    if res.header.stage2_experiments():
        sections.append({"id": "ablation", "title": "Stage-2 ablation", "kind": "ablation"})
    if "fdr_train" in res.trials and res.trials["fdr_train"].notna().any():
        sections.append({"id": "analysis", "title": "Feature geometry and classifier balance", "kind": "analysis"})
    for s in sections:
        s["html"] = render(build_table(res, s["kind"]), "html")
    if against is not None:
        sections.append(
            {
                "id": "compare",
                "title": f"Against {against.header.study}",
                "html": render(compare_table(res, against), "html"),
            }
        )
    return sections


def published_numbers(res: Results) -> dict | None:
    """The published numbers of the study's space (:data:`PUBLISHED_DIR`), each row with this study's
    mean test All beside it ("–" where the study has no such selected configuration)."""
    import yaml

    name = str(res.header.space.get("space") or "")
    path = PUBLISHED_DIR / f"{name}.yaml"
    if not name or not path.is_file():
        return None
    data = yaml.safe_load(path.read_text()) or {}
    rows = []
    for row in data.get("rows") or []:
        exp = next((e for e in res.experiments if e.name == row.get("experiment")), None)
        ours = "–"
        if exp is not None and row.get("method") in exp.methods:
            sel = res.selected(exp, row["method"])["test_all"].dropna()
            if len(sel):
                ours = f"{100 * sel.mean():.2f}"
        rows.append({**{k: row.get(k, "–") for k in ("label", "many", "medium", "few", "all")}, "ours": ours})
    return {"source": str(data.get("source") or ""), "metric": str(data.get("metric") or ""), "rows": rows}


def _figures(res: Results, pngs: dict[str, bytes] | None) -> tuple[list[dict], list[str]]:
    """The figures of ``study plot``: from ``pngs`` (file name -> bytes) when the caller has them
    drawn already, else drawn now."""
    from study.results.plots import plot_jobs, plot_pngs

    if pngs is not None:
        drawn = [(name, title, pngs.get(name), why) for name, title, _, why in plot_jobs(res)]
    else:
        drawn = plot_pngs(res)
    figures = [
        {"name": name, "title": title, "data": base64.b64encode(png).decode("ascii")}
        for name, title, png, _ in drawn
        if png is not None
    ]
    skipped = [f"{title}: not drawn ({why})" for _, title, png, why in drawn if png is None]
    return figures, skipped


def _provenance(res: Results) -> list[tuple[str, str]]:
    p = res.header.provenance or {}
    sha = p.get("git_sha")
    code = f"git {sha}" + (" (with uncommitted changes)" if p.get("git_dirty") else "") if sha else "not a git checkout"
    pk = p.get("packages") or {}
    machine = p.get("machine") or {}
    out = [
        ("Study", f"{res.header.study} (format {res.header.format_version}, fingerprint {res.header.fingerprint})"),
        ("Started", str(p.get("created") or "?")),
        ("Code", code),
        ("Packages", ", ".join(f"{k} {v}" for k, v in sorted(pk.items())) or "?"),
        (
            "Machine",
            ", ".join(f"{k} {v}" for k, v in machine.items()) if isinstance(machine, dict) else str(machine or "?"),
        ),
        ("Command", " ".join(map(str, p.get("argv") or [])) or "?"),
        ("Space file", str(p.get("space_file") or "?")),
    ]
    data = p.get("data") or {}
    if data:
        out.append(("Data", ", ".join(f"{k} {v}" for k, v in data.items() if k != "train_counts")))
    return out


def _description(res: Results) -> str:
    """The space file's ``description`` (from the file the study was started with, else the shipped
    space of the same name), or ""."""
    from study.config.spaces import SPACES_DIR, read_yaml

    for path in (res.header.provenance or {}).get("space_file"), SPACES_DIR / f"{res.header.space.get('space')}.yaml":
        try:
            if path and Path(path).is_file():
                return " ".join(str(read_yaml(Path(path)).get("description") or "").split())
        except UserError:
            continue
    return ""


def build_report(res: Results, against: Results | None = None, pngs: dict[str, bytes] | None = None) -> str:
    """The report of ``res`` as one HTML document."""
    import jinja2

    from study import __version__

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(Path(__file__).resolve().parent)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    facts, stage1, stage2 = _studied(res)
    figures, skipped = _figures(res, pngs)
    missing = missing_parts(res)
    status = [n for n in notes(res) if not n.startswith("Missing:")]
    if missing:
        status.append("Missing: " + "; ".join(missing) + ".")
    description = _description(res)
    subtitle = " · ".join(
        x
        for x in (description, f"space {res.header.space.get('space') or '?'}", f"protocol {res.header.protocol}")
        if x
    )
    return env.get_template(TEMPLATE).render(
        version=__version__,
        title=f"Study {res.header.study}",
        subtitle=subtitle,
        complete=res.complete,
        status_lines=status,
        facts=facts,
        stage1_lines=stage1,
        stage2_blocks=stage2,
        table_sections=_table_sections(res, against),
        published=published_numbers(res),
        figures=figures,
        skipped_figures=skipped,
        provenance=_provenance(res),
        root=str(res.paths.root),
    )


def write_report(
    root: str | os.PathLike | Results,
    out: str | os.PathLike | None = None,
    against: str | os.PathLike | None = None,
    pngs: dict[str, bytes] | None = None,
) -> Path:
    """Write the report (default ``STUDY/report.html``) atomically; returns its path."""
    res = as_results(root)
    other = load_results(against) if against is not None else None
    path = Path(out) if out else res.paths.report
    atomic_write_text(path, build_report(res, other, pngs))
    return path


# --- PDF ------------------------------------------------------------------------------------------------------


def find_browser() -> str | None:
    """A headless Chromium executable (``STUDY_CHROMIUM``, else the first of :data:`BROWSERS` on PATH)."""
    chosen = os.environ.get("STUDY_CHROMIUM")
    if chosen:
        return chosen if shutil.which(chosen) else None
    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


def print_pdf(html_path: Path, pdf_path: Path, browser: str, timeout: float = 120) -> None:
    """Print ``html_path`` to ``pdf_path`` with ``browser`` (headless, offline, no header or footer)."""
    with tempfile.TemporaryDirectory(prefix="study-pdf-") as tmp:
        tmp_pdf = Path(tmp) / "report.pdf"
        args = [browser, "--headless", "--disable-gpu", "--no-pdf-header-footer", f"--user-data-dir={tmp}/profile"]
        if os.geteuid() == 0:
            args.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
        args += [f"--print-to-pdf={tmp_pdf}", html_path.resolve().as_uri()]
        r = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0 or not tmp_pdf.is_file() or tmp_pdf.stat().st_size == 0:
            tail = (r.stderr or "").strip().splitlines()[-1:] or ["no output"]
            raise UserError(f"{browser} could not print {html_path} to PDF: {tail[0]}")
        atomic_write_bytes(pdf_path, tmp_pdf.read_bytes())


def report_command(
    study: str | os.PathLike,
    out: str | os.PathLike | None = None,
    pdf: bool = False,
    against: str | os.PathLike | None = None,
) -> int:
    """``study report``: write the HTML report (and with ``pdf`` its PDF beside it); print the paths."""
    browser = find_browser() if pdf else None
    if pdf and browser is None:
        raise UserError(
            "--pdf needs a headless Chromium and none was found: install one (Debian/Ubuntu: apt-get install "
            "chromium-headless-shell) or name it with STUDY_CHROMIUM=/path/to/chromium; nothing was written"
        )
    res = load_results(study)
    other = load_results(against) if against is not None else None
    path = Path(out) if out else res.paths.report
    text = build_report(res, other)
    if pdf:
        # the PDF first, from a private copy: a failed print leaves nothing half-written behind
        with tempfile.TemporaryDirectory(prefix="study-report-") as tmp:
            staged = Path(tmp) / "report.html"
            staged.write_text(text)
            print_pdf(staged, path.with_suffix(".pdf"), browser)
    atomic_write_text(path, text)
    print(path)
    if pdf:
        print(path.with_suffix(".pdf"))
    return 0
