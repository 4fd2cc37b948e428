"""The README's usage example runs as printed and does what its comments say."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_usage_example_runs_and_reaches_grafting(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    example = next(b for b in blocks if "ChunkedKasminaLayer" in b)
    script = tmp_path / "example.py"
    script.write_text("import torch\ntorch.manual_seed(0)\n" + example)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert "epochs TRAINING requires" in lines[0]
    assert lines[-2].endswith("grafting: alpha now ramps 0 -> 1")
    assert "'GRAFTING': 1" in lines[-1] and "'TRAINING': 0" in lines[-1]
