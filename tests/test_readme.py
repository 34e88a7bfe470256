"""The README's Python example, run as written (from a folder holding its example image): it writes a real mp4."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from ruyi_trt.runtime.video import read_video

REPO = Path(__file__).resolve().parents[1]


def readme_python_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    assert blocks, "the README has no ```python block"
    return blocks[0]


def test_readme_python_example_runs(tmp_path: Path, private_cache: Path) -> None:
    (tmp_path / "assets").mkdir()
    shutil.copy(REPO / "assets" / "example.png", tmp_path / "assets" / "example.png")
    result = subprocess.run([sys.executable, "-c", readme_python_example()], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    video = read_video(tmp_path / "outputs" / "demo.mp4")
    assert tuple(video.shape) == (8, 128, 224, 3)
    assert "torch.Size([8, 128, 224, 3]) 24" in result.stdout
