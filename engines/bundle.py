"""Writing a bundle folder atomically: everything goes to a staging folder, renamed into place last.

Nothing that is not a stdrc bundle is ever deleted or moved: an `--out` that is a file, or
a folder holding anything but a bundle, is refused before the build starts. Staging folders
left by builds that were killed (`.NAME.partial-PID` of a dead PID) are removed by the
next build into the same place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from stdrc.runtime.errors import InputError
from stdrc.runtime.manifest import MANIFEST_NAME, Manifest, write_json_atomic

log = logging.getLogger(__name__)
STAGING_KINDS = ("partial", "old")


def is_bundle(folder: Path) -> bool:
    """A folder whose manifest.json is a stdrc manifest (a JSON object with a format and components)."""
    try:
        data = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and "format" in data and isinstance(data.get("components"), dict)


def check_out(out: str | os.PathLike) -> Path:
    """The absolute `--out`: new, empty, or a stdrc bundle (a build never replaces anything else).

    Checked before the build (preflight) and again before the bundle is committed."""
    out = Path(out).absolute()
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise InputError(f"--out {out} is a file, not a bundle folder: pass a new folder path (nothing was changed)")
    if out.is_dir() and any(out.iterdir()) and not is_bundle(out):
        raise InputError(f"--out {out} is an existing folder that is not a stdrc bundle (no stdrc manifest.json): "
                         "pass a new folder path, or empty that one yourself (nothing was changed)")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"--out {out}: {parent} is a file, not a folder: pass a path in a folder")
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_staging(out: Path) -> list[Path]:
    """Remove `.NAME.partial-PID` / `.NAME.old-PID` folders next to `out` whose build process is gone."""
    removed = []
    for kind in STAGING_KINDS:
        for path in out.parent.glob(f".{out.name}.{kind}-*"):
            pid = path.name.rsplit("-", 1)[1]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)) \
                    and path.is_dir() and not path.is_symlink():
                log.info("removing %s, left by a build that was killed", path)
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


class BundleWriter:
    """`with BundleWriter(out) as staging: ...` -> `out` appears only once `commit` ran."""

    def __init__(self, out: str | os.PathLike):
        self.out = check_out(out)
        self.staging = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        self._committed = False

    def __enter__(self) -> BundleWriter:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(self.out)
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir()
        return self

    def path(self, name: str) -> Path:
        return self.staging / name

    def commit(self, manifest: Manifest) -> Path:
        data = manifest.to_json()
        Manifest.from_json(json.loads(json.dumps(data)))  # never write a manifest the runtime would refuse
        write_json_atomic(self.staging / MANIFEST_NAME, data)
        check_out(self.out)  # again: the folder may have changed during the build
        old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
        moved = False
        if self.out.is_dir() and any(self.out.iterdir()):
            os.replace(self.out, old)
            moved = True
        elif self.out.is_dir():
            self.out.rmdir()  # an empty folder holds nothing to lose
        try:
            os.replace(self.staging, self.out)
        except BaseException:
            if moved:
                os.replace(old, self.out)
            raise
        shutil.rmtree(old, ignore_errors=True)
        self._committed = True
        return self.out

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            shutil.rmtree(self.staging, ignore_errors=True)
