"""The ``study`` command line. Thin: each command parses its options and calls one module.

Every user mistake is a :class:`~study.errors.UserError`: one line on stderr, exit code 2, no
traceback. Heavy packages (torch, Ray, matplotlib) are imported inside the commands that need
them, so ``study table`` and ``study status`` start fast and never start Ray or touch a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from study.errors import StudyInterrupted, UserError

DEFAULT_RESULTS = "results"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message} (see '{self.prog} --help')")


def cmd_data(args: argparse.Namespace) -> int:
    from study.config.datasets import DATASETS
    from study.config.schema import PROTOCOL_PRESETS, DataConfig, build, check_protocol
    from study.data.filelists import FILE_DATASETS
    from study.data.longtail import describe
    from study.errors import unknown

    if args.dataset in FILE_DATASETS:
        return _cmd_data_files(args)
    if args.dataset not in DATASETS:
        raise UserError(f"study data: {unknown('dataset', args.dataset, {**DATASETS, **FILE_DATASETS})}")
    for opt in ("train_list", "val_list", "test_list", "class_names"):
        if getattr(args, opt) is not None:
            raise UserError(
                f"study data: --{opt.replace('_', '-')} is for split-files only ({args.dataset} is "
                f"built from its own files)"
            )

    values = {k.split(".", 1)[1]: v for k, v in PROTOCOL_PRESETS[args.protocol].items() if k.startswith("data.")}
    values["dataset"] = args.dataset
    for key in (
        "imbalance_factor",
        "profile",
        "subset",
        "rounding",
        "val_per_class",
        "n_max",
        "many_threshold",
        "few_threshold",
    ):
        v = getattr(args, key)
        if v is not None:
            values[key] = v
    try:
        cfg = build(DataConfig, values, "")
        check_protocol(args.protocol, cfg)
    except UserError as e:
        raise UserError(f"study data: {e}") from None
    info = describe(cfg)
    info["protocol"] = args.protocol
    info["selection_split"] = "val" if cfg.val_per_class else "test"
    if args.format == "json":
        print(json.dumps(info, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    spec = DATASETS[args.dataset]
    con = Console()
    con.print(
        f"[bold]{info['dataset']}[/bold]  imbalance factor {info['imbalance_factor']:g} ({info['profile']}), "
        f"subset rule {info['subset']}, protocol {args.protocol} (selection on {info['selection_split']})"
    )
    t = Table(show_header=True, header_style="bold", box=None)
    t.add_column("class", justify="right")
    t.add_column("train", justify="right")
    t.add_column("group")
    from study.config.groups import shot_groups

    groups = shot_groups(info["train_counts"], cfg.resolved_many, cfg.resolved_few)
    for c, (n, g) in enumerate(zip(info["train_counts"], groups)):
        t.add_row(str(c), str(n), str(g))
    if len(info["train_counts"]) <= 20 or args.verbose:
        con.print(t)
    else:
        counts = info["train_counts"]
        con.print(
            f"train counts: {', '.join(map(str, counts[:6]))}, ..., {', '.join(map(str, counts[-4:]))} "
            f"(all {len(counts)} with -v)"
        )
    g = info["groups"]
    con.print(
        f"total train {info['total_train']}  |  val {info['val_per_class']}/class "
        f"({info['val_per_class'] * info['num_classes']})  |  test {info['test_per_class']}/class "
        f"({info['test_per_class'] * info['num_classes']})"
    )
    con.print(
        f"groups: many (>{cfg.resolved_many}) {g['many']}, medium ({cfg.resolved_few}-{cfg.resolved_many}) "
        f"{g['medium']}, few (<{cfg.resolved_few}) {g['few']} classes"
    )
    if spec.note:
        con.print(f"note: {spec.note}")
    return 0


def _cmd_data_files(args: argparse.Namespace) -> int:
    """``study data`` for a dataset given as split files (study.data.filelists): counts read from the lists."""
    from types import SimpleNamespace

    from study.config.schema import check_protocol
    from study.data.filelists import FILE_DATASETS, describe_file_dataset

    spec = FILE_DATASETS[args.dataset]
    for opt in ("imbalance_factor", "profile", "subset", "rounding", "n_max"):
        if getattr(args, opt) is not None:
            raise UserError(
                f"study data: --{opt.replace('_', '-')} does not apply to {args.dataset}: its "
                f"training counts come from the split files"
            )
    if spec.prefix is not None:
        for opt in ("train_list", "val_list", "test_list", "class_names"):
            if getattr(args, opt) is not None:
                raise UserError(
                    f"study data: --{opt.replace('_', '-')} is for split-files only ({args.dataset} "
                    f"reads {spec.prefix}_*.txt from --data-dir)"
                )
    carves = spec.val_list is None or (spec.prefix is None and args.val_list is None)
    if args.val_per_class is not None and not carves and args.val_per_class != 0:
        raise UserError(
            f"study data: --val-per-class does not apply to {args.dataset}: its validation split is "
            f"the val list; it sets how many images per class are carved from the training list "
            f"when there is no val list (inat2018, split-files without --val-list)"
        )
    # the protocols' presets as for the synthetic datasets: no validation split outside 'honest'
    val = args.val_per_class if args.val_per_class is not None else (20 if args.protocol == "honest" else 0)
    try:
        check_protocol(args.protocol, SimpleNamespace(val_per_class=val))
    except UserError as e:
        raise UserError(f"study data: {e}") from None
    lists = {"train": args.train_list, "val": args.val_list, "test": args.test_list} if spec.prefix is None else None
    info = describe_file_dataset(
        args.dataset,
        args.data_dir,
        many_threshold=args.many_threshold,
        few_threshold=args.few_threshold,
        val_per_class=val,
        lists=lists,
        class_names=args.class_names,
    )
    info["protocol"] = args.protocol
    if args.format == "json":
        print(json.dumps(info, indent=2))
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from study.config.groups import shot_groups

    con = Console()
    how = {
        "val-list": "the val list",
        "none": "the test set, no validation split",
        "carved": f"a split carved from the training list, the last min({info['carve_per_class']}, n_c - 1) "
        f"images of each class",
    }[info["validation"]]
    con.print(
        f"[bold]{info['dataset']}[/bold]  {escape(info['title'])}, {info['num_classes']} classes, "
        f"protocol {args.protocol} (selection on {info['selection_split']}: {how})"
    )
    con.print(f"lists: {escape(', '.join(info['list_files'].values()))}; images under {escape(info['data_dir'])}")
    if not info["official_files"]:
        con.print("[bold]not the official split files[/bold]")
    th = info["thresholds"]
    groups = shot_groups(info["train_counts"], th["many_gt"], th["few_lt"])
    counts = info["train_counts"]
    if len(counts) <= 20 or args.verbose:
        t = Table(show_header=True, header_style="bold", box=None)
        for col in ("class", "train", "val", "test", "group"):
            t.add_column(col, justify="left" if col == "group" else "right")
        for c, (n, g) in enumerate(zip(counts, groups)):
            t.add_row(str(c), str(n), str(info["val_counts"][c]), str(info["test_counts"][c]), str(g))
        con.print(t)
    else:
        con.print(
            f"train counts: {', '.join(map(str, counts[:6]))}, ..., {', '.join(map(str, counts[-4:]))} "
            f"(all {len(counts)} with -v)"
        )

    def per_class(key: str) -> str:
        return f"{info[key]}/class, " if info[key] else ""

    con.print(
        f"total train {info['total_train']}  |  val {per_class('val_per_class')}{info['total_val']}  |  "
        f"test ({info['test_list']} list) {per_class('test_per_class')}{info['total_test']}  |  "
        f"lists hash {info['lists_hash']}"
    )
    g = info["groups"]
    con.print(
        f"groups: many (>{th['many_gt']}) {g['many']}, medium ({th['few_lt']}-{th['many_gt']}) "
        f"{g['medium']}, few (<{th['few_lt']}) {g['few']} classes"
    )
    if info["note"]:
        con.print(f"note: {escape(info['note'])}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from study.config.spaces import load_space
    from study.training.single_run import summary_rows, train_once

    space = load_space(args.space, args.set, seeds=args.seeds)
    if space.plugins:
        from study.training.plugin_check import check_plugins

        check_plugins(space)
    out = Path(args.out or Path(args.results_dir) / f"{space.name}-train")
    metrics = train_once(
        space,
        out,
        data_dir=args.data_dir,
        method=args.method,
        device=args.device,
        console=lambda s: print(s, flush=True),
        variant=args.variant,
    )
    from rich.console import Console
    from rich.table import Table

    n_seeds = len(metrics["runs"])
    spread = n_seeds > 1  # one seed has no spread to show: its numbers alone, not "± 0.00"
    t = Table(
        title=f"{metrics['dataset']} · protocol {metrics['protocol']} · {n_seeds} seed{'s' * spread} · "
        + ("mean ± std, %" if spread else "%"),
        box=None,
        header_style="bold",
    )
    for col in ("model", "split", "Many", "Medium", "Few", "All"):
        t.add_column(col, justify="left" if col in ("model", "split") else "right")
    for label, split, m, s in summary_rows(metrics):
        cells = []
        for g in ("many", "medium", "few", "all"):
            cells.append(
                "–" if m[g] is None else f"{100 * m[g]:.2f}" + (f" ± {100 * (s[g] or 0):.2f}" if spread else "")
            )
        t.add_row(label, split, *cells)
    Console().print(t)
    print(f"wrote {out / 'metrics.json'}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from study.config.spaces import load_space

    space = load_space(args.space, args.set, seeds=args.seeds, num_samples=args.num_samples)
    if space.plugins:  # before anything is written
        from study.training.plugin_check import check_plugins

        check_plugins(space)
    address = args.address or ""
    set_mode = (
        address
        and address not in ("auto", "local")
        and not address.startswith("ray://")
        and "RAY_AUTH_MODE" not in os.environ
        and "ray" not in sys.modules
        and (Path.home() / ".ray" / "auth_token").exists()
    )
    if set_mode:
        # Heads started by recent Ray versions require token auth, and Ray reads the mode once, when it
        # is imported: set it before the import below. Only then (an already imported Ray would keep its
        # mode while the processes it spawns inherited the new one), and undone afterwards so that a
        # later local cluster in the same process does not start its GCS in token mode.
        os.environ["RAY_AUTH_MODE"] = "token"
    try:
        from study.search.driver import run_study  # imports Ray: only here

        run_study(
            space,
            name=args.name,
            results_dir=args.results_dir,
            address=args.address,
            gpus_per_trial=args.gpus_per_trial,
            cpus_per_trial=args.cpus_per_trial,
            data_dir=args.data_dir,
            fresh=args.fresh,
            verbose=args.verbose,
            log=lambda s: print(s, flush=True),
            store=args.store,
        )
    finally:
        if set_mode:
            os.environ.pop("RAY_AUTH_MODE", None)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from study.layout import FAILURE_STATUSES, INTERRUPTED, PENDING, RUNNING, STOPPED, StudyPaths
    from study.results.records import fmt_params, repair_optuna_db, study_status

    # a finished study's optuna.db is derived from the records: a damaged or deleted one is rebuilt
    repair_optuna_db(StudyPaths(args.study), lambda line: print(line, file=sys.stderr))
    st = study_status(args.study)
    if st["running"] and not st["complete"]:  # a running study: how long it still needs
        from dataclasses import asdict

        from study.layout import load_header
        from study.results.eta import estimate, eta_words

        paths, header = load_header(args.study)
        est = estimate(paths, header, live=True)
        st["eta"] = {**asdict(est), "words": eta_words(est)}
    if args.format == "json":
        print(json.dumps(st, indent=2, default=str))
        return 0
    state = (
        "complete"
        if st["complete"]
        else ("running" if st["running"] else "interrupted (run the same command again to resume)")
    )
    print(f"study {st['study']}: {state}  [{st['root']}]")
    for e in st["experiments"]:
        what = "variants" if e["name"] == "stage1" else f"methods on variant {e['variant']}"
        print(f"  {e['name']} ({what}): {'finished' if e['finished'] else 'not finished'}")
        for method, m in e["methods"].items():
            c = m["counts"]
            parts = [f"{c['completed']} completed"]
            for k in (*FAILURE_STATUSES, STOPPED, RUNNING, INTERRUPTED, PENDING):
                if c.get(k):
                    parts.append(f"{c[k]} {k}")
            best = ""
            if m["best"]:
                b = m["best"]
                params = fmt_params(b["params"])
                best = f"  best {100 * b['objective']:.2f}% (trial {b['trial']}{'; ' + params if params else ''})"
            print(f"    {method:<12} {m['budget']:>3} budgeted: {', '.join(parts)}{best}")
    if st["final_evaluations"]:
        print(f"  final test evaluations: {len(st['final_evaluations'])}")
    if st.get("eta"):
        print(f"  estimate: {st['eta']['words']}")
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    from study.results.builders import table_command

    return table_command(args.study, kind=args.kind, fmt=args.format, out=args.out, variant=args.variant)


def cmd_compare(args: argparse.Namespace) -> int:
    from study.results.builders import compare_command

    return compare_command(args.a, args.b, fmt=args.format, out=args.out)


def cmd_plot(args: argparse.Namespace) -> int:
    from study.results.plots import plot_command

    return plot_command(args.study, out=args.out)


def cmd_report(args: argparse.Namespace) -> int:
    from study.results.report import report_command

    return report_command(args.study, out=args.out, pdf=args.pdf, against=args.against)


def cmd_export(args: argparse.Namespace) -> int:
    from study.results.export import export_command

    return export_command(args.study, args.to, uri=args.uri, follow=args.follow)


def cmd_spaces(args: argparse.Namespace) -> int:
    from study.config.spaces import SPACES_DIR, available_spaces, space_summary

    names = available_spaces()
    width = max(map(len, names), default=0)
    for name in names:
        print(f"{name:<{width}}  {space_summary(name)}".rstrip())
    print(f"\n(study run NAME; the files are in {SPACES_DIR}, or pass a path to your own .yaml file)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from study.config.schema import PROTOCOLS

    p = _Parser(
        prog="study", description="Hyperparameter-search studies for long-tailed recognition by weight balancing."
    )
    sub = p.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    sub.required = True

    d = sub.add_parser("data", help="per-class training counts, split sizes and groups of a dataset")
    d.add_argument(
        "dataset",
        help="cifar10-lt, cifar100-lt, fashion-mnist-lt, digits-lt, or from split files: "
        "imagenet-lt, places-lt, inat2018, split-files",
    )
    d.add_argument("--imbalance-factor", type=float, dest="imbalance_factor")
    d.add_argument("--protocol", default="honest", choices=PROTOCOLS)
    d.add_argument("--profile", choices=("exp", "step"))
    d.add_argument("--subset", choices=("shuffle", "first"))
    d.add_argument("--rounding", choices=("floor", "round"), help="floor (LDAM/WB) or round (ICLR'24 code)")
    d.add_argument("--val-per-class", type=int, dest="val_per_class")
    d.add_argument("--n-max", type=int, dest="n_max", help="training images of the largest class (a smaller study)")
    d.add_argument("--many-threshold", type=int, dest="many_threshold")
    d.add_argument("--few-threshold", type=int, dest="few_threshold")
    d.add_argument(
        "--data-dir",
        dest="data_dir",
        default=os.environ.get("STUDY_DATA_DIR"),
        help="split-file datasets: the folder holding the images and (imagenet-lt, places-lt, "
        "inat2018) the <Prefix>_train/val/test.txt lists, in it or in DIR/<Prefix>/ "
        "(default $STUDY_DATA_DIR)",
    )
    d.add_argument("--train-list", dest="train_list", help="split-files: your training list ('path label' lines)")
    d.add_argument(
        "--val-list",
        dest="val_list",
        help="split-files: your validation list (without it a split is carved from the training list)",
    )
    d.add_argument("--test-list", dest="test_list", help="split-files: your test list")
    d.add_argument(
        "--class-names",
        dest="class_names",
        help="split-files: one class name per line (line i = class i); else C = largest label + 1",
    )
    d.add_argument("--format", choices=("table", "json"), default="table")
    d.add_argument("-v", "--verbose", action="store_true", help="list every class")
    d.set_defaults(func=cmd_data)

    def space_options(q: argparse.ArgumentParser) -> None:
        q.add_argument("space", help="a name in study/search_spaces/ (e.g. digits-lt) or a path to a .yaml file")
        q.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a value of the space, e.g. --set stage1.epochs=5 (repeatable)",
        )
        q.add_argument("--seeds", type=int, help="use seeds 0..K-1 instead of the space's seeds")
        q.add_argument(
            "--data-dir",
            default=os.environ.get("STUDY_DATA_DIR"),
            help="folder holding cifar-100-python/, cifar-10-batches-py/ or FashionMNIST/raw/ "
            "(default ./data or $STUDY_DATA_DIR); for imagenet-lt, places-lt, inat2018 and "
            "split-files the folder with the split lists and the images they name",
        )
        q.add_argument("--results-dir", default=DEFAULT_RESULTS, help="parent folder of results (default results/)")

    sp = sub.add_parser("spaces", help="the search spaces shipped with study, with their descriptions")
    sp.set_defaults(func=cmd_spaces)

    t = sub.add_parser("train", help="one stage-1 + stage-2 run at the space's fixed/default values")
    space_options(t)
    t.add_argument("--out", help="output folder (default RESULTS_DIR/SPACE-train)")
    t.add_argument("--method", help="stage-2 method (default: the space's train_method, usually wb)")
    t.add_argument("--variant", help="stage-1 variant (default: the first that feeds stage 2)")
    t.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("run", help="run or resume a search study (Ray Tune + Optuna)")
    space_options(r)
    r.add_argument("--name", help="study folder name under RESULTS_DIR (default: the space name)")
    r.add_argument(
        "--num-samples",
        type=int,
        dest="num_samples",
        help="budget of every searched experiment (overrides the space's budgets)",
    )
    r.add_argument(
        "--address",
        help="join an existing Ray cluster (HOST:PORT or 'auto'); RESULTS_DIR must then be on storage "
        "shared by every node, unless --store is given",
    )
    r.add_argument(
        "--store",
        metavar="URI",
        help="where trials keep their checkpoints and weights, for clusters without a shared disk: "
        "s3://BUCKET/PREFIX (S3-compatible servers: add ?endpoint_override=HOST:PORT&scheme=http), "
        "gs://BUCKET/PREFIX or a folder every node mounts; credentials from the environment "
        "(default: the results folder itself)",
    )
    r.add_argument(
        "--gpus-per-trial",
        type=float,
        dest="gpus_per_trial",
        help="GPU fraction per trial, in (0, 1] (default 0.25 when the cluster has GPUs)",
    )
    r.add_argument("--cpus-per-trial", type=float, dest="cpus_per_trial", help="CPUs per trial (default 1)")
    r.add_argument(
        "--fresh", action="store_true", help="start over: the existing study folder is moved aside (never deleted)"
    )
    r.add_argument("-v", "--verbose", action="store_true", help="show Ray's own output too")
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("status", help="progress of a study, read from disk (no Ray)")
    s.add_argument("study", help="a study folder, e.g. results/digits-lt")
    s.add_argument("--format", choices=("text", "json"), default="text")
    s.set_defaults(func=cmd_status)

    tb = sub.add_parser("table", help="paper-style tables from a study's results (no Ray, no GPU)")
    tb.add_argument("study", help="a study folder, e.g. results/digits-lt")
    tb.add_argument("--kind", choices=("main", "ablation", "seeds", "search", "analysis"), default="main")
    tb.add_argument("--format", choices=("markdown", "latex", "csv", "html"), default="markdown")
    tb.add_argument("--out", help="write to FILE instead of stdout")
    tb.add_argument(
        "--variant",
        help="--kind ablation: only the stage-2 methods on this stage-1 variant "
        "(default: each variant that fed stage 2 in turn)",
    )
    tb.set_defaults(func=cmd_table)

    cp = sub.add_parser(
        "compare",
        help="test accuracy of study A minus study B per variant and method, with "
        "95%% intervals (e.g. test-set selection vs honest)",
    )
    cp.add_argument("a", help="a study folder, e.g. results/fashion-mnist-lt-test-selection")
    cp.add_argument("b", help="the study to subtract, e.g. results/fashion-mnist-lt")
    cp.add_argument("--format", choices=("markdown", "latex", "csv", "html"), default="markdown")
    cp.add_argument("--out", help="write to FILE instead of stdout")
    cp.set_defaults(func=cmd_compare)

    rp = sub.add_parser(
        "report", help="one self-contained HTML page: what was studied, the tables, the figures (no Ray, no GPU)"
    )
    rp.add_argument("study", help="a study folder, e.g. results/digits-lt")
    rp.add_argument("--out", help="write the page to FILE (default STUDY/report.html)")
    rp.add_argument(
        "--pdf", action="store_true", help="also print it to PDF beside the page (needs a headless Chromium)"
    )
    rp.add_argument("--against", metavar="OTHER", help="add the comparison with another study (as study compare)")
    rp.set_defaults(func=cmd_report)

    ex = sub.add_parser(
        "export", help="every trial as a run in TensorBoard, MLflow or W&B, from the study's files (idempotent)"
    )
    ex.add_argument("study", help="a study folder, e.g. results/digits-lt")
    ex.add_argument("--to", required=True, choices=("tensorboard", "mlflow", "wandb"), help="the tracker")
    ex.add_argument(
        "--uri",
        help="TensorBoard: the log folder (default STUDY/tensorboard); MLflow: the tracking URI "
        "(default sqlite:///STUDY/mlflow.db; http://HOST:PORT for a server); W&B: the project (default: "
        "the study's name; the offline runs go to STUDY/wandb, upload them with wandb sync)",
    )
    ex.add_argument(
        "--follow", type=float, metavar="SECONDS", help="export again every SECONDS until the study is done"
    )
    ex.set_defaults(func=cmd_export)

    pl = sub.add_parser("plot", help="weight-norm, per-class accuracy and search-history plots (PNG)")
    pl.add_argument("study", help="a study folder, e.g. results/digits-lt")
    pl.add_argument("--out", help="folder for the PNGs (default STUDY/plots)")
    pl.set_defaults(func=cmd_plot)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except UserError as e:
        msg = str(e).replace("\n", " ")
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except StudyInterrupted as e:
        print(str(e), file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def entry() -> None:
    """The console script: :func:`main`, then exit with its code.

    After a command that started Ray, the process leaves with ``os._exit`` once its output is
    flushed and Ray is shut down: interpreter finalization with Ray's C++ core worker still loaded
    can crash (SIGSEGV) after everything was written, which turned a clean, resumable "interrupted"
    (130) into a segfault exit status. Everything a study writes is written atomically before
    this point, so skipping finalization loses nothing."""
    code = main()
    if "ray" in sys.modules:
        try:
            import ray

            # Safe to repeat; also stops what a half-finished ray.init started (Ray's own atexit hook,
            # which would otherwise do it, is skipped by os._exit). With --address it only disconnects.
            ray.shutdown()
        except Exception:  # noqa: BLE001
            pass
        import logging

        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
