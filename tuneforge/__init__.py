"""tuneforge: fine-tune large language models end to end.

The Python API (docs/python-api.md) is the functions of tuneforge.api, reachable from here:
``tuneforge.prepare``, ``load_config``, ``check``, ``plan``, ``train``, ``evaluate``, ``export``,
``load_run``, ``generate``. They are imported on first use: ``import tuneforge`` (and so the
CLI's start-up) loads neither torch nor transformers.
"""

import importlib
import sys
import types

__version__ = "0.1.0"

API = ("prepare", "load_config", "check", "plan", "train", "evaluate", "export", "load_run", "generate")
__all__ = [*API, "__version__"]
# Three API functions share their name with a stage package or module (tuneforge/train,
# tuneforge/evaluate, tuneforge/plan.py), which Python binds on this package when it is
# imported. So those three stay modules, callable: tuneforge.train(cfg) is
# tuneforge.api.train(cfg) while tuneforge.train.run (and every import of it) is untouched.
STAGES = ("train", "evaluate", "plan")


class _CallableStage(types.ModuleType):
    """A stage module that is also its API function."""

    def __call__(self, *args, **kwargs):
        return getattr(importlib.import_module("tuneforge.api"), self.__name__.rpartition(".")[2])(*args, **kwargs)


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # The import system binds every imported submodule here: the stages become callable.
        if name in STAGES and type(value) is types.ModuleType:
            value.__class__ = _CallableStage
        super().__setattr__(name, value)


def __getattr__(name):
    if name in STAGES:
        return importlib.import_module(f"tuneforge.{name}")  # bound through _Package.__setattr__
    if name in API:
        return getattr(importlib.import_module("tuneforge.api"), name)
    raise AttributeError(f"module 'tuneforge' has no attribute {name!r}")


sys.modules[__name__].__class__ = _Package
