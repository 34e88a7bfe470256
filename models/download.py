"""Downloading the released checkpoint (or any Hub repository) into a folder: resumable, marked when complete, with
progress a host can show and stop (ComfyUI's progress bar).

`download_checkpoint(folder)` runs huggingface_hub's `snapshot_download` into `folder` with its tqdm bars: files
appear under their names only when complete, partial ones wait in `folder/.cache/huggingface` (`HF_CACHE_DIR`) and
the next call resumes them; `DOWNLOAD_DONE` is written once everything is there, so a folder without it whose
download began counts as incomplete (`models.checkpoint.missing_parts`). With `progress`, the same download goes
through `download_repo` instead.

`download_repo(repo_id, folder, progress)` fetches the files one after another with `hf_hub_download`, each in a
worker thread, while the calling thread reports `progress(bytes_done, bytes_total)` about every half second; the
callback may raise (ComfyUI's Cancel) and the call ends at once. The running file stops at its next chunk where
huggingface_hub reports bytes to a progress class (its plain HTTP path; otherwise it finishes in the background);
finished files stay, so the next call fetches only the rest (huggingface_hub 0.x also resumes a partial file, >= 1.0
fetches it again). Byte counts inside a file need huggingface_hub >= 1.0 (whose `hf_hub_download` takes
`tqdm_class`); older versions count whole files.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

from ..files import atomic_write
from .checkpoint_io import CHECKPOINT_REPO, CheckpointError

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
HF_CACHE_DIR = ".cache/huggingface"  # huggingface_hub's bookkeeping (and partial files) in a local_dir download
DOWNLOAD_DONE = ".cache/ruyi-trt-download-complete"  # written when a download into the folder has finished


class DownloadStopped(Exception):
    """Raised inside the download thread once the caller has stopped the download."""


class _Bytes:
    """Bytes of the current file so far (the largest count of its progress bars: huggingface_hub may run two, for
    transfer and reconstruction), and the stop flag that every byte update checks (from any thread)."""

    def __init__(self) -> None:
        self.count, self.stop = 0, False

    def seen(self, count: int) -> None:
        self.count = max(self.count, count)
        if self.stop:
            raise DownloadStopped()


def _progress_class(counter: _Bytes) -> type:
    """A huggingface_hub tqdm class whose byte updates go to `counter` (and stop the download once asked)."""
    from huggingface_hub.utils import tqdm as hub_tqdm

    class CountingTqdm(hub_tqdm):
        def __init__(self, *args, **kwargs) -> None:
            self.counted = kwargs.get("initial", 0) or 0
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            self.counted += int(n or 0)
            counter.seen(self.counted)
            return super().update(n)

    return CountingTqdm


def download_repo(repo_id: str, folder: Path, progress: Callable[[int, int], None]) -> Path:
    """Download every file of `repo_id` into `folder` (resuming partial files), reporting bytes through `progress`.

    Raises what `progress` raises, and huggingface_hub's errors (offline, not found)."""
    from huggingface_hub import HfApi, hf_hub_download

    info = HfApi().model_info(repo_id, files_metadata=True)
    files = [(sibling.rfilename, sibling.size or 0) for sibling in info.siblings]
    total, done = sum(size for _, size in files), 0
    byte_counts = "tqdm_class" in inspect.signature(hf_hub_download).parameters
    progress(0, total)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ruyi-download")
    try:
        for name, size in files:
            counter = _Bytes()
            extra = {"tqdm_class": _progress_class(counter)} if byte_counts else {}
            job = pool.submit(hf_hub_download, repo_id, name, revision=info.sha, local_dir=str(folder), **extra)
            try:
                while not wait([job], timeout=POLL_SECONDS).done:
                    progress(done + min(counter.count, size), total)
                job.result()
            except BaseException:
                counter.stop = True  # the worker stops at its next byte update
                raise
            done += size
            progress(done, total)
    finally:
        pool.shutdown(wait=False)  # a stopped file may still be finishing its last chunk: do not wait for it
    return folder


def download_checkpoint(
    folder: Path, repo_id: str = CHECKPOINT_REPO, progress: Callable[[int, int], None] | None = None
) -> Path:
    """Download (or resume) the released checkpoint into `folder`: with huggingface_hub's progress bars, or with
    `progress(bytes_done, bytes_total)` about every half second, which may raise to stop it (`download_repo`).

    A stopped download (Ctrl-C, the host's Cancel) keeps what it has; the next call resumes it."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HTTPError,  # its HTTP library's errors: requests' (< 1.0) or httpx's (offline)
        LocalEntryNotFoundError,
    )

    log.info("downloading %s (about 17 GB) into %s", repo_id, folder)
    try:
        if progress is None:
            snapshot_download(repo_id=repo_id, local_dir=str(folder))
        else:
            download_repo(repo_id, folder, progress)
    except (LocalEntryNotFoundError, HfHubHTTPError, HTTPError, OSError) as exc:
        raise CheckpointError(
            f"could not download {repo_id} into {folder} ({exc}). If this machine is offline, download it "
            f"elsewhere with `hf download {repo_id} --local-dir Ruyi-Mini-7B`, copy the folder here "
            "and pass --model PATH (or use --model tiny to try the pipeline with a small random model)."
        ) from exc
    except BaseException:
        log.warning("download of %s interrupted; the next run resumes it (partial files in %s)", repo_id,
                    folder / HF_CACHE_DIR)  # fmt: skip
        raise
    atomic_write(folder / DOWNLOAD_DONE, lambda tmp: tmp.write_text(f"{repo_id}\n"))
    return folder
