"""The field helper every config section is built with (flag spelling, help, choices)."""

from __future__ import annotations

from dataclasses import field

from tst.errors import ConfigError

__all__ = ["_f", "_require"]


def _f(default, help: str, choices=None, *, flag=None, nargs=None, type=None, metavar=None):
    """A dataclass field that carries its command-line help, choices and spelling.

    ``flag`` overrides the flag name; a bool field whose default is True is switched off by
    its flag (Megatron-LM's ``--no-*`` / ``--disable-*`` flags).
    """
    metadata = {"help": help, "choices": choices, "flag": flag, "nargs": nargs, "type": type,
                "metavar": metavar}  # fmt: skip
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)
