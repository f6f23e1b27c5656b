"""megatron-core's first import, without ``torch.compile`` where CUDA is absent.

megatron-core decorates a few dozen small fusions with ``megatron.core.jit.jit_fuser``, which
is ``torch.compile``; decorating imports TorchDynamo and asks for the compiler's settings,
about 3.4 s of every process's start-up on two CPU cores (a quarter of a small CPU run), and
calling them had inductor write and compile C++ in every process and for every shape, with
no speed-up at CPU sizes (``tst.megatron_config`` turns the optional fusions off there). So
without CUDA, while megatron-core's package executes, ``torch.compile`` is a decorator that returns the
function unchanged; ``jit_fuser`` keeps that stand-in, and ``torch.compile`` is itself again
once the import is over. Also without CUDA, ``wandb`` (about 1.2 s to import) is deferred:
megatron-core's modules import it at import time for inference and timer logging this trainer
does not use, so it executes on first use (``--wandb-project``), as the real module. With
CUDA neither changes.

:func:`settled_imports` pauses the cyclic garbage collector over a block of heavy imports and
then moves what they built (torch's and megatron-core's module graph, about 380,000 objects
in a test rank) out of its reach with :func:`gc.freeze`: otherwise the collector walks that
graph again and again while it is built and once more at exit, about 2.5 s of every
process's start-up and exit on two CPU cores. The hook below runs megatron-core's import
under it.

:func:`install` (``import tst`` calls it) arms this for the first ``import megatron.core``
in the process, importing nothing itself. Where megatron-core was imported before ``tst``,
``tst.cpu_compat`` unwraps the compiled fusions instead.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.abc
import importlib.util
import sys
import types

__all__ = ["compile_no_fusions", "install", "settled_imports"]

_PACKAGE = "megatron.core"
_settling = False  # inside a settled_imports block


def _unchanged(model=None, **kwargs):
    """``torch.compile``'s signature, compiling nothing: ``@jit_fuser`` and ``jit_fuser(fn)``
    return ``fn``; ``torch.compile(mode=...)`` returns a decorator that does."""
    return model if model is not None else (lambda fn: fn)


@contextlib.contextmanager
def settled_imports():
    """Run a block of imports with the cyclic collector paused, then freeze what they built.

    Imports create almost no cyclic garbage; the pause saves the collections their millions
    of allocations trigger, and the freeze keeps later collections (and the one at exit) off
    the module graph, which lives as long as the process anyway. Only a block that imported
    something collects and freezes, the collection first: a frozen object is never
    collected, so garbage frozen with the imports (a finished run's model and its process
    groups, in a process that trains again) would never be freed. A block inside another
    (megatron-core's first import inside ``pretrain_tst.main``'s) leaves all of it to the
    outer one, which would only repeat the collection; the collector is enabled afterwards
    only where it was before."""
    global _settling
    if _settling:
        yield
        return
    enabled = gc.isenabled()
    modules = len(sys.modules)
    gc.disable()
    _settling = True
    try:
        yield
    finally:
        _settling = False
        if len(sys.modules) > modules:
            # The collection frees what was garbage before the block too: nothing collectable
            # is frozen. A block that imported nothing (a process's later runs) skips both.
            gc.collect()
            gc.freeze()
        if enabled:
            gc.enable()


class _DeferredModule(types.ModuleType):
    """A module whose code runs on the first access to a name it does not have yet."""

    def __getattr__(self, name):
        loader = self.__loader__
        self.__class__ = types.ModuleType  # first: the code below reads and sets names
        self.__path__ = self.__spec__.submodule_search_locations
        loader.exec_module(self)
        return getattr(self, name)


class _DeferredLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module.__spec__.loader = module.__loader__ = self.loader
        # Without ``__path__`` importing a submodule (``import wandb.sdk``) reads it through
        # ``__getattr__`` and so runs the package first, in its order.
        module.__dict__.pop("__path__", None)
        module.__class__ = _DeferredModule


class _DeferredWandb(importlib.abc.MetaPathFinder):
    """``import wandb`` binds a module whose code runs on its first use, in that object: the
    modules that imported it early see the real module then. (``importlib.util.LazyLoader``
    runs it at the second ``import`` statement already, where Python 3.11 reads
    ``__spec__``.)"""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "wandb":
            return None
        sys.meta_path.remove(self)  # once: the real finders locate the package
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _DeferredLoader(spec.loader)
        return spec


class _FirstImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != _PACKAGE:
            return None
        sys.meta_path.remove(self)  # once: the real finders locate the package
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_without_compiling(module):
            with settled_imports():
                import torch

                cuda = torch.cuda.is_available()
                if cuda and not _NO_FUSER_COMPILE:
                    return exec_module(module)
                if not cuda and "wandb" not in sys.modules:
                    sys.meta_path.insert(0, _DeferredWandb())
                compile_ = torch.compile
                torch.compile = _unchanged
                try:
                    return exec_module(module)
                finally:
                    torch.compile = compile_

        spec.loader.exec_module = exec_without_compiling
        return spec


_NO_FUSER_COMPILE = False  # --disable-jit-fuser: the stand-in with CUDA too


def compile_no_fusions() -> None:
    """Megatron-LM's ``--disable-jit-fuser``: megatron-core's ``jit_fuser`` compiles nothing,
    with CUDA too. Before megatron-core's first import (``pretrain_tst.main`` calls this right
    after parsing) every fusion stays a plain function; after it, as Megatron-LM's
    ``disable_jit_fuser``, only the modules imported from then on."""
    global _NO_FUSER_COMPILE
    _NO_FUSER_COMPILE = True
    if "megatron.core.jit" in sys.modules:
        sys.modules["megatron.core.jit"].disable_jit_fuser()


def install() -> None:
    """Arm the hook (idempotent; nothing to do once megatron-core is imported)."""
    if _PACKAGE in sys.modules or any(isinstance(f, _FirstImport) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _FirstImport())
