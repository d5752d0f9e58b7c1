"""Writing a bundle folder atomically: everything goes to a staging folder, renamed into place last."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from stdrc.runtime.manifest import MANIFEST_NAME, Manifest, write_json_atomic


class BundleWriter:
    """`with BundleWriter(out) as staging: ...` -> `out` appears only once `commit` ran."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out).absolute()
        self.staging = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        self._committed = False

    def __enter__(self) -> BundleWriter:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir()
        return self

    def path(self, name: str) -> Path:
        return self.staging / name

    def commit(self, manifest: Manifest) -> Path:
        write_json_atomic(self.staging / MANIFEST_NAME, manifest.to_json())
        old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
        if self.out.exists():
            os.replace(self.out, old)
        os.replace(self.staging, self.out)
        shutil.rmtree(old, ignore_errors=True)
        self._committed = True
        return self.out

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            shutil.rmtree(self.staging, ignore_errors=True)
