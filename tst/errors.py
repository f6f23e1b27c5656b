"""The project's error hierarchy; free of heavy imports so every tool can catch it cheaply.

:class:`TSTError` is the base of the errors raised for something the user can fix (a flag, a
file, an input): the message names it and the fix, so a command-line tool prints it as one
line and exits non-zero (``tools/_cli.py``) instead of showing a traceback. It derives from
``ValueError`` because the modules raised ``ValueError`` subclasses before it existed and
callers catch those. The module-specific errors (``TokenizerFileError``,
``IndexedDatasetError``, ``CorpusError``, ``PreprocessError``, ``ExportError``, ...) derive
from it where they are defined. ``CheckpointError`` (``tst.checkpointing``) and
:class:`NonFiniteLossError` are ``RuntimeError`` s: failures of a run, with their own exit
code in ``pretrain_tst.py``; the tools that read checkpoints name ``CheckpointError`` to
``run_main`` beside ``TSTError``.
"""

from __future__ import annotations

__all__ = ["NonFiniteLossError", "TSTError"]


class TSTError(ValueError):
    """Something the user can fix; the message names the flag or file and says how."""


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradients; the message says what
    to change, and where the last good state was saved.

    Deliberately not a :class:`TSTError`: it is a run that failed, not an input to fix
    before starting, and ``pretrain_tst.py`` gives it its own exit code (3, beside 2 for the
    ``ValueError`` family); a ``ValueError`` base would fold it into 2."""
