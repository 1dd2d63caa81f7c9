"""Few-shot vision data (real Omniglot / Tiny-ImageNet when present, generated fixtures
otherwise), the episodic sampler and the Conv4 backbone."""
from __future__ import annotations

import os
import re
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import write_miniimagenet
from PIL import Image
from torch.func import functional_call, stack_module_state, vmap

from gemext.tasks import Task
from gemext.tasks import vision as V

_DATA = Path(os.environ.get("GEMEXT_DATA") or Path(__file__).resolve().parents[3] / "shared" / "data")


def _need(sub: str) -> Path:
    if not (_DATA / sub).is_dir():
        pytest.skip(f"{sub} data not found: {_DATA / sub} (set GEMEXT_DATA)")
    return _DATA


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gemext-cache")


@pytest.fixture(scope="session")
def omni(cache):
    root = _need("omniglot")
    t = time.perf_counter()
    train = V.omniglot("train", root, cache)  # decodes all 32,460 PNGs once
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    test = V.omniglot("test", root, cache)
    return {"train": train, "test": test, "build_s": build_s, "load_s": time.perf_counter() - t, "root": root}


@pytest.fixture(scope="session")
def tiny(cache):
    root = _need("tiny-imagenet")
    # val + test only (72 classes): decoding the 128 train classes too would double the test time
    return {s: V.tiny_imagenet(s, root, cache) for s in ("val", "test")}


# ----------------------------------------------------------------------------- Omniglot
def test_omniglot_counts_split_and_pixels(omni):
    train, test = omni["train"], omni["test"]
    assert (train.num_classes, test.num_classes) == (1200 * 4, 423 * 4)
    assert train.images.shape == (1200 * 4 * 20, 1, 28, 28) and train.images.dtype == torch.uint8
    assert len(test) == 423 * 4 * 20
    assert set(train.counts.tolist()) == {20} and set(test.counts.tolist()) == {20}
    background = sum(n.startswith("images_background/") for n in train.class_names + test.class_names)
    assert (background // 4, (6492 - background) // 4) == (964, 659)
    # background characters (all 964) come first, so test characters are all evaluation ones
    assert all(n.startswith("images_evaluation/") for n in test.class_names)
    assert not set(n.rsplit("/", 1)[0] for n in train.class_names) & set(n.rsplit("/", 1)[0] for n in test.class_names)
    x = train.gather(torch.arange(40))
    assert x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
    assert float(x.mean()) < 0.3  # ink = 1 on a 0 background: mostly zeros
    # class 4c + r is character c rotated by 90·r degrees
    c0, c1 = train.images[0:20], train.images[20:40]
    assert torch.equal(c1, torch.rot90(c0, 1, (-2, -1)))
    assert train.class_names[1].endswith("/rot90")


def test_omniglot_cache_is_reused(omni, cache):
    files = sorted(p.name for p in cache.iterdir())
    assert any(f.startswith("omniglot28-") and f.endswith(".pt") for f in files)
    assert not any(".tmp" in f for f in files)  # atomic write left no temporaries
    t = time.perf_counter()
    again = V.omniglot("test", omni["root"], cache)
    assert time.perf_counter() - t < 5.0, "a cached load should take about a second"
    assert torch.equal(again.images, omni["test"].images)
    print(f"omniglot cache build {omni['build_s']:.1f} s, cached load {omni['load_s']:.2f} s")


def test_omniglot_episodes(omni):
    tasks = V.FewShotTasks(omni["train"], ways=5, shots=1, query=15, seed=3)
    b = tasks.sample(4)
    assert isinstance(b, Task)
    assert b.x_support.shape == (4, 5, 1, 28, 28) and b.x_query.shape == (4, 75, 1, 28, 28)
    assert b.x_support.dtype == torch.float32 and b.y_support.dtype == torch.int64
    assert b.y_query.min() == 0 and b.y_query.max() == 4
    e = V.FewShotTasks(omni["test"], ways=20, shots=5, query=5, seed=1)
    assert e.episode(0).x_support.shape == (100, 1, 28, 28)
    t = time.perf_counter()
    tasks.sample(32)
    print(f"omniglot 5-way 1-shot: {32 / (time.perf_counter() - t):.0f} episodes/s")


# ----------------------------------------------------------------------------- Tiny-ImageNet
def test_tiny_imagenet_split(tiny):
    with zipfile.ZipFile(_DATA / "tiny-imagenet" / "tiny-imagenet-200-fs200.zip") as zf:
        wnids = [n.split("/")[2] for n in zf.namelist() if n.endswith(".JPEG")]
    counts = {w: wnids.count(w) for w in set(wnids)}
    assert len(counts) == 200 and set(counts.values()) == {200}
    split = V.tiny_split_wnids(sorted(counts))
    assert {s: len(v) for s, v in split.items()} == {"train": 128, "val": 32, "test": 40}
    assert set().union(*split.values()) == set(counts)
    assert split["train"][:3] == ["n01443537", "n01629819", "n01641577"]  # the split is frozen
    for s in ("val", "test"):
        assert tiny[s].class_names == split[s]
        assert set(tiny[s].counts.tolist()) == {200}
        assert tiny[s].images.shape == (len(split[s]) * 200, 3, 64, 64) and tiny[s].images.dtype == torch.uint8
    b = V.FewShotTasks(tiny["val"], ways=5, shots=5, query=15, seed=0).sample(2)
    assert b.x_support.shape == (2, 25, 3, 84, 84) and b.x_query.shape == (2, 75, 3, 84, 84)
    assert 0 <= float(b.x_query.min()) and float(b.x_query.max()) <= 1


# ----------------------------------------------------------------------------- sampler (synthetic)
def _identity_split(counts=(7, 9, 6, 8, 10, 7), size=4) -> V.FewShotSplit:
    """Image i is filled with the value i, and class c holds a contiguous run of images."""
    n = sum(counts)
    images = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 1, size, size).clone()
    offsets = torch.tensor([0, *np.cumsum(counts)], dtype=torch.int64)
    return V.FewShotSplit("synthetic", images, offsets, [f"c{i}" for i in range(len(counts))], size)


def test_sampler_draws_distinct_images_and_consistent_labels():
    split = _identity_split()
    tasks = V.FewShotTasks(split, ways=4, shots=2, query=3, seed=0)
    class_of = torch.repeat_interleave(torch.arange(split.num_classes), split.counts)
    for t in tasks.sample(50):
        ids_s = (t.x_support[:, 0, 0, 0] * 255).round().long()
        ids_q = (t.x_query[:, 0, 0, 0] * 255).round().long()
        assert len(set(ids_s.tolist()) | set(ids_q.tolist())) == 4 * 5  # no image twice
        assert (t.y_support == torch.arange(4).repeat_interleave(2)).all()
        mapping = {}
        for i, y in zip(torch.cat([ids_s, ids_q]).tolist(), torch.cat([t.y_support, t.y_query]).tolist()):
            assert mapping.setdefault(y, int(class_of[i])) == int(class_of[i])
        assert len(set(mapping.values())) == 4  # classes without replacement


def test_sampler_determinism_and_permuted_labels():
    split = _identity_split()
    a = V.FewShotTasks(split, ways=3, shots=1, query=2, seed=7)
    b = V.FewShotTasks(split, ways=3, shots=1, query=2, seed=7)
    b.sample(5)  # drawing training batches first must not change the fixed episodes
    for i in (0, 1, 10):
        assert torch.equal(a.episode(i).x_query, b.episode(i).x_query)
    assert not torch.equal(a.episode(0).x_query, a.episode(1).x_query)
    assert not torch.equal(V.FewShotTasks(split, 3, 1, 2, seed=8).episode(0).x_query, a.episode(0).x_query)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(a.sample(3, g1).x_support, a.sample(3, g2).x_support)
    assert a.episodes(range(4)).x_support.shape == (4, 3, 1, 4, 4)
    # which class gets label 0 varies between episodes
    first = {int(a.episode(i).x_support[0, 0, 0, 0] * 255) for i in range(30)}
    class_of = torch.repeat_interleave(torch.arange(split.num_classes), split.counts)
    assert len({int(class_of[i]) for i in first}) > 2


def test_sampler_rejects_impossible_episodes():
    split = _identity_split()
    with pytest.raises(ValueError, match="cannot draw 7-way"):
        V.FewShotTasks(split, ways=7, shots=1, query=1)
    with pytest.raises(ValueError, match="smallest class"):
        V.FewShotTasks(split, ways=2, shots=3, query=4)


def test_mini_imagenet_fixture(tmp_path):
    d = write_miniimagenet(tmp_path)
    train = V.mini_imagenet("train", tmp_path, tmp_path / "cache")
    assert train.num_classes == 3 and train.class_names == ["n01", "n02", "n03"]
    assert train.images.shape == (12, 3, 84, 84) and train.images.dtype == torch.uint8
    assert V.load_split("miniimagenet", "val", tmp_path, tmp_path / "cache").num_classes == 2
    b = V.FewShotTasks(train, ways=3, shots=1, query=2, seed=0).sample(2)
    assert b.x_support.shape == (2, 3, 3, 84, 84)
    # a missing image and a bad header are named
    (d / "images" / "n0100000002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="n0100000002.jpg"):
        V.mini_imagenet("train", tmp_path, tmp_path / "cache")
    (d / "test.csv").write_text("file,class\nx.jpg,n06\n")
    with pytest.raises(ValueError, match="test.csv.*filename,label"):
        V.mini_imagenet("test", tmp_path, tmp_path / "cache")


# ----------------------------------------------------------------------------- errors
def test_missing_root_and_wrong_layout(tmp_path, monkeypatch):
    monkeypatch.delenv("GEMEXT_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match=re.escape(
            "no data root: set --data-root DIR or the GEMEXT_DATA environment variable (in Python: root=DIR)")):
        V.omniglot("train")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        V.omniglot("train", tmp_path / "nope")
    for loader, pattern in [(V.omniglot, "images_background.zip"), (V.tiny_imagenet, "tiny-imagenet-200"),
                            (V.mini_imagenet, "filename,label")]:
        with pytest.raises(FileNotFoundError, match=pattern) as err:
            loader("train", tmp_path, tmp_path / "cache")
        assert str(tmp_path) in str(err.value)
    with pytest.raises(ValueError, match="splits"):
        V.omniglot("val", tmp_path)
    (tmp_path / "images_background.zip").write_bytes(b"")  # one of the two archives
    with pytest.raises(FileNotFoundError, match=re.escape("images_background found, images_evaluation.zip (or "
                                                          "images_evaluation/) missing")):
        V.omniglot("train", tmp_path, tmp_path / "cache")
    with pytest.raises(ValueError, match="unknown vision task"):
        V.load_split("cifar", "train", tmp_path)


def _png_bytes(value: int = 255) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.full((105, 105), value, np.uint8)).convert("1").save(buf, format="PNG")
    return buf.getvalue()


def test_truncated_zip_and_corrupt_png_are_named(tmp_path):
    d = tmp_path / "omniglot"
    d.mkdir()
    full = tmp_path / "full.zip"
    with zipfile.ZipFile(full, "w") as zf:
        for i in range(30):
            zf.writestr(f"images_background/A/character01/0001_{i:02d}.png", _png_bytes())
    (d / "images_background.zip").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    ev = d / "images_evaluation" / "B" / "character01"
    ev.mkdir(parents=True)
    with pytest.raises(ValueError, match="corrupt or unreadable zip .*images_background.zip"):
        V.omniglot("train", tmp_path, tmp_path / "cache")
    # extracted folders: one broken PNG is named; a complete but partial set is rejected
    (d / "images_background.zip").unlink()
    bg = d / "images_background" / "A" / "character01"
    bg.mkdir(parents=True)
    (bg / "0001_01.png").write_bytes(_png_bytes())
    (ev / "0002_01.png").write_bytes(_png_bytes()[:40])
    with pytest.raises(ValueError, match="corrupt image .*0002_01.png"):
        V.omniglot("train", tmp_path, tmp_path / "cache")
    (ev / "0002_01.png").write_bytes(_png_bytes(0))
    with pytest.raises(ValueError, match="2 characters, expected 1623"):
        V.omniglot("train", tmp_path, tmp_path / "cache")


# ----------------------------------------------------------------------------- backbone
@pytest.mark.parametrize("cfg", [(1, 64, 28), (3, 32, 84)])
def test_conv4_vmap_functional_call_matches_loop(cfg):
    c, hidden, size = cfg
    torch.manual_seed(0)
    models = [V.Conv4(c, 5, hidden, size) for _ in range(3)]
    params, buffers = stack_module_state(models)
    x = torch.rand(3, 6, c, size, size)
    out = vmap(lambda p, b, xi: functional_call(models[0], (p, b), (xi,)))(params, buffers, x)
    ref = torch.stack([m(x[i]) for i, m in enumerate(models)])
    assert out.shape == (3, 6, 5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert V.make_backbone("miniimagenet" if c == 3 else "omniglot", 5).head.in_features == models[0].head.in_features


def test_conv4_batchnorm_modes():
    torch.manual_seed(0)
    x = torch.rand(8, 1, 28, 28)
    trans = V.Conv4(1, 5)
    assert not list(trans.buffers())  # no running statistics at all
    train_out = trans(x)
    torch.testing.assert_close(trans.eval()(x), train_out)  # batch statistics in eval mode too
    inductive = V.Conv4(1, 5, transductive=False)
    for _ in range(3):
        inductive(x)
    a = inductive.eval()(x)
    assert not torch.allclose(a, inductive.train()(x))  # eval uses running statistics
    # buffers passed explicitly are the ones updated
    buffers = {k: v.clone() for k, v in inductive.named_buffers()}
    functional_call(inductive.train(), ({k: p for k, p in inductive.named_parameters()}, buffers), (x,))
    assert not torch.equal(buffers["features.1.running_mean"], inductive.features[1].running_mean)
    with pytest.raises(ValueError, match="too small"):
        V.Conv4(1, 5, image_size=8)
