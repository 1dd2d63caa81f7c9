"""Meta-RL: the RL family and learners (gemext.families.rl, gemext.algorithms.rl) as `gemext train`
builds them: runs end to end, resume, option checks, and the learners' inner fits against the
policy-gradient maths of gemext.tasks.rl."""
from __future__ import annotations

import importlib.util
import math
import re

import pytest
import torch

import gemext.tasks.rl as rl
from gemext.tasks.rl import EpisodeBatch

HAS_MUJOCO = importlib.util.find_spec("mujoco") is not None
needs_mujoco = pytest.mark.skipif(not HAS_MUJOCO, reason="mujoco not installed (pip install 'gymnasium[mujoco]')")


TINY = dict(episodes=3, meta_batch=2, horizon=12, hidden=[8, 8], num_envs=3, eval_tasks=2, eval_episodes=3,
            eval_steps=1)
# GEM/Reptile: sigma0 0.1, since with 3 episodes of 12 steps the default 0.01 would make the inner SGD
# step's pull to the prior 0.1/36·1/0.01² ≈ 28 per step, which the GEM learners refuse (it diverges)
TINY_GEM = dict(sigma0=0.1)


def _run(tmp_path, algo, iterations=2, task="nav2d", **kw):
    from gemext.train import RunConfig

    opts = {**TINY, **({} if algo == "maml" else TINY_GEM), **kw}
    return RunConfig(task=task, algo=algo, iterations=iterations, out=str(tmp_path / algo), log_every=1,
                     checkpoint_every=1, meta_lr=1e-2, algo_options=opts)


@pytest.mark.parametrize("algo", ["gem-bml", "gem-bml+", "reptile", "maml"])
def test_train_eval_nav2d_end_to_end(tmp_path, algo, capsys):
    import json

    from gemext.train import evaluate, train

    run = train(_run(tmp_path, algo), progress=False)
    for f in ("config.json", "checkpoint.pt", "log.csv", "metrics.json"):
        assert (run / f).exists(), f
    capsys.readouterr()
    m = evaluate(run)
    assert f"meta-test {algo} (2 tasks, 1 updates): 2/2" in capsys.readouterr().err  # progress, also off a TTY
    assert {"task", "algo", "seed", "iterations", "wall_s", "return_by_step"} <= set(m)
    assert m["algo"] == algo and m["iterations"] == 2 and len(m["return_by_step"]) == 2
    assert all(math.isfinite(r) for r in m["return_by_step"])
    assert json.loads((run / "metrics.json").read_text())["return_by_step"] == m["return_by_step"]
    if algo in ("gem-bml", "gem-bml+"):  # the posterior's predictive spread: 8 draws per task
        assert len(m["return_spread_by_step"]) == len(m["return_draws_by_step"]) == 2 and m["eval_draws"] == 8
        assert all(s > 0 for s in m["return_spread_by_step"])
    else:
        assert "return_spread_by_step" not in m
    assert (run / "return_vs_steps.png").exists() and (run / "trajectories.png").exists()
    from gemext.families.rl import RLFamily
    assert set(RLFamily.eval_outputs) == {"return_vs_steps.png", "trajectories.png"}  # removed on a longer resume


@pytest.mark.parametrize("algo", ["gem-bml", "gem-bml+"])
def test_an_inner_sgd_step_that_overshoots_the_prior_is_refused(tmp_path, algo):
    """3 episodes of 12 steps with σ₀ 0.01: the KL term's SGD step pulls μ − μ₀ by 0.1/36·1e4 ≈ 28
    per step (its returns blew up to −1e22 at meta-test); refused with the numbers and the fixes.
    Reptile (no KL term) and the defaults (20 episodes of 100 steps: 0.5) are fine."""
    from gemext.train import train

    with pytest.raises(ValueError, match=r"= 27.8 per step, which must stay below 1.*raise episodes"):
        train(_run(tmp_path, algo, sigma0=0.01), progress=False)
    assert not (tmp_path / algo).exists()  # refused before the run folder was kept
    from gemext.families.rl import RLFamily, RLRunSettings
    from gemext.train import RunConfig
    d = RLFamily.learner_options_for(RunConfig(task="nav2d", algo=algo))
    assert d["inner_lr"] / (RLRunSettings().episodes * 100) * d["beta"] / d["sigma0"] ** 2 == pytest.approx(0.5)


def test_resume_compares_the_resolved_rl_settings(tmp_path):
    """An RL option spelled out at its default, or a meta-test-only one, is no change on --resume;
    a change of the trajectory is refused, naming the option."""
    from gemext.train import train

    run = _run(tmp_path, "gem-bml+", iterations=1)
    train(run, progress=False)
    more = _run(tmp_path, "gem-bml+", iterations=2, inner_steps=1, eval_tasks=3)
    train(more, resume=True, progress=False)
    other = _run(tmp_path, "gem-bml+", iterations=3, episodes=4)
    with pytest.raises(ValueError, match=r"algo_options\.episodes: 3 -> 4"):
        train(other, resume=True, progress=False)


def test_resume_continues_exactly(tmp_path):
    from gemext.train import load_checkpoint, train

    full = _run(tmp_path / "a", "gem-bml+")
    train(full, progress=False)
    part = _run(tmp_path / "b", "gem-bml+", )
    part.iterations = 1
    train(part, progress=False)
    part.iterations = 2
    train(part, resume=True, progress=False)
    a = load_checkpoint(tmp_path / "a/gem-bml+/checkpoint.pt")["learner"]
    b = load_checkpoint(tmp_path / "b/gem-bml+/checkpoint.pt")["learner"]
    assert a.keys() == b.keys() and any(k.startswith("core.prior.") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def _build_rl(algo, options, meta_lr=1e-2):
    """(learner options, sampler, learner, family) of a small nav2d run (close the family when done)."""
    from gemext.train import RunConfig, open_family

    family = open_family(RunConfig(task="nav2d", algo=algo, out="unused", meta_lr=meta_lr, algo_options=options))
    return family.learner_options_for(family.config), family.sampler, family.build_learner(), family


def test_point_posterior_vi_step_equals_policy_gradient_step():
    # Reptile's inner fit (core VI loop, delta posterior, SGD lr = inner_lr / s on s·L_PG) must move
    # μ exactly like one REINFORCE step of size inner_lr, task by task (vmapped likelihood).
    opts, sampler, learner, family = _build_rl("reptile", dict(TINY))
    tasks = rl.sample_tasks("nav2d", 2, 1)
    mu0 = {n: m.detach() for n, m in zip(learner.names, learner.core.prior.mu0)}
    batches = [sampler.rollouts(mu0, t) for t in tasks]
    prior = learner.core.prior.expand(2)
    fitted = learner._fit(batches, prior, learner.core.start(prior), 1)
    for i, b in enumerate(batches):
        expect = rl.reinforce_step(sampler.policy, mu0, b, opts["inner_lr"])
        for n, m in zip(learner.names, fitted.task(i).mu):
            torch.testing.assert_close(m, expect[n], rtol=1e-5, atol=1e-6)
    family.close()


@pytest.mark.parametrize("sigma0_range", ["shrink", None])
def test_gem_rl_learned_prior_std_stays_in_its_range(sigma0_range):
    """The RL meta-step clamps σ₀ into its range after each update (a large meta step would leave it)."""
    from gemext.train import meta_step

    opts, sampler, learner, family = _build_rl("gem-bml+", dict(TINY, **TINY_GEM, sigma0_range=sigma0_range), 0.5)
    opt = learner.meta_optimizer(0.5)
    for it in range(2):
        assert meta_step(learner, opt, rl.sample_tasks("nav2d", 2, it)).stepped
    s0 = torch.cat([r.detach().exp().flatten() for r in learner.core.prior.rho0])
    family.close()
    if sigma0_range == "shrink":
        assert float(s0.max()) <= opts["sigma0"] * (1 + 1e-6) and float(s0.min()) >= opts["sigma0"] / 10 * (1 - 1e-6)
    else:  # unbounded: the same steps leave (σ₀/10, σ₀)
        assert float(s0.max()) > opts["sigma0"] * 1.1 or float(s0.min()) < opts["sigma0"] / 10


def _support_fit(options):
    """(sampler, learner, family, tasks, support rollouts, expanded prior, posterior) of one inner fit
    of GEM-BML+ from its prior on 2 nav2d tasks (close the family when done)."""
    _, sampler, learner, family = _build_rl("gem-bml+", options)
    tasks = rl.sample_tasks("nav2d", 2, 1)
    mu0 = {n: m.detach() for n, m in zip(learner.names, learner.core.prior.mu0)}
    batches = [sampler.rollouts(mu0, t) for t in tasks]
    prior = learner.core.prior.expand(2)
    return sampler, learner, family, tasks, batches, prior, learner._fit(batches, prior, prior, 1)


def test_gem_rl_von_inner_fit_moves_mean_and_variance():
    von = dict(TINY, inner_optimizer="von", inner_lr=1.0, inner_options={"curvature": "reparam", "coupling": "diag"})
    *_, family, _, _, prior, post = _support_fit(von)
    family.close()
    moved_mu = max(float((m - m0).abs().max()) for m, m0 in zip(post.mu, prior.mu))
    shrunk = min(float((r - r0).min()) for r, r0 in zip(post.rho, prior.rho))
    assert all(torch.isfinite(t).all() for t in post.mu + post.rho)
    assert moved_mu > 0 and shrunk < 0  # the data made some weights more certain
    assert all(bool((r <= r0 + 1e-6).all()) for r, r0 in zip(post.rho, prior.rho))  # never less certain


def test_maml_inner_step_is_differentiable_like_finite_differences():
    torch.manual_seed(0)
    pol = rl.GaussianMLPPolicy(2, 2, hidden=(4,)).double()
    b, q = (rl.process(EpisodeBatch(torch.randn(6, 3, 2, dtype=torch.float64),
                                    torch.randn(6, 3, 2, dtype=torch.float64),
                                    torch.randn(6, 3, dtype=torch.float64), torch.ones(6, 3, dtype=torch.float64)))
            for _ in range(2))
    params = {k: v.detach().requires_grad_() for k, v in pol.named_parameters()}

    def outer(p):
        return rl.pg_surrogate(pol, rl.reinforce_step(pol, p, b, 0.5, create_graph=True), q)

    grads = torch.autograd.grad(outer(params), list(params.values()))
    d = {k: torch.randn_like(v) for k, v in params.items()}
    eps = 1e-6
    fd = (outer({k: v + eps * d[k] for k, v in params.items()})
          - outer({k: v - eps * d[k] for k, v in params.items()})) / (2 * eps)
    assert sum((g * d[k]).sum() for g, k in zip(grads, params)).item() == pytest.approx(fd.item(), rel=1e-5)


def test_rl_options_are_validated(tmp_path):
    from gemext.train import train

    with pytest.raises(ValueError, match="maml: unknown option.s. episodez; valid: .*episodes.*max_kl"):
        train(_run(tmp_path, "maml", episodez=3), progress=False)
    with pytest.raises(ValueError, match="not available for nav2d"):
        train(_run(tmp_path, "abml"), progress=False)
    with pytest.raises(ValueError, match="RL option episodes must be an integer >= 1, got 'x'"):
        train(_run(tmp_path, "maml", episodes="x"), progress=False)
    with pytest.raises(ValueError, match="RL option horizon must be an integer >= 1 or null"):
        train(_run(tmp_path, "maml", horizon=0), progress=False)
    with pytest.raises(ValueError, match="RL option vector must be 'sync' or 'async'"):
        train(_run(tmp_path, "maml", vector="threads"), progress=False)
    # a learner's option: typed by the registry; another learner's: refused naming who takes it
    with pytest.raises(TypeError, match="maml: option first_order must be bool, got int 1"):
        train(_run(tmp_path, "maml", first_order=1), progress=False)
    for algo, option, users in (("gem-bml+", "max_kl", "maml"), ("maml", "sigma0", "gem-bml, gem-bml+, reptile"),
                                ("reptile", "beta", "gem-bml, gem-bml+")):
        line = f"{algo}: option {option} is used only by {users}, not by {algo}; valid: "
        with pytest.raises(ValueError, match=re.escape(line)):
            train(_run(tmp_path, algo, **{option: 0.5}), progress=False)
    with pytest.raises(ValueError, match="option sampler is set by the task family"):
        train(_run(tmp_path, "maml", sampler=None), progress=False)
    with pytest.raises(ValueError, match="one policy-gradient step; inner_steps 2"):
        train(_run(tmp_path, "maml", inner_steps=2), progress=False)
    with pytest.raises(ValueError, match="gem-bml: option inner_lr must be > 0, got 0"):
        train(_run(tmp_path, "gem-bml", inner_lr=0), progress=False)
    assert not list(tmp_path.iterdir())  # every refusal came before a run folder was kept


def test_rl_learner_options_go_through_the_registry():
    """The RL learners' options are their keyword parameters, checked by the registry as every
    learner's are (before the learner is built: no sampler needed to be refused)."""
    from torch import nn

    from gemext import algorithms

    assert algorithms.option_names("maml", "rl") == [
        "cg_damping", "cg_iters", "first_order", "inner_lr", "inner_steps", "ls_backtrack_ratio", "ls_max_steps",
        "max_kl", "sampler", "seed"]
    assert set(algorithms.option_names("gem-bml+", "rl")) - set(algorithms.option_names("reptile", "rl")) == {
        "beta", "learn_sigma", "mc_samples", "sigma0_range"}
    with pytest.raises(ValueError, match="reptile: option mc_samples is used only by gem-bml, gem-bml\\+"):
        algorithms.create("reptile", nn.Linear(2, 2), domain="rl", mc_samples=2)
    with pytest.raises(ValueError, match="gem-bml: unknown option.s. max_kl; valid: beta"):
        algorithms.create("gem-bml", nn.Linear(2, 2), domain="rl", max_kl=0.1)
    with pytest.raises(TypeError, match="gem-bml: option sigma0 must be float, got str"):
        algorithms.create("gem-bml", nn.Linear(2, 2), domain="rl", sigma0="big")


def test_rl_family_splits_its_settings_from_the_learner_options(tmp_path):
    """learner_options_for gives every option of the run's learner (its defaults, the run's options
    and --inner-steps), the rest of --options (and --meta-batch) are the family's; config.json keeps
    the options as given and records the learner's under resolved."""
    import json

    from gemext.families.rl import RLFamily
    from gemext.train import RunConfig, train

    config = RunConfig(task="nav2d", algo="reptile", inner_steps=2, meta_batch=3,
                       algo_options={"episodes": 4, "sigma0": 0.5, "hidden": [8]})
    opts = RLFamily.learner_options_for(config)
    assert opts == {"inner_lr": 0.1, "inner_steps": 2, "query_steps": 1, "sigma0": 0.5, "inner_optimizer": "sgd",
                    "inner_options": None, "likelihood_scale": None}
    config = _run(tmp_path, "gem-bml+", iterations=1, inner_lr=0.05)
    config.meta_batch = 1  # the flag over the option
    cfg = json.loads((train(config, progress=False) / "config.json").read_text())
    assert cfg["algo_options"] == {**TINY, **TINY_GEM, "inner_lr": 0.05} and cfg["meta_batch"] == 1
    assert cfg["resolved"]["learner_options"] == {**RLFamily.learner_options_for(_run(tmp_path, "gem-bml+")),
                                                  "inner_lr": 0.05}
    assert cfg["resolved"]["meta_batch"] == 1


@needs_mujoco
def test_mujoco_meta_training_smoke(tmp_path):
    from gemext.train import evaluate, train

    run = train(_run(tmp_path, "gem-bml+", iterations=1, task="halfcheetah-dir", horizon=8), progress=False)
    assert len(evaluate(run, plots=False)["return_by_step"]) == 2


def test_gem_rl_natural_inner_fit_stays_in_its_trust_region_and_fits_variances():
    natural = dict(TINY, **TINY_GEM, inner_optimizer="natural", inner_lr=1.0, inner_options={"max_kl": 1e-3})
    sampler, learner, family, tasks, batches, prior, post = _support_fit(natural)
    for i, b in enumerate(batches):
        kl = rl.mean_kl(sampler.policy, dict(zip(learner.names, [m[i] for m in post.mu])), b,
                        dict(zip(learner.names, [m[i] for m in prior.mu])))
        assert 0 < float(kl) <= 1e-3
    assert all(bool((r <= r0).all()) for r, r0 in zip(post.rho, prior.rho))  # never less certain
    assert min(float((r - r0).min()) for r, r0 in zip(post.rho, prior.rho)) < -1e-3  # some weights informed
    from gemext.train import meta_step
    opt = learner.meta_optimizer(1e-2)
    info = meta_step(learner, opt, tasks)
    family.close()
    assert info.stepped and all(torch.isfinite(p).all() for p in learner.core.prior.mu0)


@pytest.mark.parametrize("algo,options,word", [
    ("reptile", {"inner_optimizer": "natural"}, "use 'sgd' for reptile"),
    ("gem-bml+", {"inner_optimizer": "natural", "inner_options": {"max_k": 1}}, "fields of TrustRegionVI"),
    ("gem-bml+", {"inner_optimizer": "natural", "inner_options": {"max_kl": -1}}, "max_kl must be > 0"),
    ("gem-bml+", {"inner_optimizer": "adam"}, "'sgd', 'von' or 'natural'"),
])
def test_natural_inner_options_are_refused_by_name(algo, options, word):
    with pytest.raises(ValueError, match=re.escape(word)):
        _build_rl(algo, dict(TINY, **TINY_GEM, **options))


def test_posterior_draws_leave_the_meta_test_path_unchanged_and_are_the_posterior():
    _, sampler, learner, family = _build_rl("gem-bml+", dict(TINY, **TINY_GEM))
    tasks = rl.sample_tasks("nav2d", 2, 5)
    sampler.reseed(3)
    learner.generator.manual_seed(3)  # the inner VI's noise
    plain, none = learner.adapt_path_with_draws(tasks, 1, 3)
    sampler.reseed(3)
    learner.generator.manual_seed(3)
    path, drawn = learner.adapt_path_with_draws(tasks, 1, 3, draws=4, draw_episodes=2)
    assert none is None and len(drawn) == 2 and len(drawn[0]) == 2 and len(drawn[0][0]) == 4
    for a, b in zip(plain, path):
        for x, y in zip(a, b):
            assert torch.equal(x.observations, y.observations) and torch.equal(x.rewards, y.rewards)
    # the draws are μ + σε of the state's posterior: their spread around μ is σ
    state = learner._start(2)
    draws = learner.draw_policies(state, 400, torch.Generator().manual_seed(0))
    w = torch.stack([d["mean.0.weight"] for d in draws[1]])
    post = state[1].task(1)
    i = learner.names.index("mean.0.weight")
    torch.testing.assert_close(w.std(0), post.rho[i].exp(), rtol=0.15, atol=0)
    torch.testing.assert_close(w.mean(0), post.mu[i], rtol=0, atol=float(post.rho[i].exp().max()) * 0.25)
    family.close()


def test_a_run_saved_with_the_retired_resolved_option_still_evaluates(tmp_path):
    """RL runs saved before the options went through the registry kept algo_options["resolved"]."""
    import json

    from gemext.train import evaluate, train

    run = train(_run(tmp_path, "gem-bml+", iterations=1), progress=False)
    cfg = json.loads((run / "config.json").read_text())
    cfg["algo_options"]["resolved"] = {"inner_lr": 0.1}
    (run / "config.json").write_text(json.dumps(cfg))
    assert len(evaluate(run, plots=False)["return_by_step"]) == 2
