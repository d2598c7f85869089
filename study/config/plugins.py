"""Plug-ins: the user's own modules that register backbones, losses, stage-2 methods or datasets.

A space lists them under ``plugins:`` — import paths (``my_lab.ltr``, installed or on
``PYTHONPATH``) or ``.py`` files (relative to the space file's folder). They are imported before the
rest of the space is read, so the names they register validate like the built-ins'. Each is
recorded in the space (``study.yaml``) with the sha256 of its source — every ``.py`` file of a
package — and its distribution's version when installed: a changed plug-in changes the study's
fingerprint, so resuming with different plug-in code is refused with the difference, as a changed
space is.

How trials get them: a file plug-in is copied into the study folder (``plugins/``) when the study
starts, and every trial imports that copy, under the same module name as the driver. The trials
therefore run the code the study recorded, even if the original file is edited mid-run; under
``--address`` the copy travels the way everything else in the study folder does (the folder must be
shared by the nodes). An import-path plug-in is imported by name, like ``study`` itself: install it
on every node.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from study.config.registry import _registering_plugin
from study.errors import ConfigError, UserError

PLUGINS_KEY = "plugins"
"""The space's top-level key listing the plug-ins."""


@dataclass(frozen=True)
class Plugin:
    """One imported plug-in and what identifies its code."""

    spec: str
    """As the space names it: an import path or a file path."""
    module: str
    """The module name it is imported under (a file ``x.py`` becomes ``study_plugin_x``)."""
    sha256: str
    """Of the file, or of a package's ``.py`` files (path and content, sorted)."""
    version: str | None = None
    """The installed distribution's version, for an import-path plug-in that has one."""
    path: str | None = None
    """The file a file plug-in was imported from (not part of the fingerprint)."""

    def record(self) -> dict[str, Any]:
        """What the space records (and the fingerprint covers)."""
        out: dict[str, Any] = {"module": self.module, "sha256": self.sha256}
        if self.version:
            out["version"] = self.version
        if self.path:
            out["file"] = Path(self.path).name
        return out


def _is_file_spec(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or spec.startswith(".")


def file_module_name(path: Path) -> str:
    return "study_plugin_" + "".join(c if c.isalnum() else "_" for c in path.stem)


def source_digest(module: Any) -> str:
    """sha256 of a module's source file, or of every ``.py`` file of a package (relative path and
    content, sorted by path)."""
    h = hashlib.sha256()
    paths = getattr(module, "__path__", None)
    if paths:
        root = Path(list(paths)[0])
        for f in sorted(root.rglob("*.py")):
            h.update(str(f.relative_to(root)).encode() + b"\0")
            h.update(f.read_bytes())
        return h.hexdigest()
    h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()


def _version_of(module_name: str) -> str | None:
    from importlib import metadata

    top = module_name.split(".")[0]
    for dist in metadata.packages_distributions().get(top, []):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:  # pragma: no cover - listed but not installed
            continue
    return None


def one_line(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def import_file(path: Path, label: str) -> Any:
    """Import a plug-in file under :func:`file_module_name` (again if it was imported before from
    another path); registrations carry ``label`` as their origin."""
    name = file_module_name(path)
    old = sys.modules.get(name)
    if old is not None and Path(getattr(old, "__file__", "")).resolve() == path.resolve():
        return old
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    _registering_plugin.append(label)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        _registering_plugin.pop()
    return module


def _import_name(name: str, label: str) -> Any:
    _registering_plugin.append(label)
    try:
        return importlib.import_module(name)
    finally:
        _registering_plugin.pop()


def load_plugins(specs: Any, base: Path | None = None) -> list[Plugin]:
    """Import the plug-ins a space lists (``plugins:``), in order. A plug-in that cannot be found or
    raises on import is a :class:`UserError` naming it and the problem."""
    if specs is None:
        return []
    if isinstance(specs, str):
        specs = [specs]
    if not isinstance(specs, list) or not all(isinstance(s, str) and s.strip() for s in specs):
        raise ConfigError(PLUGINS_KEY, f"expected a list of import paths or .py files, got {specs!r}")
    out: list[Plugin] = []
    for spec in specs:
        spec = spec.strip()
        if _is_file_spec(spec):
            clash = [p.spec for p in out if p.path and Path(p.path).name == Path(spec).name]
            if clash:
                raise UserError(f"plugins: {spec} and {clash[0]} have the same file name; rename one")
            path = Path(spec).expanduser()
            if not path.is_absolute():
                path = (base or Path.cwd()) / path
            if not path.is_file():
                raise UserError(
                    f"plugins: {spec}: no such file ({path}; a relative path is read from the space file's folder)"
                )
            try:
                module = import_file(path, spec)
            except Exception as e:  # noqa: BLE001 - any failure of user code is one line
                raise UserError(f"plugins: {spec} does not import: {one_line(e)}") from None
            out.append(Plugin(spec, module.__name__, source_digest(module), None, str(path.resolve())))
        else:
            try:
                module = _import_name(spec, spec)
            except ModuleNotFoundError as e:
                raise UserError(
                    f"plugins: {spec} does not import: {one_line(e)} (install it, or put its folder on PYTHONPATH)"
                ) from None
            except Exception as e:  # noqa: BLE001
                raise UserError(f"plugins: {spec} does not import: {one_line(e)}") from None
            out.append(Plugin(spec, module.__name__, source_digest(module), _version_of(spec)))
    return out


def load_recorded(records: dict[str, dict] | None, snapshot_dir: Path | None = None) -> None:
    """Import the plug-ins a study recorded (a trial, or ``study train`` of a stored study): file
    plug-ins from the study's copies in ``snapshot_dir``, import paths by name."""
    for spec, rec in (records or {}).items():
        if "file" in rec and snapshot_dir is not None:
            import_file(snapshot_dir / rec["file"], spec)
        else:
            _import_name(rec["module"], spec)
