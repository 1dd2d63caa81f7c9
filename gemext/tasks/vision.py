"""Few-shot vision tasks: an episodic N-way K-shot sampler over the splits of
gemext.tasks.vision_data (Omniglot, Tiny-ImageNet, miniImageNet, read offline), and MAML's 4-conv
backbone. The datasets' names are re-exported here."""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import nn

from . import Task
from .vision_data import (
    OMNIGLOT_TRAIN_CHARACTERS,
    FewShotSplit,
    load_split,
    mini_imagenet,
    omniglot,
    tiny_imagenet,
    tiny_split_wnids,
)
from .vision_files import cache_dir, data_root

__all__ = [
    "FewShotSplit", "FewShotTasks", "Conv4", "VISION_TASKS", "load_split", "make_backbone",
    "omniglot", "tiny_imagenet", "mini_imagenet", "data_root", "cache_dir", "tiny_split_wnids",
    "OMNIGLOT_TRAIN_CHARACTERS",
]

# Backbone and image shape per task (MAML: 64 filters on Omniglot, 32 on miniImageNet).
VISION_TASKS: dict[str, dict[str, int]] = {
    "omniglot": {"channels": 1, "image_size": 28, "hidden": 64},
    "tinyimagenet": {"channels": 3, "image_size": 84, "hidden": 32},
    "miniimagenet": {"channels": 3, "image_size": 84, "hidden": 32},
}


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
