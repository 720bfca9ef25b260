"""Config fields that carry their command-line help: kit.cli generates every flag from them."""

from __future__ import annotations

from dataclasses import MISSING, field


def option(default=MISSING, help: str = "", *, factory=MISSING, **cli):
    """A dataclass field with ``help`` (and optionally ``flag``, ``required``) for kit.cli."""
    return field(default=default, default_factory=factory, metadata={"help": help, **cli})
