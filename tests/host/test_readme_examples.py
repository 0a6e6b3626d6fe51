"""The README's asyncio daemon is examples/block_server.py (which a VM test runs): every line
of the README's copy must be in the file, so the two cannot drift apart."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_daemon_is_the_tested_example() -> None:
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / "examples" / "block_server.py").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S)
                 if "async def handle(ns, reader, writer)" in b)
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines()]
    stripped = {re.sub(r"\s+#.*$", "", line.strip()) for line in example.splitlines()}
    # signatures are shown without type hints; every other line as in the file
    missing = [line for line in lines if line and not line.startswith("async def ")
               and line not in stripped]
    assert not missing, f"README lines not in examples/block_server.py: {missing}"


def test_readme_device_suite_is_the_tested_example() -> None:
    """The README's device-test suite is examples/test_device_example.py, verbatim (a VM test
    runs the file with --pciaddr)."""
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / "examples" / "test_device_example.py").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S)
                 if "def test_write_read_on_a_fresh_queue_pair" in b)
    body = example[example.index("import os"):]
    assert block == body, "README's device suite differs from examples/test_device_example.py"
