"""Few-shot vision: Omniglot, Tiny-ImageNet (the miniImageNet stand-in) and miniImageNet read
offline from a data root, an episodic N-way K-shot sampler, and MAML's 4-conv backbone.

Nothing here downloads. Sources are decoded once into a uint8 tensor file in a cache directory,
keyed by the sources' sizes and mtimes, so later runs start in about a second.

Conventions (fixed here so every run uses the same classes):
- Omniglot: 105×105 → 28×28 with PIL LANCZOS (as Finn et al.'s MAML code), then inverted so that
  ink = 1 and background = 0 (zero padding in the convs then matches the background). Characters
  are ordered background alphabets (sorted), then evaluation alphabets (sorted), characters in
  folder order within an alphabet; the first 1200 are meta-train and the remaining 423 meta-test.
  Each character gives 4 classes, rotated by 0/90/180/270 degrees (class 4·c + r).
- Tiny-ImageNet: the 200 wnids sorted, then shuffled by a seeded hash (sha256 of
  "<_TINY_SPLIT_SEED>:<wnid>", which no library version can change) and cut 128/32/40 into
  train/val/test. Each split has its own cache holding the native 64×64 pixels (train: 315 MB);
  `FewShotSplit.gather` upsamples to 84×84 (bilinear) per episode, which is cheap and keeps the
  cache at 58% of the upsampled size.
- miniImageNet: Ravi & Larochelle's `{train,val,test}.csv` (header `filename,label`) with
  `images/<filename>`, resized to 84×84 with LANCZOS (as their script) when not already 84×84.
"""
from __future__ import annotations

import csv
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from . import Task

__all__ = [
    "FewShotSplit", "FewShotTasks", "Conv4", "VISION_TASKS", "load_split", "make_backbone",
    "omniglot", "tiny_imagenet", "mini_imagenet", "data_root", "cache_dir",
]

_CACHE_VERSION = 1  # bump when the decoding changes, so stale caches are not reused
OMNIGLOT_TRAIN_CHARACTERS = 1200
_OMNIGLOT_CHARACTERS = 1623
_OMNIGLOT_PARTS = ("images_background", "images_evaluation")
_TINY_SPLIT_SEED = 20240601
_TINY_SPLIT_SIZES = {"train": 128, "val": 32, "test": 40}
_TINY_NATIVE = 64

# Backbone and image shape per task (MAML: 64 filters on Omniglot, 32 on miniImageNet).
VISION_TASKS: dict[str, dict[str, int]] = {
    "omniglot": {"channels": 1, "image_size": 28, "hidden": 64},
    "tinyimagenet": {"channels": 3, "image_size": 84, "hidden": 32},
    "miniimagenet": {"channels": 3, "image_size": 84, "hidden": 32},
}

_OMNIGLOT_LAYOUT = (
    "<root>/omniglot/ or <root>/ holding images_background.zip and images_evaluation.zip "
    "(or their extracted folders images_background/<Alphabet>/characterNN/*.png and "
    "images_evaluation/...)")
_TINY_LAYOUT = (
    "<root>/tiny-imagenet/ or <root>/ holding tiny-imagenet-200-fs200.zip (or the extracted "
    "tiny-imagenet-200/train/<wnid>/images/*.JPEG) with all 200 classes")
_MINI_LAYOUT = (
    "<root>/miniimagenet/ or <root>/ holding {train,val,test}.csv (header 'filename,label', "
    "Ravi & Larochelle split) and images/<filename>")


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


def _stat_key(paths: Sequence[Path], extra: object) -> str:
    """Cache key from the preprocessing parameters and every source file's size and mtime."""
    entries = []
    for p in paths:
        st = p.stat()
        entries.append((str(p), st.st_size, st.st_mtime_ns))
    blob = json.dumps([_CACHE_VERSION, extra, entries]).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def _cached(name: str, key: str, build: Callable[[], dict], where: Path) -> dict:
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


def _find_dir(root: Path, subdirs: Sequence[str], ok: Callable[[Path], bool], what: str, layout: str) -> Path:
    tried = [root / s for s in subdirs] + [root]
    for d in tried:
        if d.is_dir() and ok(d):
            return d
    raise FileNotFoundError(f"{what} not found under {root} (looked in {', '.join(map(str, tried))}); "
                            f"expected {layout}")


# --------------------------------------------------------------------------- decoding
class _Source:
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


def _decode(src: _Source, members: list[str], mode: str, size: int, resample: int,
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


def _grouped(members: list[str], key: Callable[[str], str]) -> tuple[list[str], list[str], torch.Tensor]:
    """Members sorted class by class (classes, then files, in natural order), class names, offsets."""
    ordered = sorted(members, key=lambda m: (_natural(key(m)), _natural(m)))
    names = list(dict.fromkeys(key(m) for m in ordered))
    pos = {n: i for i, n in enumerate(names)}
    counts = torch.bincount(torch.tensor([pos[key(m)] for m in ordered], dtype=torch.int64), minlength=len(names))
    return ordered, names, torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])


# --------------------------------------------------------------------------- splits
@dataclass
class FewShotSplit:
    """Images of one split stored class by class: class c is images[offsets[c]:offsets[c+1]]."""

    name: str
    images: torch.Tensor  # uint8 [N, C, h, w]
    offsets: torch.Tensor  # int64 [num_classes + 1]
    class_names: list[str]
    image_size: int  # side of what gather() returns; resized from h when different

    @property
    def num_classes(self) -> int:
        return len(self.offsets) - 1

    @property
    def counts(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def __len__(self) -> int:
        return self.images.shape[0]

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """Images at `index` (any shape) as float32 in [0, 1]: [*index.shape, C, S, S]."""
        x = self.images[index.reshape(-1)].float().div_(255.0)
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=x.shape[-1] > self.image_size)
        return x.reshape(*index.shape, *x.shape[1:])

    def subset(self, classes: Sequence[int], name: str) -> FewShotSplit:
        """A new split holding only `classes` (copied out of a memory-mapped cache)."""
        idx = torch.cat([torch.arange(int(self.offsets[c]), int(self.offsets[c + 1])) for c in classes])
        counts = self.counts[list(classes)]
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        return FewShotSplit(name, self.images[idx].clone(), offsets, [self.class_names[c] for c in classes],
                            self.image_size)


def _check_split(split: str, allowed: Sequence[str], dataset: str) -> None:
    if split not in allowed:
        raise ValueError(f"{dataset} has splits {list(allowed)}, got {split!r}")


def _omniglot_all(root: str | os.PathLike | None, cache: str | os.PathLike | None) -> FewShotSplit:
    base = data_root(root)

    def has_parts(d: Path) -> bool:
        return all((d / f"{p}.zip").is_file() or (d / p).is_dir() for p in _OMNIGLOT_PARTS)

    for cand in (base / "omniglot", base):  # one of the two parts only: name the missing one
        present = [p for p in _OMNIGLOT_PARTS if (cand / f"{p}.zip").is_file() or (cand / p).is_dir()]
        if 0 < len(present) < len(_OMNIGLOT_PARTS):
            missing = [f"{p}.zip (or {p}/)" for p in _OMNIGLOT_PARTS if p not in present]
            raise FileNotFoundError(f"Omniglot under {cand} is incomplete: {', '.join(present)} found, "
                                    f"{', '.join(missing)} missing; expected {_OMNIGLOT_LAYOUT}")
    d = _find_dir(base, ["omniglot"], has_parts, "Omniglot", _OMNIGLOT_LAYOUT)
    pattern = re.compile(r"(images_background|images_evaluation)/[^/]+/[^/]+/[^/]+\.png")
    sources, members = [], []
    for part in _OMNIGLOT_PARTS:
        # the zip is the canonical file; the folder is the fallback (e.g. unpacked by hand)
        z = d / f"{part}.zip"
        src = _Source(z, _OMNIGLOT_LAYOUT) if z.is_file() else _Source(d, _OMNIGLOT_LAYOUT)
        found = [m for m in src.members(pattern) if m.startswith(part + "/")]
        if not found:
            raise ValueError(f"no {part}/<Alphabet>/<character>/*.png images in {src.path}; "
                             f"expected {_OMNIGLOT_LAYOUT}")
        sources.append((src, found))
        members += found
    key = _stat_key([f for s, m in sources for f in s.files(m)], ["omniglot", 28, "lanczos", "ink=1"])

    def build() -> dict:
        # natural order puts images_background (sorted alphabets) before images_evaluation
        ordered, names, offsets = _grouped(members, lambda m: m.rsplit("/", 1)[0])
        images = [_decode(src, [m for m in ordered if m.startswith(part + "/")], "L", 28, Image.LANCZOS, invert=True)
                  for part, (src, _) in zip(_OMNIGLOT_PARTS, sources)]
        return {"images": torch.cat(images), "offsets": offsets, "names": names}

    data = _cached("omniglot28", key, build, cache_dir(cache, d))
    if len(data["names"]) != _OMNIGLOT_CHARACTERS:
        raise ValueError(f"Omniglot in {d} has {len(data['names'])} characters, expected "
                         f"{_OMNIGLOT_CHARACTERS} (964 background + 659 evaluation); is an archive incomplete?")
    return FewShotSplit("omniglot", data["images"], data["offsets"], list(data["names"]), 28)


def omniglot(split: str = "train", root: str | os.PathLike | None = None,
             cache: str | os.PathLike | None = None, rotations: bool = True) -> FewShotSplit:
    """Omniglot 28×28 (ink = 1): 'train' = first 1200 characters, 'test' = the other 423, each
    character ×4 rotations as separate classes (class 4·c + r is character c rotated by 90·r°)."""
    _check_split(split, ("train", "test"), "Omniglot")
    full = _omniglot_all(root, cache)
    chars = range(OMNIGLOT_TRAIN_CHARACTERS) if split == "train" else range(OMNIGLOT_TRAIN_CHARACTERS,
                                                                                full.num_classes)
    base = full.subset(chars, f"omniglot/{split}")
    if not rotations:
        return base
    n = len(base)
    rotated = torch.cat([torch.rot90(base.images, r, (-2, -1)) for r in range(4)])  # [4N, ...]
    idx, counts = [], []
    for c in range(base.num_classes):
        a, b = int(base.offsets[c]), int(base.offsets[c + 1])
        for r in range(4):
            idx.append(torch.arange(r * n + a, r * n + b))
            counts.append(b - a)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.tensor(counts).cumsum(0)])
    names = [f"{nm}/rot{90 * r}" for nm in base.class_names for r in range(4)]
    return FewShotSplit(base.name, rotated[torch.cat(idx)], offsets, names, 28)


def tiny_split_wnids(wnids: Sequence[str]) -> dict[str, list[str]]:
    """The fixed 128/32/40 class split of the 200 Tiny-ImageNet wnids (each part sorted)."""
    order = sorted(sorted(wnids), key=lambda w: hashlib.sha256(f"{_TINY_SPLIT_SEED}:{w}".encode()).hexdigest())
    out, start = {}, 0
    for name, k in _TINY_SPLIT_SIZES.items():
        out[name] = sorted(order[start:start + k])
        start += k
    return out


def tiny_imagenet(split: str = "train", root: str | os.PathLike | None = None,
                  cache: str | os.PathLike | None = None, image_size: int = 84) -> FewShotSplit:
    """Tiny-ImageNet few-shot split ('train' 128, 'val' 32, 'test' 40 classes), RGB upsampled
    from 64×64 to `image_size` (bilinear) when gathered."""
    _check_split(split, tuple(_TINY_SPLIT_SIZES), "Tiny-ImageNet")
    base = data_root(root)
    zname = "tiny-imagenet-200-fs200.zip"
    d = _find_dir(base, ["tiny-imagenet"],
                  lambda p: (p / zname).is_file() or (p / "tiny-imagenet-200" / "train").is_dir(),
                  "Tiny-ImageNet", _TINY_LAYOUT)
    src = _Source(d / zname if (d / zname).is_file() else d, _TINY_LAYOUT)
    pattern = re.compile(r"tiny-imagenet-200/train/(n\d+)/images/[^/]+\.JPEG", re.IGNORECASE)
    members = src.members(pattern)
    wnid_of = lambda m: m.split("/")[2]  # noqa: E731
    wnids = sorted({wnid_of(m) for m in members})
    if len(wnids) != sum(_TINY_SPLIT_SIZES.values()):
        raise ValueError(f"Tiny-ImageNet in {src.path} has {len(wnids)} classes with images, expected 200; "
                         f"expected {_TINY_LAYOUT}")
    chosen = set(tiny_split_wnids(wnids)[split])
    members = [m for m in members if wnid_of(m) in chosen]  # one cache per split: decode only what is used
    key = _stat_key(src.files(members), ["tiny", split, _TINY_NATIVE, "rgb"])

    def build() -> dict:
        ordered, names, offsets = _grouped(members, wnid_of)
        return {"images": _decode(src, ordered, "RGB", _TINY_NATIVE, Image.BILINEAR),
                "offsets": offsets, "names": names}

    data = _cached(f"tinyimagenet64-{split}", key, build, cache_dir(cache, d))
    # stays memory-mapped: pages are read on first use and shared between processes
    return FewShotSplit(f"tinyimagenet/{split}", data["images"], data["offsets"], list(data["names"]), image_size)


def mini_imagenet(split: str = "train", root: str | os.PathLike | None = None,
                  cache: str | os.PathLike | None = None, image_size: int = 84) -> FewShotSplit:
    """miniImageNet from the Ravi & Larochelle csv split; classes sorted by label, images by file name."""
    _check_split(split, ("train", "val", "test"), "miniImageNet")
    base = data_root(root)
    d = _find_dir(base, ["miniimagenet", "mini-imagenet", "miniImageNet"],
                  lambda p: (p / f"{split}.csv").is_file() and (p / "images").is_dir(),
                  f"miniImageNet {split}.csv with images/", _MINI_LAYOUT)
    csv_path = d / f"{split}.csv"
    with open(csv_path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows or [h.strip() for h in rows[0]] != ["filename", "label"]:
        raise ValueError(f"{csv_path}: expected the header 'filename,label', got {rows[:1]}")
    body = [r for r in rows[1:] if r]
    bad = [i + 2 for i, r in enumerate(body) if len(r) != 2]
    if bad or not body:
        raise ValueError(f"{csv_path}: expected rows 'filename,label'" + (f"; bad line(s) {bad[:5]}" if bad else
                                                                          "; the file has no rows"))
    label_of = {f"images/{f.strip()}": lab.strip() for f, lab in body}
    members = list(label_of)
    missing = [m for m in members if not (d / m).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) listed in {csv_path} are missing, e.g. {d / missing[0]}; "
                                f"expected {_MINI_LAYOUT}")
    src = _Source(d, _MINI_LAYOUT)
    key = _stat_key([csv_path] + src.files(members), ["mini", split, image_size, "lanczos"])

    def build() -> dict:
        ordered, names, offsets = _grouped(members, label_of.__getitem__)
        return {"images": _decode(src, ordered, "RGB", image_size, Image.LANCZOS), "offsets": offsets,
                "names": names}

    data = _cached(f"miniimagenet{image_size}-{split}", key, build, cache_dir(cache, d))
    return FewShotSplit(f"miniimagenet/{split}", data["images"], data["offsets"], list(data["names"]),
                        image_size)


_LOADERS: dict[str, Callable[..., FewShotSplit]] = {
    "omniglot": omniglot, "tinyimagenet": tiny_imagenet, "miniimagenet": mini_imagenet}


def load_split(task: str, split: str = "train", root: str | os.PathLike | None = None,
               cache: str | os.PathLike | None = None) -> FewShotSplit:
    """The named split of a vision task ('omniglot', 'tinyimagenet', 'miniimagenet')."""
    if task not in _LOADERS:
        raise ValueError(f"unknown vision task {task!r}; choose one of {sorted(_LOADERS)}")
    return _LOADERS[task](split, root=root, cache=cache)


# --------------------------------------------------------------------------- episodes
def _episode_seed(seed: int, i: int) -> int:
    """A 63-bit generator seed that depends only on (seed, i)."""
    digest = hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class FewShotTasks:
    """N-way K-shot episodes from a split: N classes drawn without replacement, K support and Q
    query images per class (distinct), labels 0..N-1 assigned to the drawn classes in random
    order. Support and query are class-major (label j holds rows j·K … j·K+K-1)."""

    def __init__(self, split: FewShotSplit, ways: int, shots: int, query: int = 15, seed: int = 0):
        if ways < 1 or shots < 1 or query < 0:
            raise ValueError(f"need ways >= 1, shots >= 1, query >= 0; got {ways}, {shots}, {query}")
        if ways > split.num_classes:
            raise ValueError(f"{split.name} has {split.num_classes} classes, cannot draw {ways}-way episodes")
        fewest = int(split.counts.min())
        if shots + query > fewest:
            raise ValueError(f"{split.name}: shots + query = {shots + query} exceeds the {fewest} images "
                             "of its smallest class")
        self.split, self.ways, self.shots, self.query, self.seed = split, ways, shots, query, seed
        self.generator = torch.Generator().manual_seed(seed)
        self._labels_s = torch.arange(ways).repeat_interleave(shots)
        self._labels_q = torch.arange(ways).repeat_interleave(query)

    def sample(self, batch_size: int = 1, generator: torch.Generator | None = None) -> Task:
        """`batch_size` random episodes stacked: x_support [T, N·K, C, H, W] float32, y_support
        [T, N·K] int64, x_query [T, N·Q, C, H, W], y_query [T, N·Q]."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        gen = self.generator if generator is None else generator
        s, n, k, q = self.split, self.ways, self.shots, self.query
        # a random subset of classes in random order: position j gets label j
        classes = torch.rand(batch_size, s.num_classes, generator=gen).argsort(1)[:, :n]
        counts = s.counts[classes]
        keys = torch.rand(batch_size, n, int(counts.max()), generator=gen)
        keys.masked_fill_(torch.arange(keys.shape[-1]) >= counts[..., None], 2.0)  # never pick past a class's end
        picks = keys.argsort(-1)[..., :k + q] + s.offsets[classes][..., None]
        x = s.gather(picks)  # [T, N, K+Q, C, H, W]
        shape = x.shape[3:]
        return Task(x[:, :, :k].reshape(batch_size, n * k, *shape), self._labels_s.expand(batch_size, -1).clone(),
                    x[:, :, k:].reshape(batch_size, n * q, *shape), self._labels_q.expand(batch_size, -1).clone())

    def episode(self, i: int) -> Task:
        """Fixed test episode i (no task dimension), a function of (seed, i) only."""
        return self.sample(1, torch.Generator().manual_seed(_episode_seed(self.seed, i)))[0]

    def episodes(self, indices: Sequence[int]) -> Task:
        """Fixed episodes stacked along a leading task dimension."""
        return Task.stack([self.episode(i) for i in indices])


# --------------------------------------------------------------------------- backbone
class Conv4(nn.Module):
    """MAML's backbone: 4 × [conv3×3 (pad 1) → BatchNorm → ReLU → maxpool 2], flatten, linear.

    transductive=True: BatchNorm always normalises with the batch's statistics, in eval mode too
    (track_running_stats=False, as MAML); False: running statistics, used in eval mode. Plain
    (non in-place) ops only, so torch.func.functional_call and vmap over stacked parameters work.
    """

    gemext_pointwise = True  # its own forward maps each image on its own (BatchNorm aside)

    def __init__(self, in_channels: int, ways: int, hidden: int = 64, image_size: int = 28,
                 transductive: bool = True):
        super().__init__()
        side, layers, c = image_size, [], in_channels
        for _ in range(4):
            layers += [nn.Conv2d(c, hidden, 3, padding=1),
                       nn.BatchNorm2d(hidden, track_running_stats=not transductive),
                       nn.ReLU(), nn.MaxPool2d(2)]
            c, side = hidden, side // 2
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small for 4 poolings (need >= 16)")
        self.transductive, self.image_size = transductive, image_size
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(hidden * side * side, ways)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def make_backbone(task: str, ways: int, transductive: bool = True) -> Conv4:
    """Conv4 sized for a vision task (see VISION_TASKS)."""
    if task not in VISION_TASKS:
        raise ValueError(f"unknown vision task {task!r}; choose one of {sorted(VISION_TASKS)}")
    cfg = VISION_TASKS[task]
    return Conv4(cfg["channels"], ways, cfg["hidden"], cfg["image_size"], transductive)
