"""Which exact weights a model runs with: the revision written on every event it makes.

- a local checkpoint (a file, or a directory such as ``save_pretrained`` writes):
  ``sha256:<hex>``, over its weight files (name and content), hashed once per file
  and cached by path, size and modification time (in memory, and in
  ``$XDG_CACHE_HOME/genseg/weight-hashes.json`` so a restart does not rehash 5 GB);
- a Hugging Face id: ``commit:<hex>``, the commit its local snapshot resolves to
  (never a download: a worker loaded it, so the snapshot is there); ``hub:<id>`` when
  it cannot be resolved;
- a URL (a SAM checkpoint fetched through the torch.hub cache): the hash of the cached
  file when present, else ``url:<url>``;
- seeded random weights: ``seed:<n>`` (the stages say so themselves).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Suffixes of the files that hold weights (configs and tokenizers do not count).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".msgpack", ".h5", ".gguf")
_CHUNK = 8 << 20

_lock = threading.Lock()
_memory: dict[str, str] = {}


def model_revision(
    profile: str, source: str, *, seed: int, modules: Callable[[], Sequence[Any]]
) -> str:
    """The revision of a stage's model under ``profile``: ``seed:<n>`` for the seeded
    ``tiny`` and ``random`` profiles, :func:`revision_of` ``source`` for ``pretrained``,
    and for a plug-in profile (whose weights' source is its own) a hash of the loaded
    tensors of ``modules()`` (:func:`tensor_revision`)."""
    if profile in ("tiny", "random"):
        return f"seed:{seed}"
    if profile == "pretrained":
        return revision_of(source)
    return tensor_revision(modules())


def tensor_revision(modules: Sequence[Any]) -> str:
    """``weights-sha256:<hex>`` over the named tensors of torch ``modules``."""
    digest = hashlib.sha256()
    for number, module in enumerate(modules):
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(f"{number}.{name}:{tuple(tensor.shape)}:{tensor.dtype}\0".encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return "weights-sha256:" + digest.hexdigest()


def revision_of(source: str) -> str:
    """The revision of the weights ``source`` names (see the module docstring)."""
    if "://" in source:
        cached = _torch_hub_file(source)
        return file_revision(cached) if cached is not None else f"url:{source}"
    path = Path(source).expanduser()
    if path.exists():
        return file_revision(path)
    return _hub_revision(source)


def file_revision(path: Path) -> str:
    """``sha256:<hex>`` of a weight file, or of a directory's weight files."""
    path = path.resolve()
    if path.is_file():
        return "sha256:" + _file_sha256(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:  # no file we recognise as weights: every file counts
        files = sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.relative_to(path).as_posix()}\0{_file_sha256(file)}\n".encode())
    return "sha256:" + digest.hexdigest()


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    key = f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}"
    with _lock:
        if key in _memory:
            return _memory[key]
        disk = _load_disk_cache()
        if key in disk:
            _memory[key] = disk[key]
            return disk[key]
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    value = digest.hexdigest()
    with _lock:
        _memory[key] = value
        _save_disk_cache(key, value)
    return value


def _cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "genseg" / "weight-hashes.json"


def _load_disk_cache() -> dict[str, str]:
    try:
        data = json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save_disk_cache(key: str, value: str) -> None:
    """Best effort: a read-only home only costs a rehash at the next start."""
    path = _cache_path()
    try:
        data = _load_disk_cache()
        data[key] = value
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(data, sort_keys=True))
        os.replace(tmp, path)
    except OSError as exc:
        log.debug("weight hash cache not written: %s", exc)


def _hub_revision(repo_id: str) -> str:
    """``commit:<hex>`` of the local snapshot of ``repo_id``; ``hub:<id>`` if none."""
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id, local_files_only=True)
    except Exception as exc:  # not cached, not a repo id, no huggingface_hub: say so
        log.warning("cannot resolve the revision of %s: %s", repo_id, exc)
        return f"hub:{repo_id}"
    return "commit:" + Path(folder).name


def _torch_hub_file(url: str) -> Path | None:
    """Where torch.hub caches the checkpoint at ``url`` (``load_state_dict_from_url``)."""
    home = os.environ.get("TORCH_HOME") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "torch"
    )
    path = Path(home) / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    return path if path.is_file() else None
