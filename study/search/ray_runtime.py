"""Ray for ``study run``: starting or joining a cluster, the resources of a trial, and stopping the
driver cleanly on Ctrl-C or SIGTERM (with Ray's failure-signal handler kept out of the process:
``study.compat``)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from typing import Any

from study import compat
from study.errors import UserError


def check_address(address: str) -> None:
    """Fail within seconds (not a hang) when a Ray head address cannot be reached."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address {address}: expected HOST:PORT (e.g. 10.0.0.5:6379) or 'auto'")
    try:
        with socket.create_connection((host, int(port)), timeout=3):
            pass
    except OSError as e:
        raise UserError(
            f"--address {address}: cannot reach a Ray head there ({e.strerror or e}); start one "
            "with 'ray start --head' or check the address"
        ) from None


def import_ray() -> None:
    """Import Ray and set up its process-wide switches (logging, Tune's environment variables), without
    starting it. ``run_study`` calls this on the main thread before its loading thread starts: the
    two imports share the interpreter lock, and Ray's import (0.3–0.5 s alone) is what ``ray.init``
    waits for, while the processes ``ray.init`` starts use the otherwise idle core."""
    import ray

    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # A diverged trial's last report has no objective on purpose (so no number can win); the
    # searcher and scheduler skip such reports, so Tune must not reject them.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # Tune's own per-trial loggers (result.json, progress.csv, TensorBoard events) duplicate what
    # every trial writes itself (events.jsonl, record.json), and cost the driver a write per epoch
    # report: about 0.6 s of an 8-trial study on 2 cores. TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=0
    # brings them back (e.g. for TensorBoard).
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # without Ray's failure-signal handler, SIGTERM is a Ctrl-C (exit 130, resumable)
    compat.disable_ray_failure_signal_handler()
    del ray


def _full_disk_filter(record) -> bool:
    """Ray Tune logs a traceback when it cannot save its experiment state; on a full disk the study
    stops with one line instead (:func:`request_stop`), so that record is dropped."""
    from study.fsutil import disk_full, disk_full_line

    exc = record.exc_info[1] if record.exc_info else None
    if not (disk_full(exc) or disk_full(Exception(record.getMessage()))):
        return True
    request_stop(disk_full_line(exc, "study run"))
    return False


def init_ray(address: str | None, verbose: bool, temp_dir: str | None = None) -> None:
    """Join the Ray cluster at ``address``, or start a local one (one CPU per core, no dashboard)."""
    import logging

    import ray

    import_ray()
    if not ray.is_initialized():
        kwargs: dict[str, Any] = dict(
            include_dashboard=False,
            log_to_driver=verbose,
            logging_level=logging.INFO if verbose else logging.ERROR,
            configure_logging=True,
        )
        if address:
            # Token auth (heads started by recent Ray): RAY_AUTH_MODE=token must be set before Ray is
            # imported; the CLI does that when ~/.ray/auth_token exists. `run_study` has already checked
            # that the address answers (check_address), before anything was written.
            try:
                with stop_signals_deferred():
                    ray.init(address=address, **kwargs)
            except Exception as e:  # noqa: BLE001
                raise UserError(
                    f"--address {address}: could not join the Ray cluster: {str(e).splitlines()[0][:200]}"
                ) from None
        else:
            if temp_dir:
                kwargs["_temp_dir"] = temp_dir
            with stop_signals_deferred():
                ray.init(num_cpus=os.cpu_count() or 1, **kwargs)
        if not verbose:
            for name in ("ray", "ray.tune", "ray.train", "ray.data"):
                logging.getLogger(name).setLevel(logging.ERROR)
        for handler in logging.getLogger("ray").handlers + logging.getLogger().handlers:
            handler.addFilter(_full_disk_filter)
    # Optuna is set up after ray.init, not before: its import would only delay Ray's start.
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # A trial restored from Tune's last checkpoint re-reports a few epochs Optuna has already seen
    # (our trials resume from their own, newer checkpoint); Optuna keeps the first value and warns.
    import warnings

    warnings.filterwarnings("ignore", message="The reported value is ignored because this `step`")


def trial_resources(gpus_per_trial: float | None, cpus_per_trial: float | None) -> tuple[float, float]:
    """(GPUs, CPUs) per trial, refusing requests the cluster can never satisfy (Ray would keep such
    trials pending forever). Default: a quarter GPU when the cluster has GPUs, one CPU."""
    import ray

    res = ray.cluster_resources()
    have_gpus, have_cpus = float(res.get("GPU", 0.0)), float(res.get("CPU", 0.0))
    gpus = gpus_per_trial if gpus_per_trial is not None else (0.25 if have_gpus > 0 else 0.0)
    cpus = cpus_per_trial if cpus_per_trial is not None else 1.0
    if gpus > 0 and have_gpus == 0:
        raise UserError(
            f"--gpus-per-trial {gpus:g}: the Ray cluster has no GPU; leave the option out to "
            "train on CPUs, or join a cluster with GPUs (--address)"
        )
    if cpus > have_cpus:
        raise UserError(f"--cpus-per-trial {cpus:g}: the Ray cluster has only {have_cpus:g} CPUs")
    return gpus, cpus


def trial_slots(cpus: float, gpus: float, limit: int | None = None) -> int:
    """How many trials of (cpus, gpus) the cluster can run at once now (at least 1), capped by
    ``limit`` (the space's ``search.max_concurrent``)."""
    import ray

    res = ray.cluster_resources()
    fits = [res.get("CPU", 0.0) / cpus] if cpus > 0 else []
    if gpus > 0:
        fits.append(res.get("GPU", 0.0) / gpus)
    slots = max(1, int(min(fits) + 1e-9)) if fits else 1
    return min(slots, limit) if limit else slots


# --- stopping the driver -----------------------------------------------------------------------------
#
# Ctrl-C and SIGTERM (batch schedulers, `kill`) must stop a study cleanly: exit 130, resumable. Python
# runs a signal handler in the main thread and raises its exception wherever that thread is, and a few
# places swallow exceptions: the at-fork hooks that run while ray.init starts its processes, __del__
# methods. An interrupt raised there is lost and the study runs on. So every stop request is also
# recorded, and the driver checks the record at each phase boundary (`check_stop`); during ray.init
# the request is only recorded (a half-started Ray would leave orphaned processes) and acted on as soon
# as ray.init returns — a second Ctrl-C interrupts at once.

_STOP = threading.Event()
_DEFERRING = threading.Event()


def _on_stop_signal(signum, frame) -> None:
    repeated = _STOP.is_set()
    _STOP.set()
    if _DEFERRING.is_set() and not repeated:
        return
    if signum == signal.SIGTERM:
        # To whoever handles Ctrl-C now: inside Tune's fit that is Tune's graceful stop (it snapshots
        # the experiment and leaves unfinished trials resumable), elsewhere ours.
        os.kill(os.getpid(), signal.SIGINT)
    else:
        raise KeyboardInterrupt


_STOP_REASON: list[str] = []


def request_stop(reason: str) -> None:
    """Stop the study as Ctrl-C would (inside Tune's loop: its graceful stop), and say ``reason``
    instead of "interrupted" at the end; once."""
    if _STOP_REASON:
        return
    _STOP_REASON.append(reason)
    _STOP.set()
    os.kill(os.getpid(), signal.SIGINT)


def stop_reason() -> str | None:
    """The reason given to :func:`request_stop`, if any."""
    return _STOP_REASON[0] if _STOP_REASON else None


def check_stop() -> None:
    """Raise KeyboardInterrupt if a stop was requested, even if its exception was swallowed."""
    if _STOP.is_set():
        raise KeyboardInterrupt


def stop_requested() -> bool:
    """A stop was requested (for code inside Tune's loop, which must not raise: Tune stops itself)."""
    return _STOP.is_set()


def wait_unless_stopped(seconds: float) -> None:
    """Sleep up to ``seconds``, ending early on Ctrl-C or SIGTERM, also inside Tune's loop: there
    Tune's own SIGINT handler only flags a graceful stop and the sleep would run on. The signal is
    recorded and passed on to whichever handler was there (ours raises, Tune's stops the run)."""
    if threading.current_thread() is not threading.main_thread():
        _STOP.wait(seconds)
        return
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum, frame):
        _STOP.set()
        signal.signal(signal.SIGINT, previous)
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGINT, on_sigint)
    try:
        _STOP.wait(seconds)
    finally:
        if signal.getsignal(signal.SIGINT) is on_sigint:
            signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def stop_signals_deferred():
    """Around ray.init: record stop requests instead of raising inside it (see above), keep Ray from
    replacing our SIGTERM handler with its own ``sys.exit(15)`` (swallowed in an at-fork hook, it lost
    the signal: ``study.compat``, entry ``ray-sigterm-guard``), and act on a recorded request
    afterwards."""
    _DEFERRING.set()
    try:
        with compat.ray_keeps_sigterm_handler():
            yield
    finally:
        _DEFERRING.clear()
        signal.signal(signal.SIGTERM, _on_stop_signal)
        signal.signal(signal.SIGINT, _on_stop_signal)
    check_stop()


@contextlib.contextmanager
def stop_signals():
    """Within: SIGINT and SIGTERM stop the driver (a KeyboardInterrupt, also when its exception was
    swallowed, see :func:`check_stop`); the previous handlers are restored afterwards."""
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    _STOP.clear()
    for sig in old:
        signal.signal(sig, _on_stop_signal)
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


# --- what every node of a cluster must see ----------------------------------------------------------------

NODE_CHECK_TIMEOUT_S = 60.0
"""How long the per-node check waits for a node's answer (a node busy with another job's tasks may
take a while to start one more)."""


def _node_sees(nonce_file: str, nonce: str, data_files: list[str], store=None) -> dict:
    """Runs on one node: does it see the driver's nonce file (in the results folder, or in ``store``),
    and the dataset's files?"""
    import os as _os

    import ray as _ray

    try:
        if store is not None:
            data = store.get(nonce_file)
            text = data.decode() if data is not None else None
            if text is None:
                raise FileNotFoundError(2, "the check file is not there")
        else:
            with open(nonce_file) as f:
                text = f.read()
        results = "ok" if text.strip() == nonce else "another folder at the same path (its check file differs)"
    except Exception as e:  # noqa: BLE001 - whatever the node cannot do, said in the one line
        results = getattr(e, "strerror", None) or str(e).splitlines()[0][:200] or type(e).__name__
    missing = [p for p in data_files if not _os.path.exists(p)]
    return {"node": _ray.get_runtime_context().get_node_id(), "results": results, "missing": missing}


def _node_name(node: dict) -> str:
    """A node of ``ray.nodes()`` in a message: its IP and the start of its Ray node id."""
    return f"node {node['NodeManagerAddress']} (Ray node {node['NodeID'][:8]})"


def check_nodes(results_root, data_files: list[str], store=None, timeout: float = NODE_CHECK_TIMEOUT_S) -> None:
    """Under ``--address``, before any trial: one tiny task pinned to every alive node (Ray's
    node-affinity strategy) reads a nonce file the driver has just written into the study's
    folder — or, with a ``store`` apart from it (``study.store``), into the store — and checks that
    ``data_files`` (what trials read from ``--data-dir``) exist. A node that cannot see them raises a
    :class:`UserError` naming the node (its IP and Ray node id) and what to do. Without a store, trials
    write their checkpoints and records into the study folder, so on a node that does not share it they
    would "complete" onto that node's own disk."""
    import secrets
    from pathlib import Path

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nonce = secrets.token_hex(16)
    name = f".node-check-{nonce[:8]}"
    if store is not None:
        store.put(name, nonce.encode())
        from study.store import without_options

        nonce_file, where = name, f"the store {without_options(store.uri)}"
    else:
        nonce_file, where = str(Path(results_root) / name), f"the results folder {results_root}"
        Path(nonce_file).write_text(nonce)
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        task = ray.remote(num_cpus=0)(_node_sees)
        refs = {
            task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                nonce_file, nonce, data_files, store
            ): n
            for n in nodes
        }
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        problems = []
        for ref in ready:
            node = refs[ref]
            try:
                seen = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - the node died meanwhile, or the task could not run
                problems.append(f"{_node_name(node)}: the check failed ({type(e).__name__})")
                continue
            node_name = _node_name(node)
            if seen["results"] != "ok":
                fix = (
                    "check the store's address and that every node has its credentials in its environment"
                    if store is not None
                    else "mount it at the same path on every node (trials write their checkpoints and records "
                    "there), or pass --store s3://BUCKET/PREFIX (or another store every node reaches)"
                )
                problems.append(f"{node_name} cannot see {where} ({seen['results']}); {fix}")
            elif seen["missing"]:
                problems.append(
                    f"{node_name} lacks the dataset's files under --data-dir (e.g. {seen['missing'][0]}); "
                    "put them at the same path on every node"
                )
        for ref in pending:
            ray.cancel(ref, force=False)
            node = refs[ref]
            problems.append(f"{_node_name(node)} did not answer the folder check within {timeout:.0f} s")
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise UserError(problems[0] + more)
    finally:
        if store is not None:
            store.delete(nonce_file)
        else:
            Path(nonce_file).unlink(missing_ok=True)
