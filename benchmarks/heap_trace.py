"""The C heap under GEM-BML+'s inner loop, step by step (Linux, glibc): after every inner VI step,
the heap's size (mallinfo2 `arena`), the bytes in use in it (`uordblks`), the mmap-ed bytes
(`hblkhd`) and the process's resident memory, for one Omniglot-shaped point of `gemext.bench_memory`
(the vision presets: natural-gradient VI; freed memory kept as `gemext train` keeps it).

    python benchmarks/heap_trace.py --out benchmarks/out/heap [--inner-steps 20] [--iterations 3]

Shows where the growth of the peak RSS with the inner steps comes from: the heap grows to hold the
peak of a step and its free chunks stay resident; later steps place their blocks in parts of it not
touched before. Writes heap.csv (one row per inner step) and prints a summary."""
from __future__ import annotations

import argparse
import ctypes
from pathlib import Path

from common import write_csv

MB = 2**20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/out/heap")
    ap.add_argument("--inner-steps", type=int, default=20)
    ap.add_argument("--iterations", type=int, default=3)
    args = ap.parse_args()
    from gemext.allocator import keep_freed_memory

    keep_freed_memory()
    import torch

    from gemext import bench_memory
    from gemext.vi import NaturalGradientVI as inner  # the vision presets' inner VI

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2

    def rss_mb() -> float:
        return bench_memory.current_rss_bytes() / MB

    torch.set_num_threads(1)
    learner, batch = bench_memory.make_point({"task": "omniglot", "algo": "gem-bml+", "inner_steps": args.inner_steps,
                                              "device": "cpu", "ways": 5, "shots": 1, "query": 15, "meta_batch": 4,
                                              "presets": True})
    opt = torch.optim.Adam(list(learner.parameters()), lr=1e-3)
    rows: list[dict] = []
    base = rss_mb()
    current = {"iteration": 0}
    step = inner.step

    def traced(self, *a, **k):
        out = step(self, *a, **k)
        m = libc.mallinfo2()
        rows.append({"iteration": current["iteration"], "step": len(rows), "heap_mb": m.arena / MB,
                     "heap_in_use_mb": m.uordblks / MB, "mmap_mb": m.hblkhd / MB, "rss_above_base_mb": rss_mb() - base})
        return out

    inner.step = traced
    for current["iteration"] in range(args.iterations):
        opt.zero_grad()
        learner.meta_backward(batch)
        opt.step()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "heap.csv", rows)
    for it in range(args.iterations):
        r = [x for x in rows if x["iteration"] == it]
        print(f"meta-iteration {it}: heap {max(x['heap_mb'] for x in r):.0f} MB, in use after a step "
              f"{min(x['heap_in_use_mb'] for x in r):.0f}–{max(x['heap_in_use_mb'] for x in r):.0f} MB, RSS above "
              f"the start {r[0]['rss_above_base_mb']:.0f} → {r[-1]['rss_above_base_mb']:.0f} MB")


if __name__ == "__main__":
    main()
