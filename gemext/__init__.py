"""gemext: Gradient-EM Bayesian meta-learning on fused C++/CUDA kernels."""
from __future__ import annotations

try:
    from . import _C  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "gemext's compiled module gemext._C could not be imported "
        f"({exc}). Build it with `pip install .` from the source tree "
        "(needs a C++17 compiler, cmake>=3.18; nvcc optional), or for development "
        "`pip install --no-build-isolation -Ceditable.rebuild=true -e .`."
    ) from exc

__version__: str = _C.version

from . import _gym  # noqa: E402

_gym.install()  # `gymnasium.make("gemext/Nav2D-v0")` works after `import gemext` (ids in README)


def build_info() -> dict:
    """What this build contains, and what this machine offers: version, torch, cuda (gemext's own
    CUDA kernels were compiled into this build, whether or not this machine can run them),
    cuda_available (torch sees a usable CUDA device now: torch.cuda.is_available()), openmp,
    threads (torch's intra-op threads). Both CUDA keys true: the kernels can run here."""
    import torch

    return {
        "version": __version__,
        "torch": torch.__version__,
        "cuda": bool(_C.cuda),
        "cuda_available": torch.cuda.is_available(),
        "openmp": bool(_C.openmp),
        "threads": torch.get_num_threads(),
    }


_SUBMODULES = ("algorithms", "config", "distributed", "families", "gaussian", "linalg", "metrics", "ops", "plots",
               "reference", "runs", "tasks", "train", "vi")
# the measured settings of `gemext train` (gemext.families.presets)
_PRESETS = ("presets", "preset_training", "preset_names")


def __getattr__(name: str):
    """`gemext.algorithms`, `gemext.ops`, ... without importing them first (loaded on first use);
    `gemext.presets`, `gemext.preset_training`, `gemext.preset_names` likewise."""
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    if name in _PRESETS:
        from .families import presets

        return getattr(presets, name)
    raise AttributeError(f"module 'gemext' has no attribute {name!r}")
