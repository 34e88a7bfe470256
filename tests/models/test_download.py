"""Downloads with progress and stop (models/download.py) against a local stand-in for the Hub (tests/fake_hub.py),
with huggingface_hub itself doing the downloading in a subprocess pointed at it (HF_ENDPOINT)."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_hub import FakeHub, serving

REPO_ID = "someone/tiny-repo"
PIECE = 1 << 20  # served in 1 MiB pieces, 20 ms apart: a 24 MiB file takes about half a second
FILES = {"config.json": b'{"a": 1}\n', "weights/model.safetensors": bytes(range(256)) * (24 * PIECE // 256)}


@pytest.fixture()
def hub() -> Iterator[FakeHub]:
    with serving(FakeHub(REPO_ID, FILES, piece=PIECE, delay=0.02)) as server:
        yield server


SCRIPT = """
import json, sys, time
from pathlib import Path
from ruyi_trt.models.download import DOWNLOAD_DONE, download_checkpoint
folder, stop_at = Path(sys.argv[1]), int(sys.argv[2])
reports, raised = [], []
class Stop(Exception):
    pass
def progress(done, total):
    reports.append((done, total))
    if stop_at and done >= stop_at:
        raised.append(time.monotonic())
        raise Stop()
try:
    download_checkpoint(folder, "someone/tiny-repo", progress)
    outcome, returned_after = "done", None
except Stop:
    outcome, returned_after = "stopped", time.monotonic() - raised[0]
big = folder / "weights" / "model.safetensors"
print(json.dumps({"outcome": outcome, "reports": reports, "returned_after": returned_after, "big_file": big.exists(),
                  "marked": (folder / DOWNLOAD_DONE).is_file()}))
"""


def download(hub: FakeHub, folder: Path, stop_at: int = 0) -> dict:
    env = {**hub.env(), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(folder), str(stop_at)], env=env, capture_output=True,
                            text=True, timeout=120, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_progress_counts_bytes_up_to_the_total(hub: FakeHub, tmp_path: Path) -> None:
    total = sum(len(data) for data in FILES.values())
    result = download(hub, tmp_path / "repo")
    reports = [tuple(r) for r in result["reports"]]
    assert result["outcome"] == "done" and reports[0] == (0, total) and reports[-1] == (total, total)
    assert result["marked"]  # complete: the next `missing_parts` finds nothing missing
    assert [done for done, _ in reports] == sorted(done for done, _ in reports)
    for name, data in FILES.items():
        assert (tmp_path / "repo" / name).read_bytes() == data


def test_a_stopped_download_ends_at_once_and_the_next_call_finishes_it(hub: FakeHub, tmp_path: Path) -> None:
    """Stop once the large file is under way (the callback raises, as ComfyUI's Cancel does): the call returns at
    once, and with huggingface_hub >= 1.0 the file stops too (older ones finish it in the background, here before
    the process exits); the next call fetches only what is missing and gets every byte right."""
    from huggingface_hub import hf_hub_download

    big = "weights/model.safetensors"
    stopped = download(hub, tmp_path / "repo", stop_at=len(FILES["config.json"]) + 1)
    assert stopped["outcome"] == "stopped" and stopped["returned_after"] < 1.0 and not stopped["marked"]
    if "tqdm_class" in inspect.signature(hf_hub_download).parameters:
        assert not stopped["big_file"] and not (tmp_path / "repo" / big).exists()
    assert (tmp_path / "repo" / "config.json").exists()
    done = download(hub, tmp_path / "repo")
    assert done["outcome"] == "done" and done["marked"] and (tmp_path / "repo" / big).read_bytes() == FILES[big]
    assert hub.gets.count("config.json") == 1 and hub.gets[0] == "config.json", hub.gets  # finished files stay
    assert hub.gets.count(big) + sum(g.startswith(big + ":") for g in hub.gets) <= 2, hub.gets
