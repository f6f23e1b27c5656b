"""megatron-core's first import, without ``torch.compile`` where CUDA is absent.

megatron-core decorates a few dozen small fusions with ``megatron.core.jit.jit_fuser``, which
is ``torch.compile``; decorating imports TorchDynamo and asks for the compiler's settings,
about 3.4 s of every process's start-up on two CPU cores (a quarter of a small CPU run), and
calling them had inductor write and compile C++ in every process and for every shape, with
no speed-up at CPU sizes (``tst.megatron_config`` turns the optional fusions off there). So
without CUDA, while megatron-core's package executes, ``torch.compile`` is a decorator that returns the
function unchanged; ``jit_fuser`` keeps that stand-in, and ``torch.compile`` is itself again
once the import is over. With CUDA nothing changes.

:func:`install` (``import tst`` calls it) arms this for the first ``import megatron.core``
in the process, importing nothing itself. Where megatron-core was imported before ``tst``,
``tst.cpu_compat`` unwraps the compiled fusions instead.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

__all__ = ["install"]

_PACKAGE = "megatron.core"


def _unchanged(model=None, **kwargs):
    """``torch.compile``'s signature, compiling nothing: ``@jit_fuser`` and ``jit_fuser(fn)``
    return ``fn``; ``torch.compile(mode=...)`` returns a decorator that does."""
    return model if model is not None else (lambda fn: fn)


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
            import torch

            if torch.cuda.is_available():
                return exec_module(module)
            compile_ = torch.compile
            torch.compile = _unchanged
            try:
                return exec_module(module)
            finally:
                torch.compile = compile_

        spec.loader.exec_module = exec_without_compiling
        return spec


def install() -> None:
    """Arm the hook (idempotent; nothing to do once megatron-core is imported)."""
    if _PACKAGE in sys.modules or any(isinstance(f, _FirstImport) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _FirstImport())
