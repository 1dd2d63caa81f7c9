"""Shared test helpers: small generated data sets in the layouts the loaders read, and the command
run in-process."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_miniimagenet(root: Path, per_class: int = 4) -> Path:
    """Ravi & Larochelle layout under root/miniimagenet: {train,val,test}.csv ('filename,label') and
    images/<filename>. Classes differ in brightness (so they are learnable), image sizes vary, and
    the first image of each class is grayscale (the loader must convert to RGB)."""
    d = root / "miniimagenet"
    (d / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, wnids in {"train": ["n01", "n02", "n03"], "val": ["n04", "n05"], "test": ["n06", "n07"]}.items():
        rows = ["filename,label"]
        for c, w in enumerate(wnids):
            for i in range(per_class):
                name = f"{w}{i:08d}.jpg"
                arr = (rng.integers(0, 64, (21 + 8 * (i % 3), 24, 3)) + 60 * c).astype(np.uint8)
                img = Image.fromarray(arr)
                (img.convert("L") if i == 0 else img).save(d / "images" / name, quality=90)
                rows.append(f"{name},{w}")
        (d / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return d


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """`gemext ARGV` in-process: its exit status (argparse's exits included), stdout and stderr."""
    from gemext import cli

    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err
