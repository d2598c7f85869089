"""How good is the time-left estimate of a running study (``study.results.eta``)?

Runs ``study run SPACE`` in a subprocess, asks :func:`study.results.eta.estimate` for the time left
once a second from this process (reading the study folder, as the live panel and ``study status``
do), and when the study has ended compares the estimates made at 25%, 50% and 75% of its wall time
with the real end: the error is (predicted end − real end) / (real end − the moment of the
estimate), so +20% means the remaining time was over-estimated by a fifth.

    python benchmarks/bench_eta.py                       # the demo (digits-lt)
    python benchmarks/bench_eta.py --space fashion-mnist-lt --data-dir /usr/share/datasets/fashion-mnist
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from study.layout import StudyPaths, load_header
from study.results.eta import estimate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--space", default="digits-lt")
    ap.add_argument("--data-dir")
    ap.add_argument("--interval", type=float, default=1.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-eta-") as tmp:
        cmd = [sys.executable, "-m", "study", "run", args.space, "--results-dir", tmp, "--name", "eta"]
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
        paths = StudyPaths(Path(tmp) / "eta")
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        samples = []  # (time, seconds left or None, known part)
        while proc.poll() is None:
            time.sleep(args.interval)
            if not paths.study_yaml.is_file():
                continue
            try:
                est = estimate(paths, load_header(paths.root)[1], live=True)
            except Exception:  # noqa: BLE001 - a file being written: next second
                continue
            if est.elapsed > 0:
                samples.append((time.time(), est.seconds_left, est.known_seconds_left))
        if proc.returncode != 0:
            print(proc.stderr.read()[-2000:], file=sys.stderr)
            return 1
        t_end = paths.done.stat().st_mtime
    total = t_end - t0
    print(f"space {args.space}: {total:.1f} s wall, {len(samples)} estimates")
    print("| at | estimate made | predicted left | real left | error |")
    print("| --- | --- | --- | --- | --- |")
    for frac in (0.25, 0.5, 0.75):
        target = t0 + frac * total
        t, left, known = min(samples, key=lambda s: abs(s[0] - target))
        real = t_end - t
        if left is None:
            print(f"| {frac:.0%} | {t - t0:.1f} s | ≥ {known:.1f} s (a stage not measured yet) | {real:.1f} s | – |")
        else:
            print(f"| {frac:.0%} | {t - t0:.1f} s | {left:.1f} s | {real:.1f} s | {100 * (left - real) / real:+.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
