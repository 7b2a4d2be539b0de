"""Makes plain ``lm_eval --model harness`` work: registers the bridge once lm-eval's models module has run.

lm-eval 0.4.x reads no plugin entry points for models; it looks names up in its own registry,
which ``lm_eval.models`` fills with lazy "module:attr" targets, and ``get_model`` imports that
module only while the registry is empty (so registering anything earlier would hide lm-eval's own
models). The installed ``dlm_harness_lm_eval.pth`` calls ``install()`` at interpreter start: a
finder on ``sys.meta_path`` that lets the normal import of ``lm_eval.models`` run and then adds the
lazy target ``harness`` -> ``TARGET``. Nothing heavy is imported here (no torch, no lm_eval); the
bridge module loads only when lm-eval asks for the model.
"""
from __future__ import annotations

import sys

MODULE = "lm_eval.models"
NAME = "harness"
TARGET = "harness.models.lm_eval_bridge:HarnessLM"


def register() -> None:
    """Add ``harness`` to lm-eval's model registry (a lazy target; kept if already there)."""
    from lm_eval.api.registry import model_registry

    if NAME not in model_registry:
        model_registry.register(NAME, target=TARGET)


class _RegisteringLoader:
    """The real loader of ``lm_eval.models``, then ``register()``."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        register()

    def __getattr__(self, name: str):  # get_source, get_filename, resource readers, ...
        return getattr(self.loader, name)


class _Finder:
    """Finds ``lm_eval.models`` with the other finders and wraps its loader."""

    def find_spec(self, fullname, path, target=None):
        if fullname != MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once); register now if lm-eval's models already ran."""
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    if MODULE in sys.modules:
        register()
