"""Registration of the `gemext/...` gymnasium ids when gemext is imported, at no import cost: if
gymnasium is already loaded the ids are registered at once, otherwise when gymnasium is first
imported (a one-shot import hook). gymnasium stays optional."""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

# id -> (class in gemext.tasks.rl.envs, horizon): registered by name, so registering imports nothing
GYM_IDS: dict[str, tuple[str, int]] = {
    "gemext/Nav2D-v0": ("Nav2DEnv", 100),
    "gemext/HalfCheetahVel-v0": ("HalfCheetahVelEnv", 200),
    "gemext/HalfCheetahDir-v0": ("HalfCheetahDirEnv", 200),
    "gemext/AntVel-v0": ("AntVelEnv", 200),
    "gemext/AntDir-v0": ("AntDirEnv", 200),
}


def register() -> None:
    """Register the ids with gymnasium (idempotent). gymnasium must be imported (or importing)."""
    gym = sys.modules["gymnasium"]
    for env_id, (cls, horizon) in GYM_IDS.items():
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=f"gemext.tasks.rl.envs:{cls}", max_episode_steps=horizon)


class _OnGymnasiumImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "gymnasium":
            return None
        sys.meta_path.remove(self)  # one shot: find the real module below this hook
        spec = importlib.util.find_spec(name)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module):
            run(module)
            register()
        loader.exec_module = exec_module
        return spec


def install() -> None:
    if "gymnasium" in sys.modules:
        register()
    elif importlib.util.find_spec("gymnasium") is not None:
        sys.meta_path.insert(0, _OnGymnasiumImport())
