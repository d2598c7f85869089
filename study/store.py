"""Where trials keep the files that must outlive the node they run on.

A trial's checkpoints (checksummed, the newest two), its selected weights per seed, its weight norms,
the fault counter of the tests and, for file datasets, the cached stage-2 features are *store* files:
a trial writes them wherever it runs and reads them back after a restart on any node. By default the
store is the study's results folder itself (:class:`LocalStore` rooted at the study: the layout of
``study.layout``, byte for byte), which every node must then mount. ``study run --store URI`` puts
them elsewhere — another local or NFS path, ``s3://bucket/prefix`` (also S3-compatible servers:
``?endpoint_override=host:port&scheme=http``), ``gs://bucket/prefix`` — through ``pyarrow.fs``
(:class:`ArrowStore`); the driver is then the only writer of the results folder: trials send their
events and records in their Tune reports and the driver copies the weights and norms from the store
(``study.search.mirror``).

Keys are ``/``-separated paths relative to the store's root, the same as the files' paths relative
to the study folder, so a trial's files have the same names in every store. Credentials come from the
environment the usual way (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``~/.aws``, an instance
role; ``GOOGLE_APPLICATION_CREDENTIALS``); a URI that carries secrets is refused, since the URI is
recorded with the study and with every trial Tune stores.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from study.errors import UserError
from study.fsutil import atomic_write_bytes
from study.layout import CHECKPOINTS

CHECKPOINT_RE = re.compile(r"^epoch-(\d+)\.pt$")
REMOTE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs")


class Store:
    """A folder of files addressed by relative keys. :meth:`sub` gives the same store one folder down
    (a trial's own files, the stage-1 trial a stage-2 trial trains on)."""

    uri: str = ""
    """Where the store is: a local store's folder; an object store's URI (the study's folder in it, with
    the URI's options, never secrets), the same for every :meth:`sub` of it."""

    def put(self, key: str, data: bytes) -> None:
        """Write ``data`` whole: a reader sees the previous version or this one, never a torn file. A
        second put of the same key replaces it (a late duplicate from a lost node's worker is harmless)."""
        raise NotImplementedError

    def get(self, key: str) -> bytes | None:
        """The file's bytes, or None if there is none."""
        raise NotImplementedError

    def list(self, folder: str = "") -> list[str]:
        """The names of the files directly in ``folder`` (empty when it does not exist)."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        """Remove a file if it exists."""
        raise NotImplementedError

    def delete_folder(self, folder: str) -> None:
        """Remove a folder and everything in it, if it exists."""
        raise NotImplementedError

    def move(self, src: str, dst: str) -> None:
        """Rename a file (a copy and a delete where the store cannot rename)."""
        data = self.get(src)
        if data is not None:
            self.put(dst, data)
            self.delete(src)

    def sub(self, folder: str) -> Store:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        return self.get(key) is not None

    def copy_missing(self, src_folder: str, dst_folder: str, skip: tuple[str, ...] = ()) -> list[str]:
        """Copy the files of ``src_folder`` (one level, and its ``ckpt/``) that ``dst_folder`` lacks."""
        copied = []
        for sub in ("", CHECKPOINTS):
            src, dst = _join(src_folder, sub), _join(dst_folder, sub)
            have = set(self.list(dst))
            for name in self.list(src):
                if name in skip or name in have:
                    continue
                data = self.get(_join(src, name))
                if data is not None:
                    self.put(_join(dst, name), data)
                    copied.append(_join(sub, name))
        return copied


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


class LocalStore(Store):
    """A folder on this machine (or an NFS mount): files written as the results folder's are
    (temporary file, fsync, rename; the umask's modes)."""

    def __init__(self, root: str | os.PathLike, uri: str | None = None):
        self.root = Path(root)
        self.uri = uri if uri is not None else str(self.root)

    def __reduce__(self):
        return (LocalStore, (str(self.root), self.uri))

    def path(self, key: str) -> Path:
        return self.root / key if key else self.root

    def put(self, key: str, data: bytes) -> None:
        atomic_write_bytes(self.path(key), data)

    def get(self, key: str) -> bytes | None:
        try:
            return self.path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def list(self, folder: str = "") -> list[str]:
        try:
            return sorted(p.name for p in self.path(folder).iterdir() if p.is_file())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def delete_folder(self, folder: str) -> None:
        shutil.rmtree(self.path(folder), ignore_errors=True)

    def move(self, src: str, dst: str) -> None:
        try:
            self.path(src).rename(self.path(dst))
        except OSError:
            pass

    def sub(self, folder: str) -> LocalStore:
        return LocalStore(self.path(folder))


class ArrowStore(Store):
    """A ``pyarrow.fs`` filesystem and a base path in it, opened from a URI on first use in each
    process (the filesystem object is not sent between nodes: every node builds its own, with its own
    environment's credentials)."""

    def __init__(self, uri: str, base: str | None = None):
        self.uri = uri
        self._base = base
        self._fs = None

    def __reduce__(self):
        return (ArrowStore, (self.uri, self._base))

    def _open(self):
        if self._fs is None:
            import pyarrow.fs

            fs, base = pyarrow.fs.FileSystem.from_uri(self.uri)
            self._fs, self._base = fs, base if self._base is None else self._base
        return self._fs

    def _path(self, key: str) -> str:
        self._open()
        return _join(self._base, key) if key else self._base.rstrip("/")

    def put(self, key: str, data: bytes) -> None:
        # an object store's PUT (a multipart upload's completion too) is atomic: the object appears
        # whole or not at all
        with self._open().open_output_stream(self._path(key)) as f:
            f.write(data)

    def get(self, key: str) -> bytes | None:
        fs = self._open()
        try:
            with fs.open_input_stream(self._path(key)) as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            if _not_found(e):
                return None
            raise

    def list(self, folder: str = "") -> list[str]:
        import pyarrow.fs

        fs = self._open()
        try:
            infos = fs.get_file_info(pyarrow.fs.FileSelector(self._path(folder), allow_not_found=True))
        except FileNotFoundError:
            return []
        return sorted(i.base_name for i in infos if i.type == pyarrow.fs.FileType.File)

    def delete(self, key: str) -> None:
        self._remove(self._open().delete_file, key)

    def delete_folder(self, folder: str) -> None:
        self._remove(self._open().delete_dir, folder)

    def _remove(self, how, key: str) -> None:
        try:
            how(self._path(key))
        except FileNotFoundError:
            pass
        except OSError as e:
            if not _not_found(e):
                raise

    def move(self, src: str, dst: str) -> None:
        fs = self._open()
        try:
            fs.move(self._path(src), self._path(dst))
        except OSError:
            super().move(src, dst)

    def sub(self, folder: str) -> ArrowStore:
        child = ArrowStore(self.uri, self._path(folder))
        child._fs = self._fs
        return child


def _not_found(e: OSError) -> bool:
    text = str(e)
    return "NoSuchKey" in text or "Path does not exist" in text or "NOT_FOUND" in text or "404" in text


# --- opening a store from the command line --------------------------------------------------------------


def parse_store(spec: str, study: str) -> Store:
    """The store ``--store SPEC`` names, one folder down for study ``study`` (several studies share a
    store). A URI with a scheme goes through ``pyarrow.fs``; a plain path or ``file://`` is local.
    Raises a one-line :class:`UserError` for what cannot be a store; nothing is contacted (pyarrow reads
    the URI's options in :func:`check_store`)."""
    spec = spec.strip()
    if not spec:
        raise UserError("--store: empty; give a folder, s3://bucket/prefix or gs://bucket/prefix")
    parts = urlsplit(spec)
    scheme = parts.scheme.lower()
    if not scheme or len(scheme) == 1:  # a plain path (or a Windows drive letter)
        return LocalStore((Path(spec).expanduser() / study).absolute())
    if scheme == "file":
        return LocalStore(Path(parts.path).absolute() / study)
    if scheme not in REMOTE_SCHEMES:
        raise UserError(
            f"--store {spec}: unknown scheme {scheme}://; give a folder, s3://bucket/prefix or gs://bucket/prefix"
        )
    if parts.username or parts.password:
        raise UserError(
            f"--store: the URI carries credentials ({scheme}://USER:SECRET@...); remove them and set them in "
            "the environment of the driver and of every node (e.g. AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
        )
    if not parts.netloc:
        raise UserError(f"--store {spec}: no bucket; write {scheme}://BUCKET/PREFIX")
    path = _join(parts.path, study)
    uri = f"{scheme}://{parts.netloc}/{path}" + (f"?{parts.query}" if parts.query else "")
    # pyarrow parses the options when the store is first opened (check_store): an S3 URI without
    # region= asks AWS for the bucket's region then, so it is not done here
    return ArrowStore(uri)


def open_store(uri: str) -> Store:
    """The store at ``uri`` as :func:`parse_store` resolved it (a study's folder in it): what a trial's
    context holds."""
    scheme = urlsplit(uri).scheme.lower()
    return ArrowStore(uri) if scheme in REMOTE_SCHEMES else LocalStore(uri)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def missing_credentials(spec: str) -> str | None:
    """What the environment lacks to sign S3 requests for ``spec``, or None (also for other stores).
    Checked before the store is contacted: without credentials the S3 client would otherwise go on to
    ask the cloud's instance metadata service, which only exists on cloud machines."""
    parts = urlsplit(spec)
    if parts.scheme.lower() != "s3" or "anonymous=true" in parts.query.lower():
        return None
    env = os.environ
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        return None
    if env.get("AWS_PROFILE") or env.get("AWS_WEB_IDENTITY_TOKEN_FILE") or env.get("AWS_ROLE_ARN"):
        return None
    files = [
        env.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials",
        env.get("AWS_CONFIG_FILE") or "~/.aws/config",
    ]
    if any(Path(f).expanduser().is_file() for f in files):
        return None
    if env.get("AWS_EC2_METADATA_DISABLED", "").lower() != "true":
        return None  # an instance role may provide them
    return (
        "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the "
        "environment of the driver and of every Ray node"
    )


def check_store(store: Store, spec: str, timeout: float = 30.0) -> None:
    """Write, read back and delete a probe file, within ``timeout`` seconds; a one-line
    :class:`UserError` saying what failed otherwise (nothing is left behind)."""
    import secrets
    import threading

    lack = missing_credentials(spec)
    if lack:
        raise UserError(f"--store {without_options(spec)}: {lack}")
    key = f".store-probe-{secrets.token_hex(6)}"
    nonce = secrets.token_bytes(16)
    outcome: dict[str, Any] = {}

    def probe() -> None:
        try:
            store.put(key, nonce)
            outcome["read"] = store.get(key)
            store.delete(key)
        except BaseException as e:  # noqa: BLE001 - reported below, in one line
            outcome["error"] = e

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise UserError(
            f"--store {without_options(spec)}: no answer within {timeout:.0f} s; check the address (endpoint_override, "
            "network) and try again"
        )
    if "error" in outcome:
        raise UserError(f"--store {without_options(spec)}: {_why_not(outcome['error'])}")
    if outcome.get("read") != nonce:
        raise UserError(
            f"--store {without_options(spec)}: a file written there read back differently; use another store"
        )


def _why_not(e: BaseException) -> str:
    """A failed probe in words, with what to do."""
    text = str(e)
    if "query parameter" in text or "Invalid" in type(e).__name__:
        return f"not a usable URI ({_first_line(e)})"
    if "resolving region" in text:
        return (
            "cannot look up the bucket's region (the URI has no region=, and the lookup failed); "
            "add ?region=REGION, and check endpoint_override and the network"
        )
    if "NETWORK_CONNECTION" in text or "Could not conne" in text or "Couldn't connect" in text:
        return "cannot reach the server (connection failed); check endpoint_override, scheme and the network"
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return "the bucket does not exist; create it first (the store never creates buckets)"
    if any(k in text for k in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ACCESS_DENIED")):
        return "the credentials were refused; check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the profile)"
    if isinstance(e, PermissionError):
        return f"no permission to write there ({e.strerror or e}); choose another --store"
    return f"cannot write there ({_first_line(e)}); check the address, the credentials and the permissions"


def without_options(uri: str) -> str:
    """A store URI without its query (the options, such as an endpoint): where the files are."""
    return uri.split("?", 1)[0]


# --- checkpoints in a store ---------------------------------------------------------------------------------


def save_checkpoint(store: Store, epoch: int, state: dict, keep: int = 2) -> str:
    """Put ``state`` as ``epoch-NNNN.pt`` with a sha256 sidecar into ``store`` (a trial's ``ckpt/``);
    keep the newest ``keep``. Returns the key."""
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    key = f"epoch-{epoch:04d}.pt"
    store.put(key, data)
    store.put(f"epoch-{epoch:04d}.sha256", (hashlib.sha256(data).hexdigest() + "\n").encode())
    names = sorted(n for n in store.list() if CHECKPOINT_RE.match(n))
    for old in names[:-keep]:
        store.delete(old)
        store.delete(old[: -len(".pt")] + ".sha256")
    return key


def load_latest_checkpoint(store: Store) -> tuple[dict | None, list[str]]:
    """The newest checkpoint in ``store`` whose checksum matches and which loads, with notes on any
    newer ones skipped as corrupt (renamed ``*.pt.corrupt``). Loads with ``weights_only=True``."""
    import torch

    notes: list[str] = []
    for name in sorted((n for n in store.list() if CHECKPOINT_RE.match(n)), reverse=True):
        try:
            data = store.get(name)
            if data is None:
                raise ValueError("vanished while being read")
            side = store.get(name[: -len(".pt")] + ".sha256")
            expected = side.decode().strip() if side is not None else None
            if expected is not None and hashlib.sha256(data).hexdigest() != expected:
                raise ValueError("checksum mismatch (truncated or modified)")
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            if not isinstance(state, dict):
                raise ValueError("not a checkpoint dictionary")
            return state, notes
        except Exception as e:  # noqa: BLE001 - a bad file must never stop the study: fall back and say so
            notes.append(f"checkpoint {name} is unusable ({type(e).__name__}: {str(e)[:100]})")
            try:
                store.move(name, name + ".corrupt")
            except OSError:
                pass
    return None, notes


def load_torch(store: Store, key: str) -> Any:
    """A ``torch.save`` file from the store, loaded with ``weights_only=True``; FileNotFoundError if absent."""
    import torch

    data = store.get(key)
    if data is None:
        raise FileNotFoundError(f"{store.uri}/{key}")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def torch_bytes(obj: Any) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()
