"""Errors a training run ends with; kept free of heavy imports so the CLI can catch them."""

from __future__ import annotations

__all__ = ["NonFiniteLossError"]


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradients; the message says what
    to change, and where the last good state was saved."""
