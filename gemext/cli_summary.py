"""The one line closing `gemext train` / `gemext eval` (gemext.cli): what ran, its headline
figures with their 95% CI, and where the results and plots are."""
from __future__ import annotations

from pathlib import Path


def _pm(value: float, ci: float | None, scale: float = 1.0, fmt: str = ".4g") -> str:
    """`value ± ci` (a 95% CI half-width) in `fmt`; a trailing % in `fmt` goes after the value."""
    unit, fmt = ("%", fmt[:-1]) if fmt.endswith("%") else ("", fmt)
    text = format(scale * value, fmt) + unit
    return text if ci is None else f"{text} ± {format(scale * ci, fmt)}"


def _after(k: int, what: str) -> str:
    return f"after {k} {what}{'' if k == 1 else 's'}"


# how each headline figure reads: metrics dict -> text
_FIGURES = {
    "mse_by_step": lambda m: (f"MSE {_after(len(m['mse_by_step']) - 1, 'step')} "
                              + _pm(m["mse_by_step"][-1], (m.get("mse_ci95_by_step") or [None])[-1])),
    "nll": lambda m: "NLL " + _pm(m["nll"], m.get("nll_ci95")),
    "accuracy": lambda m: "accuracy " + _pm(m["accuracy"], m.get("ci95"), 100, ".2f%"),
    "ece": lambda m: f"ECE {m['ece']:.3f}",
    "return_by_step": lambda m: (f"return {_after(len(m['return_by_step']) - 1, 'update')} "
                                 + _pm(m["return_by_step"][-1], (m.get("return_ci95_by_step") or [None])[-1])
                                 + f" (before: {m['return_by_step'][0]:.4g})"),
}


def _headline(task: str) -> tuple[str, ...]:
    """The figures the closing line names: the task family's `headline`, else every one known."""
    from . import families

    try:
        return families.get(task).headline or tuple(_FIGURES)
    except ValueError:  # not a task (a hand-edited metrics.json)
        return tuple(_FIGURES)


def summary(metrics: dict, run: str | Path) -> str:
    """One line closing `gemext train` / `gemext eval`: what ran, its headline figures (95% CI
    after ±) and where the results and plots are."""
    what = f"{metrics.get('task', '?')} {metrics.get('algo', '?')}"
    if "ways" in metrics and "shots" in metrics:
        what += f" {metrics['ways']}-way {metrics['shots']}-shot"
    n = metrics.get("iterations", "?")
    done = f"{n} iteration{'' if n == 1 else 's'}"
    if metrics.get("stopped_by") == "time_budget":
        done += " (time budget)"
    keys = _headline(metrics.get("task", ""))
    figures = []
    for key in keys:
        try:
            figures.append(_FIGURES[key](metrics))
        except (KeyError, IndexError, TypeError, ValueError):  # a figure this meta-test did not report
            continue
    if not figures:
        return f"{what}: {done}, not meta-tested (gemext eval {run}); run folder: {run}"
    tested = f"{metrics['eval_tasks']} {metrics.get('eval_split', 'test')} tasks" if "eval_tasks" in metrics else ""
    return f"{what}, {done}: {', '.join(figures)}{f' on {tested}' if tested else ''}; results and plots: {run}"
