"""Kernel ABI values shared by the planner and the selection rules (docs/design.md, "Kernel ABI")."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RuntimeArg:
    """One kernel parameter after the fixed prefix: a C type and a name the templates and the binder share."""

    name: str
    ctype: str

    def __str__(self) -> str:
        return f"{self.ctype} {self.name}"


POINTER = "const {} * __restrict__"  # read-only run-time tensors: POINTER.format("int")
