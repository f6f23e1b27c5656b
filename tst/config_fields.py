"""The field helper every config section is built with (flag spelling, help, choices)."""

from __future__ import annotations

from dataclasses import field

from tst.errors import ConfigError

__all__ = ["_f", "_require", "read_yaml_mapping"]


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


def read_yaml_mapping(path: str, flag: str, shape: str) -> dict:
    """The mapping in ``flag``'s YAML file (empty for an empty file), or one line naming the
    file, the fault and the ``shape`` it must hold."""
    import yaml

    try:
        with open(path) as f:
            content = yaml.safe_load(f)
    except OSError as error:
        raise ConfigError(f"{flag} {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        first = str(error).splitlines()[0]
        raise ConfigError(f"{flag} {path} is not valid YAML ({first}): write {shape}") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ConfigError(f"{flag} {path} must hold {shape}, not a {type(content).__name__}")
    return content
