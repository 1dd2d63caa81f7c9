"""Registration of the `gemext/...` gymnasium ids when gemext is imported, at no import cost: if
gymnasium is already loaded the ids are registered at once, otherwise when gymnasium is first
imported (a one-shot import hook). gymnasium stays optional."""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys


def _register() -> None:
    from .tasks.rl.envs import register_envs

    register_envs()


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
            _register()
        loader.exec_module = exec_module
        return spec


def install() -> None:
    if "gymnasium" in sys.modules:
        _register()
    elif importlib.util.find_spec("gymnasium") is not None:
        sys.meta_path.insert(0, _OnGymnasiumImport())
