"""iommu-dma run inside the test process, as the VM tests drive it.

A subprocess pays Python's start and our imports again: 10-15 s per command under TCG, where
a bench guest runs. Here main() runs in this process with stdin not a terminal; output is
captured at the file-descriptor level, so what setup_vfio.sh writes is seen too.
"""

from __future__ import annotations

import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from iommu_dma.cli.main import main


@dataclass
class Run:
    rc: int
    out: bytes
    err: str

    @property
    def text(self) -> str:
        return self.out.decode()

    def json(self) -> Any:
        return json.loads(self.out)


class Cli:
    def __init__(self, capfd: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch
                 ) -> None:
        self.capfd = capfd
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))

    def __call__(self, *args: object) -> Run:
        self.capfd.readouterr()
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:                   # argparse usage errors
            rc = int(e.code or 0)
        sys.stdout.flush()
        sys.stderr.flush()
        out, err = self.capfd.readouterr()
        return Run(rc, out, err.decode())

    def ok(self, *args: object) -> Run:
        r = self(*args)
        assert r.rc == 0, f"iommu-dma {args} failed ({r.rc}): {r.err}"
        return r

    def fails(self, *args: object, message: str, rc: int = 1, progress: int | None = None
              ) -> Run:
        """The command exits with rc and says message on stderr; with rc 1 its last stderr
        line is the one-line error (no traceback), holding message after exactly `progress`
        lines (notes, progress) when that is given."""
        r = self(*args)
        assert r.rc == rc, f"iommu-dma {args}: exit {r.rc}, expected {rc}: {r.err}"
        assert message in r.err, r.err
        if rc == 1:
            lines = r.err.strip().splitlines()
            assert lines[-1].startswith("iommu-dma: error: ") and "Traceback" not in r.err
            if progress is not None:
                assert len(lines) == progress + 1 and message in lines[-1], r.err
        return r


def image_bytes(images: Path, ctrl: int, nsid: int, offset: int, size: int) -> bytes:
    with open(images / f"c{ctrl}n{nsid}.img", "rb") as f:
        f.seek(offset)
        return f.read(size)
