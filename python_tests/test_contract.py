"""The learner contract (gemext/algorithms/base.py) over every registered learner, and the layering
of the package (each layer imports only layers below it; no import cycle; no module takes another's
private names)."""
from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from gemext import algorithms
from gemext.algorithms import MetaLearner, Prediction
from gemext.tasks import Task
from gemext.tasks.sinusoid import SinusoidTasks
from gemext.vi import CategoricalLikelihood

SUPERVISED = algorithms.names()
# options that make each learner small and quick
QUICK = {"kl-chaser": dict(query_steps=1), "bmaml": dict(particles=2)}


def _regression(n: int = 3, seed: int = 0) -> Task:
    return SinusoidTasks("finn").sample(n, torch.Generator().manual_seed(seed))


def _classification(n: int = 2, seed: int = 0) -> Task:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(3).repeat(2).expand(n, 6).contiguous()
    return Task(torch.randn(n, 6, 4, generator=g), y, torch.randn(n, 6, 4, generator=g), y.clone())


def _learner(name: str, classify: bool = False, seed: int = 0) -> MetaLearner:
    torch.manual_seed(seed)
    model = (nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)) if classify
             else SinusoidTasks("finn").make_model())
    extra = dict(likelihood=CategoricalLikelihood()) if classify else {}
    return algorithms.create(name, model, inner_steps=2, seed=seed, **QUICK.get(name, {}), **extra)


@pytest.mark.parametrize("name", SUPERVISED)
def test_meta_backward_accumulates_a_finite_meta_gradient(name, device):
    learner = _learner(name).to(device)
    assert isinstance(learner, MetaLearner) and isinstance(learner.generator, torch.Generator)
    assert isinstance(learner.inner_steps, int) and learner.inner_steps == 2
    stats = learner.meta_backward(_regression().to(device))
    assert stats and all(isinstance(v, float) and math.isfinite(v) for v in stats.values())
    grads = [p.grad for p in learner.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    first = [g.clone() for g in grads]
    learner.meta_backward(_regression(seed=1).to(device))  # accumulates, as the contract says
    assert any(not torch.equal(g, f) for g, f in zip((p.grad for p in learner.parameters() if p.requires_grad), first))


@pytest.mark.parametrize("name", SUPERVISED)
def test_a_model_another_learner_took_over_is_refused_by_name(name):
    # a learner turns its model's parameters into its meta-parameters: a second learner on the same
    # module would see no parameters ("the prior covers no parameter") or none to adapt
    import copy
    model = SinusoidTasks("finn").make_model()
    spare = copy.deepcopy(model)
    algorithms.create("maml", model)
    with pytest.raises(ValueError, match=f"{re.escape(name)}: this model already belongs to a maml learner.*deepcopy"):
        algorithms.create(name, model, **QUICK.get(name, {}))
    algorithms.create(name, spare, **QUICK.get(name, {}))  # a copy made before is the user's way out


@pytest.mark.parametrize("name", SUPERVISED)
def test_an_empty_query_set_is_refused(name):
    b = _regression()
    with pytest.raises(ValueError, match=f"tasks: the query set is empty .*{re.escape(name)}'s meta-gradient"):
        _learner(name).meta_backward(Task(b.x_support, b.y_support, b.x_query[:, :0], b.y_query[:, :0]))


@pytest.mark.parametrize("name", SUPERVISED)
def test_the_loop_can_drive_it(name, device):
    """meta_optimizer, the step and after_step: what gemext.train.meta_step does with any learner."""
    from gemext.train import meta_step

    learner = _learner(name).to(device)
    opt = learner.meta_optimizer(1e-3)
    assert isinstance(opt, torch.optim.Optimizer)
    before = [p.detach().clone() for p in learner.parameters()]
    out = meta_step(learner, opt, _regression().to(device))
    assert out.stepped and not out.stop
    assert any(not torch.equal(a, p) for a, p in zip(before, learner.parameters()))
    assert isinstance(learner.after_step(), dict)


@pytest.mark.parametrize("name", SUPERVISED)
@pytest.mark.parametrize("classify", [False, True], ids=["regression", "classification"])
def test_every_predictor_returns_one_prediction_type(name, classify, device):
    learner = _learner(name, classify).to(device)
    b = (_classification() if classify else _regression()).to(device)
    learner.meta_backward(b)
    single = learner.adapt((b.x_support[0], b.y_support[0])).predict(b.x_query[0])
    path = learner.adapt_path(b, 2)
    assert len(path) == 3
    for out in [single] + [p.predict(b.x_query) for p in path]:
        assert isinstance(out, Prediction)
        if classify:
            assert out.mean is None and out.std is None
            torch.testing.assert_close(out.probs.sum(-1), torch.ones(out.probs.shape[:-1], device=device))
        else:
            assert out.probs is None and out.mean.shape == out.std.shape and (out.std > 0).all()
    assert (single.probs if classify else single.mean).shape[0] == b.x_query.shape[1]  # one task: no task dim


@pytest.mark.parametrize("name", SUPERVISED)
def test_state_dict_reproduces_predictions(name, device):
    a = _learner(name, seed=0).to(device)
    b = _regression().to(device)
    a.meta_backward(b)
    torch.optim.SGD(a.parameters(), lr=1e-3).step()
    fresh = _learner(name, seed=3).to(device)  # another initialisation
    fresh.load_state_dict(a.state_dict())
    outs = []
    for learner in (a, fresh):
        learner.generator.manual_seed(11)
        outs.append(learner.adapt(b, 1).predict(b.x_query))
    torch.testing.assert_close(vars(outs[0]), vars(outs[1]), rtol=0, atol=0)


@pytest.mark.parametrize("name", [n for n in SUPERVISED if hasattr(_learner(n), "prior")])
def test_after_step_keeps_the_prior_std_in_range(name):
    learner = _learner(name)
    lo, hi = (math.exp(v) for v in learner.prior.rho0_range.tolist())
    with torch.no_grad():
        for r in learner.prior.rho0:
            r.fill_(math.log(hi) + 3.0)
    learner.after_step()
    s0 = torch.cat([r.detach().exp().flatten() for r in learner.prior.rho0])
    assert float(s0.max()) <= hi * (1 + 1e-6) and float(s0.min()) >= lo * (1 - 1e-6)


@pytest.mark.parametrize("name", SUPERVISED)
def test_options_are_checked_by_name_and_type(name):
    valid = algorithms.option_names(name)
    assert "seed" in valid and "inner_steps" in valid and "vectorize" in valid
    with pytest.raises(ValueError, match=r"unknown option\(s\) no_such_option; valid: .*seed"):
        algorithms.create(name, SinusoidTasks("finn").make_model(), no_such_option=1)
    with pytest.raises(TypeError, match="option inner_steps must be int"):
        algorithms.create(name, SinusoidTasks("finn").make_model(), inner_steps="five")
    with pytest.raises(TypeError, match="option seed must be int"):
        algorithms.create(name, SinusoidTasks("finn").make_model(), seed=1.5)


def test_rl_learners_follow_the_contract():
    pytest.importorskip("gymnasium")
    from gemext.train import RunConfig, meta_step, open_family

    tiny = dict(episodes=2, meta_batch=2, horizon=6, hidden=[4], num_envs=2)
    for name in algorithms.names("rl"):
        opts = tiny if name == "maml" else {**tiny, "sigma0": 0.1}  # GEM's inner pull 0.83 < 1 (0.01: 83)
        with open_family(RunConfig(task="nav2d", algo=name, out="unused", algo_options=opts)) as family:
            learner = family.build_learner()
            assert isinstance(learner, MetaLearner) and learner.inner_steps >= 1
            opt = learner.meta_optimizer(1e-2)
            before = [p.detach().clone() for p in learner.parameters()]
            out = meta_step(learner, opt, family.sample(2))
            assert out.stepped and {"return_pre", "return_post"} <= set(out.stats), name
            assert any(not torch.equal(a, p) for a, p in zip(before, learner.parameters())), name
            path = learner.adapt_path(family.sample(2), 1, episodes=2)
            assert len(path) == 2 and all(len(step) == 2 for step in path)
            params = learner.adapt(family.sample(2), 1)
            assert len(params) == 2 and isinstance(params[0], dict)
            with pytest.raises(ValueError, match="single process"):
                learner.meta_backward(family.sample(2), task_range=(0, 4))


# ------------------------------------------------------------------ layering
PACKAGE = Path(algorithms.__file__).resolve().parents[1]
# lower number = lower layer; a module may import its own layer and the ones below
LAYERS = {
    "_C": 0, "_gym": 0, "ops": 0, "reference": 0, "gaussian": 0, "linalg": 0, "metrics": 0, "plots": 0,
    "progress": 0, "config": 0, "runs": 0, "allocator": 0, "introspect": 0,
    "vi": 1, "distributed": 1,
    "tasks": 2, "functional_net": 2,
    "algorithms": 3,
    "families": 4,
    "train": 5, "record": 5, "bench_memory": 5,
    "cli": 6, "cli_args": 6, "cli_summary": 6, "__main__": 7,
}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(["gemext", *parts])] = path
    return mods


def _from_target(name: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module of a `from ... import` in module `name` (at `path`)."""
    if not node.level:
        return node.module or ""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    base = pkg.split(".")
    return ".".join(base[:len(base) - (node.level - 1)] + ([node.module] if node.module else []))


def _nodes(tree: ast.AST, typing_only: bool):
    """The nodes of `tree`, those under `if TYPE_CHECKING:` only when `typing_only` (type-only
    imports never run)."""
    for node in ast.iter_child_nodes(tree):
        if not typing_only and isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            yield from (n for child in node.orelse for n in (child, *_nodes(child, typing_only)))
            continue
        yield node
        yield from _nodes(node, typing_only)


def _imports(name: str, path: Path, known: dict[str, Path], typing_only: bool = True) -> set[str]:
    """gemext modules imported by a module, anywhere in it (function-level imports included; those
    under `if TYPE_CHECKING:` unless `typing_only` is False)."""
    found: set[str] = set()
    for node in _nodes(ast.parse(path.read_text()), typing_only):
        if isinstance(node, ast.ImportFrom):
            target = _from_target(name, path, node)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m in known and m != name}


def _layer(module: str) -> int:
    return LAYERS[module.split(".")[1]] if module != "gemext" else -1


def test_every_module_has_a_layer_and_imports_only_lower_layers():
    known = _modules()
    assert {m.split(".")[1] for m in known if m != "gemext"} <= set(LAYERS), "a new top-level module needs a layer"
    wrong = []
    for name, path in known.items():
        if name == "gemext":  # the package root loads submodules on first use (its __getattr__)
            continue
        for target in _imports(name, path, known):
            if target != "gemext" and _layer(target) > _layer(name):
                wrong.append(f"{name} (layer {_layer(name)}) imports {target} (layer {_layer(target)})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    known = _modules()
    # what runs at import: a type-only import cannot close a cycle
    graph = {n: _imports(n, p, known, typing_only=False) - {"gemext"} for n, p in known.items() if n != "gemext"}
    # a package's __init__ importing its own submodules is how packages are built, not a cycle
    edges = {n: {t for t in ts if not t.startswith(n + ".")} for n, ts in graph.items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(n: str, stack: list[str]) -> bool:
        state[n] = 1
        for t in sorted(edges.get(n, ())):
            if state.get(t) == 1:
                cycle.extend(stack[stack.index(t):] + [t] if t in stack else [n, t])
                return True
            if state.get(t) is None and visit(t, stack + [t]):
                return True
        state[n] = 2
        return False

    assert not any(visit(n, [n]) for n in sorted(edges) if state.get(n) is None), " -> ".join(cycle)


# Private (leading underscore) gemext names other modules may use: the compiled extension and the
# gymnasium hook `import gemext` installs, modules private to the package rather than to one module.
PRIVATE_ALLOWED = {"gemext._C", "gemext._gym"}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_uses(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The private gemext names, outside PRIVATE_ALLOWED, that a module takes from another: imported
    (`from x import _y`, `import x._y`) or read off an imported gemext module (`x._y`)."""
    modules = set(known) | {"gemext._C"}
    bound: dict[str, str] = {}  # local name -> the gemext module it names
    used: set[str] = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _from_target(name, path, node)
            if target.split(".")[0] != "gemext":
                continue
            for alias in node.names:
                used.add(f"{target}.{alias.name}")
                if f"{target}.{alias.name}" in modules:
                    bound[alias.asname or alias.name] = f"{target}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "gemext":
                    used.add(alias.name)
                    bound[alias.asname or "gemext"] = alias.name if alias.asname else "gemext"
    for node in ast.walk(tree):
        chain: list[str] = []
        while isinstance(node, ast.Attribute):
            chain.insert(0, node.attr)
            node = node.value
        if not (isinstance(node, ast.Name) and node.id in bound and chain):
            continue
        module = bound[node.id]
        for attr in chain:  # down the submodules to the first attribute that is not one
            if f"{module}.{attr}" not in modules:
                used.add(f"{module}.{attr}")
                break
            module = f"{module}.{attr}"

    def private(full: str) -> bool:
        parts = full.split(".")
        return any(_private(p) and ".".join(parts[:i + 1]) not in PRIVATE_ALLOWED for i, p in enumerate(parts))
    return {u for u in used if private(u)}


def test_no_private_name_is_used_across_modules():
    """A module's private names stay its own: no other gemext module imports them or reads them off
    the module (PRIVATE_ALLOWED lists the intended exceptions)."""
    known = _modules()
    found = sorted(f"{name} uses {use}" for name, path in known.items() for use in _private_uses(name, path, known))
    assert not found, "\n".join(found)


def test_the_training_loop_never_tests_a_task_name():
    from gemext.families import TASKS

    tree = ast.parse((PACKAGE / "train.py").read_text())
    literals = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert not literals & set(TASKS)


def test_import_gemext_exposes_its_submodules(tmp_path):
    """In a fresh interpreter: `import gemext` alone reaches every public submodule (loaded on first
    use, so importing gemext stays cheap and gymnasium stays optional)."""
    import subprocess
    import sys

    code = ("import sys, gemext; assert 'gemext.algorithms' not in sys.modules; "
            "print(len(gemext.algorithms.names()), len(gemext.families.TASKS), callable(gemext.ops.gem_grad_), "
            "callable(gemext.vi.fit), callable(gemext.train.train), 'gymnasium' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.split()[-6:] == ["10", "9", "True", "True", "True", "False"], out.stderr[-2000:]


def test_ruff_is_clean():
    """The lint configuration of pyproject.toml holds over the package, the tests and the benchmarks."""
    import shutil
    import subprocess

    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (it comes with the test extra: pip install '.[test]')")
    root = Path(__file__).resolve().parents[1]  # the source tree (the package may be installed elsewhere)
    out = subprocess.run([ruff, "check", "--no-cache", "gemext", "benchmarks", "python_tests"], cwd=root,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-1000:]


def _readme_examples() -> list[str]:
    """README's Python examples (the ```python blocks; a peer library's code is shown in plain blocks)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks, "README has no ```python example"
    return blocks


@pytest.mark.parametrize("name", algorithms.names())
def test_the_readme_examples_run_as_written_for_every_learner_they_name(name):
    """Each README example, its loops shortened to 3 iterations; the one that invites the user to swap
    in any name of the catalogue (`name = "..."  # any of algorithms.names()`) runs with every name."""
    ran = 0
    for code in _readme_examples():
        swappable = re.search(r'^name = "[^"]+"\s+# any of algorithms.names\(\)', code, re.M)
        if swappable is None and name != algorithms.names()[0]:
            continue  # a fixed example runs once
        short = re.sub(r"range\(\d+\)", "range(3)", code)
        if swappable:
            short = short.replace(swappable.group(0), f"name = {name!r}")
        scope: dict = {}
        exec(compile(short, "README.md", "exec"), scope)  # noqa: S102 - the project's own README
        ran += 1
        assert all(torch.isfinite(p).all() for p in scope["learner"].parameters())
        if "pred" in scope:
            pred = scope["pred"]
            assert pred.mean.shape == scope["new_task"].y_query.shape
            assert torch.isfinite(pred.mean).all() and (pred.std > 0).all()
    assert ran, "README has no example that names every learner"
