"""benchmarks/common.py, what the benchmark scripts share (outside the wheel): timing order, fresh
worker processes and the table helpers."""
from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"  # at the repository root


@pytest.fixture(scope="module")
def common():
    spec = importlib.util.spec_from_file_location("benchmarks_common", BENCHMARKS / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_interleaved_alternates_the_order_and_leaves_out_the_warm_up(common):
    calls = []
    times = common.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3,
                               warmup=1, before_round=calls.append)
    assert calls == [0, "a", "b", 1, "b", "a", 2, "a", "b", 3, "b", "a"]
    assert {name: len(ts) for name, ts in times.items()} == {"a": 3, "b": 3}
    assert all(t >= 0 for ts in times.values() for t in ts)


def test_fresh_processes_give_results_in_the_specs_order_and_failures_as_errors(common, tmp_path):
    script = tmp_path / "work.py"
    script.write_text(f"""import sys
sys.path.insert(0, {str(BENCHMARKS)!r})
from common import run_worker


def worker(spec):
    if spec["x"] < 0:
        raise SystemExit("negative x")
    return {{"twice": 2 * spec["x"]}}


if __name__ == "__main__" and not run_worker(worker):
    print("main")
""")
    specs = [{"x": 1}, {"x": -1}, {"x": 3}]
    results = list(common.fresh_processes(str(script), specs, jobs=2))
    assert [s for s, _ in results] == specs
    assert [r for _, r in results] == [{"twice": 2}, {"error": "negative x"}, {"twice": 6}]
    assert common.fresh_process(str(script), {"x": 2}, env={"OMP_NUM_THREADS": "1"}) == {"twice": 4}


def test_table_helpers(common, tmp_path):
    assert common.parse_run("maml") == ("maml", "maml", {})
    assert common.parse_run('short=gem-bml+:{"query_steps": 2}') == ("short", "gem-bml+", {"query_steps": 2})
    with pytest.raises(SystemExit, match="not JSON"):
        common.parse_run("x=maml:{oops")
    assert math.isnan(common.ci95([1.0]))
    assert common.ci95([1.0, 2.0, 3.0]) == pytest.approx(4.303 / math.sqrt(3))
    common.write_csv(tmp_path / "t.csv", [{"a": 1}, {"a": 2, "b": 3}])
    with open(tmp_path / "t.csv", newline="") as fh:
        assert list(csv.DictReader(fh)) == [{"a": "1", "b": ""}, {"a": "2", "b": "3"}]
    assert common.command_line("/anywhere/benchmarks/x.py", ["--grid", '{"a": 1}']) == \
        "python benchmarks/x.py --grid '{\"a\": 1}'"
