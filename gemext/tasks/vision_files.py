"""Image archives read offline for the vision datasets (gemext.tasks.vision_data): the data root,
zip files or extracted folders as one `Source`, decoding to uint8 tensors (in worker processes when
there are many images), and the cache of decoded tensors.

Nothing here downloads. Sources are decoded once into a uint8 tensor file in a cache directory,
keyed by the sources' sizes and mtimes, so later runs start in about a second."""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import re
import warnings
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["data_root", "cache_dir", "stat_key", "cached", "find_dir", "Source", "decode", "grouped"]

_CACHE_VERSION = 1  # bump when the decoding changes, so stale caches are not reused


# --------------------------------------------------------------------------- paths and cache
def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: `root`, else $GEMEXT_DATA; a FileNotFoundError when neither is a folder."""
    if root is None:
        root = os.environ.get("GEMEXT_DATA") or None
        if root is None:
            # for command-line and Python users alike
            raise FileNotFoundError("no data root: set --data-root DIR or the GEMEXT_DATA environment variable "
                                    "(in Python: root=DIR)")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data root {path} does not exist or is not a directory")
    return path


def cache_dir(explicit: str | os.PathLike | None = None, data_dir: Path | None = None) -> Path:
    """Where decoded tensors go: `explicit`, else $GEMEXT_CACHE, else ~/.cache/gemext, else a
    `.gemext-cache` folder next to the data; the first one that can be created and written."""
    candidates = [explicit, os.environ.get("GEMEXT_CACHE") or None, Path.home() / ".cache" / "gemext"]
    if data_dir is not None:
        candidates.append(data_dir / ".gemext-cache")
    tried = []
    for c in candidates:
        if c is None:
            continue
        p = Path(c).expanduser()
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError:
            tried.append(str(p))
            continue
        if os.access(p, os.W_OK):
            return p
        tried.append(str(p))
    raise PermissionError(f"no writable cache directory (tried {tried}); set GEMEXT_CACHE")


def stat_key(paths: Sequence[Path], extra: object) -> str:
    """Cache key from the preprocessing parameters and every source file's size and mtime."""
    entries = []
    for p in paths:
        st = p.stat()
        entries.append((str(p), st.st_size, st.st_mtime_ns))
    blob = json.dumps([_CACHE_VERSION, extra, entries]).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def cached(name: str, key: str, build: Callable[[], dict], where: Path) -> dict:
    """Load `where/name-key.pt` (memory-mapped), or build it and write it atomically."""
    path = where / f"{name}-{key}.pt"
    if path.exists():
        try:
            return torch.load(path, mmap=True, weights_only=True)
        except Exception as exc:  # a damaged cache is rebuilt, not fatal
            warnings.warn(f"rebuilding unreadable cache {path}: {exc}", stacklevel=2)
    obj = build()
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)  # atomic: concurrent readers never see a half-written file
    finally:
        tmp.unlink(missing_ok=True)
    return obj


def find_dir(root: Path, subdirs: Sequence[str], ok: Callable[[Path], bool], what: str, layout: str) -> Path:
    """The first of root/subdir..., root that `ok` accepts; else a FileNotFoundError naming where it
    looked and the expected `layout`."""
    tried = [root / s for s in subdirs] + [root]
    for d in tried:
        if d.is_dir() and ok(d):
            return d
    raise FileNotFoundError(f"{what} not found under {root} (looked in {', '.join(map(str, tried))}); "
                            f"expected {layout}")


# --------------------------------------------------------------------------- decoding
class Source:
    """A zip file or an extracted folder; members are '/'-separated paths relative to it."""

    def __init__(self, path: Path, layout: str):
        self.path, self.is_zip = path, path.suffix == ".zip"
        if self.is_zip:
            try:
                with zipfile.ZipFile(path) as zf:
                    self._names = zf.namelist()
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise ValueError(f"corrupt or unreadable zip {path}: {exc}; expected {layout}") from exc

    def members(self, pattern: re.Pattern) -> list[str]:
        if self.is_zip:
            names = self._names
        else:
            names = [p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file()]
        return sorted(n for n in names if pattern.fullmatch(n))

    def files(self, members: Sequence[str]) -> list[Path]:
        """Files whose size and mtime key the cache."""
        return [self.path] if self.is_zip else [self.path / m for m in members]


def _decode_chunk(job: tuple[str, bool, list[str], str, int, int, bool]) -> np.ndarray:
    src, is_zip, members, mode, size, resample, invert = job
    zf = zipfile.ZipFile(src) if is_zip else None
    out = np.empty((len(members), size, size, 3 if mode == "RGB" else 1), np.uint8)
    try:
        for i, m in enumerate(members):
            where = f"{src}!{m}" if is_zip else os.path.join(src, m)
            try:
                data = zf.read(m) if zf is not None else Path(where).read_bytes()
                with Image.open(io.BytesIO(data)) as im:
                    im = im.convert(mode)  # grayscale Tiny-ImageNet JPEGs become RGB here
                    if im.size != (size, size):
                        im = im.resize((size, size), resample)
                    out[i] = np.asarray(im, np.uint8).reshape(size, size, -1)
            except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as exc:
                raise ValueError(f"corrupt image {where}: {exc}") from exc
    finally:
        if zf is not None:
            zf.close()
    return 255 - out if invert else out


def decode(src: Source, members: list[str], mode: str, size: int, resample: int,
            invert: bool = False) -> torch.Tensor:
    """Decode images to uint8 [N, C, size, size], in worker processes when there are many."""
    workers = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8)
    n_chunks = 1 if workers == 1 or len(members) < 2000 else 4 * workers
    bounds = np.linspace(0, len(members), n_chunks + 1).astype(int)
    jobs = [(str(src.path), src.is_zip, members[a:b], mode, size, resample, invert)
            for a, b in zip(bounds[:-1], bounds[1:])]
    from ..progress import Progress

    desc = f"decoding {len(members)} images of {src.path.name} (cached afterwards)"
    if n_chunks == 1:
        parts = [_decode_chunk(j) for j in jobs]
    else:
        # fork: workers only run PIL/numpy, and skip re-importing torch (spawn costs ~2 s each)
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(workers) as pool:
            parts = list(Progress(pool.imap(_decode_chunk, jobs), len(jobs), desc, every=max(1, len(jobs) // 8)))
    arr = np.concatenate(parts) if parts else np.empty((0, size, size, 1), np.uint8)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _natural(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def grouped(members: list[str], key: Callable[[str], str]) -> tuple[list[str], list[str], torch.Tensor]:
    """Members sorted class by class (classes, then files, in natural order), class names, offsets."""
    ordered = sorted(members, key=lambda m: (_natural(key(m)), _natural(m)))
    names = list(dict.fromkeys(key(m) for m in ordered))
    pos = {n: i for i, n in enumerate(names)}
    counts = torch.bincount(torch.tensor([pos[key(m)] for m in ordered], dtype=torch.int64), minlength=len(names))
    return ordered, names, torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
