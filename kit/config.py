"""Config fields that carry their command-line help: kit.cli generates every flag from them."""

from dataclasses import MISSING, field


def option(default=MISSING, help: str = "", *, factory=MISSING, **cli):
    """A dataclass field with ``help`` (and optionally ``flag``, ``metavar``, ``required``)."""
    return field(default=default, default_factory=factory, metadata={"help": help, **cli})
