"""The few-shot vision datasets: Omniglot, Tiny-ImageNet (the miniImageNet stand-in) and
miniImageNet, read offline from a data root (gemext.tasks.vision_files) into `FewShotSplit`s.

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
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from .vision_files import Source, cache_dir, cached, data_root, decode, find_dir, grouped, stat_key

__all__ = ["FewShotSplit", "load_split", "omniglot", "tiny_imagenet", "mini_imagenet", "tiny_split_wnids",
           "OMNIGLOT_TRAIN_CHARACTERS"]

OMNIGLOT_TRAIN_CHARACTERS = 1200
_OMNIGLOT_CHARACTERS = 1623
_OMNIGLOT_PARTS = ("images_background", "images_evaluation")
_TINY_SPLIT_SEED = 20240601
_TINY_SPLIT_SIZES = {"train": 128, "val": 32, "test": 40}
_TINY_NATIVE = 64

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
    d = find_dir(base, ["omniglot"], has_parts, "Omniglot", _OMNIGLOT_LAYOUT)
    pattern = re.compile(r"(images_background|images_evaluation)/[^/]+/[^/]+/[^/]+\.png")
    sources, members = [], []
    for part in _OMNIGLOT_PARTS:
        # the zip is the canonical file; the folder is the fallback (e.g. unpacked by hand)
        z = d / f"{part}.zip"
        src = Source(z, _OMNIGLOT_LAYOUT) if z.is_file() else Source(d, _OMNIGLOT_LAYOUT)
        found = [m for m in src.members(pattern) if m.startswith(part + "/")]
        if not found:
            raise ValueError(f"no {part}/<Alphabet>/<character>/*.png images in {src.path}; "
                             f"expected {_OMNIGLOT_LAYOUT}")
        sources.append((src, found))
        members += found
    key = stat_key([f for s, m in sources for f in s.files(m)], ["omniglot", 28, "lanczos", "ink=1"])

    def build() -> dict:
        # natural order puts images_background (sorted alphabets) before images_evaluation
        ordered, names, offsets = grouped(members, lambda m: m.rsplit("/", 1)[0])
        images = [decode(src, [m for m in ordered if m.startswith(part + "/")], "L", 28, Image.LANCZOS, invert=True)
                  for part, (src, _) in zip(_OMNIGLOT_PARTS, sources)]
        return {"images": torch.cat(images), "offsets": offsets, "names": names}

    data = cached("omniglot28", key, build, cache_dir(cache, d))
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
    d = find_dir(base, ["tiny-imagenet"],
                  lambda p: (p / zname).is_file() or (p / "tiny-imagenet-200" / "train").is_dir(),
                  "Tiny-ImageNet", _TINY_LAYOUT)
    src = Source(d / zname if (d / zname).is_file() else d, _TINY_LAYOUT)
    pattern = re.compile(r"tiny-imagenet-200/train/(n\d+)/images/[^/]+\.JPEG", re.IGNORECASE)
    members = src.members(pattern)
    wnid_of = lambda m: m.split("/")[2]  # noqa: E731
    wnids = sorted({wnid_of(m) for m in members})
    if len(wnids) != sum(_TINY_SPLIT_SIZES.values()):
        raise ValueError(f"Tiny-ImageNet in {src.path} has {len(wnids)} classes with images, expected 200; "
                         f"expected {_TINY_LAYOUT}")
    chosen = set(tiny_split_wnids(wnids)[split])
    members = [m for m in members if wnid_of(m) in chosen]  # one cache per split: decode only what is used
    key = stat_key(src.files(members), ["tiny", split, _TINY_NATIVE, "rgb"])

    def build() -> dict:
        ordered, names, offsets = grouped(members, wnid_of)
        return {"images": decode(src, ordered, "RGB", _TINY_NATIVE, Image.BILINEAR),
                "offsets": offsets, "names": names}

    data = cached(f"tinyimagenet64-{split}", key, build, cache_dir(cache, d))
    # stays memory-mapped: pages are read on first use and shared between processes
    return FewShotSplit(f"tinyimagenet/{split}", data["images"], data["offsets"], list(data["names"]), image_size)


def mini_imagenet(split: str = "train", root: str | os.PathLike | None = None,
                  cache: str | os.PathLike | None = None, image_size: int = 84) -> FewShotSplit:
    """miniImageNet from the Ravi & Larochelle csv split; classes sorted by label, images by file name."""
    _check_split(split, ("train", "val", "test"), "miniImageNet")
    base = data_root(root)
    d = find_dir(base, ["miniimagenet", "mini-imagenet", "miniImageNet"],
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
    src = Source(d, _MINI_LAYOUT)
    key = stat_key([csv_path] + src.files(members), ["mini", split, image_size, "lanczos"])

    def build() -> dict:
        ordered, names, offsets = grouped(members, label_of.__getitem__)
        return {"images": decode(src, ordered, "RGB", image_size, Image.LANCZOS), "offsets": offsets,
                "names": names}

    data = cached(f"miniimagenet{image_size}-{split}", key, build, cache_dir(cache, d))
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
