"""The pieces of the `gemext` command's parser (gemext.cli): argument types that refuse a bad value
with what was expected, the closest names for a misspelt one (`did_you_mean`), and the help
formatter and one-line refusals every subcommand shares. Private names: the command is their only
user."""
from __future__ import annotations

import argparse
import difflib
import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path


def _int_at_least(lo: int, what: str):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v
    return parse


positive_int = _int_at_least(1, "a positive integer")
nonneg_int = _int_at_least(0, "an integer >= 0")


def seed_arg(s: str) -> int:
    v = nonneg_int(s)
    if v >= 2**63:
        raise argparse.ArgumentTypeError(f"expected a seed below 2**63, got {v}")
    return v


def positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {v}")
    return v


def positive_int_list(s: str) -> list[int]:
    try:
        vals = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {s!r}")
    return vals


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """' (did you mean X?)' naming the candidate closest to a mistyped `word` (and any about as
    close), or '' when none is close."""
    scored = sorted(((difflib.SequenceMatcher(None, word, c).ratio(), c) for c in candidates), reverse=True)
    close = [c for r, c in scored if r >= max(0.6, scored[0][0] - 0.05)][:3] if scored else []
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def choice(choices: list[str] | tuple[str, ...]) -> Callable[[str], str]:
    """An argparse type that accepts one of `choices` and refuses anything else as argparse's
    `choices` does, plus the closest names (argparse checks `choices` only after `type`)."""
    def parse(s: str) -> str:
        if s not in choices:
            raise argparse.ArgumentTypeError(f"invalid choice: {s!r}{did_you_mean(s, choices)}; "
                                             f"choose from {', '.join(choices)}")
        return s
    return parse


def existing_dir(s: str) -> str:
    if not Path(s).is_dir():
        raise argparse.ArgumentTypeError(f"no such directory: {s}")
    return s


def options_json(s: str) -> dict:
    try:
        v = json.loads(s)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {s!r} ({exc.msg})") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {s!r}")
    return v


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it has none or its help already says it; descriptions and
    epilogs (the examples) print as written."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with its refusals on one line, `gemext train: error: ...`, exit 2: the usage block
    argparse prints above it runs to a dozen lines for `train` and buries the line that matters
    (`-h` shows it), and every other refusal of the command (gemext.cli.main) looks the same."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")
