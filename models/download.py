"""Downloading a Hub repository into a folder with progress a host can show and stop (ComfyUI's progress bar).

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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

POLL_SECONDS = 0.5


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
