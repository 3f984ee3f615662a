"""Stages 3–4 for one plan: render its kernels, compile them through the cache, and step down to a leaner tiling
while ptxas reports spills, for every kernel (the forward through `plan.forward_tilings`, dK/dV and dQ through
`tiling.leaner`). One `Compiled` per pattern structure, dtype, head dim and arch."""

from __future__ import annotations

import functools
from dataclasses import replace

from .nvrtc import Binary, Resources, compile_cached
from .pattern import Pattern
from .plan import KernelPlan, make_plan, next_tiling
from .render import KernelSource, render_backward, render_forward

BACKWARD_KERNELS = {"attngen_bwd_dkdv": "dkdv", "attngen_bwd_dq": "dq"}


def spills(resources: Resources) -> bool:
    return bool(resources.spill_stores or resources.spill_loads)


def build_forward(plan: KernelPlan) -> tuple[KernelPlan, KernelSource, Binary]:
    """The forward kernel of `plan`, on the first forward tiling whose kernel does not spill."""
    source, binary = _compile(plan, render_forward)
    while spills(binary.resources_of("attngen_fwd")) and (leaner := next_tiling(plan, "fwd")):
        plan = leaner
        source, binary = _compile(plan, render_forward)
    return plan, source, binary


def build_backward(plan: KernelPlan) -> tuple[KernelPlan, KernelSource, Binary]:
    """The backward kernels of `plan`; a dK/dV or dQ kernel that spills steps down to its next leaner tiling
    until none does (or none is leaner: ptxas's report then says what it costs)."""
    source, binary = _compile(plan, render_backward)
    while spilled := [kernel for entry, kernel in BACKWARD_KERNELS.items() if spills(binary.resources_of(entry))]:
        steps = {kernel: step for kernel in spilled if (step := next_tiling(plan, kernel)) is not None}
        if not steps:
            break
        plan = replace(plan, **{kernel: step.tiles_of(kernel) for kernel, step in steps.items()})
        source, binary = _compile(plan, render_backward)
    return plan, source, binary


class Compiled:
    """The forward kernel of a plan (compiled now) and its backward kernels (compiled on first use: inference never
    pays for them). `plan` holds the tilings finally chosen."""

    def __init__(self, plan: KernelPlan):
        self.plan, self.forward_source, self.forward_binary = build_forward(plan)

    @functools.cached_property
    def _backward(self) -> tuple[KernelSource, Binary]:
        self.plan, source, binary = build_backward(self.plan)
        return source, binary

    @property
    def backward_source(self) -> KernelSource:
        return self._backward[0]

    @property
    def backward_binary(self) -> Binary:
        return self._backward[1]


def _compile(plan: KernelPlan, render) -> tuple[KernelSource, Binary]:
    source = render(plan)
    note = f"{plan.pattern!r} | {plan.dtype} head_dim {plan.head_dim} {plan.arch}"
    return source, compile_cached(source, note)


@functools.cache
def compiled(structure: Pattern, head_dim: int, dtype: str, arch: str, score_mods: tuple = ()) -> Compiled:
    """The kernels of a pattern structure (see `Pattern.structure`) with score modifications' structures (see
    `scoremod`): one compile per structure, never per data."""
    return Compiled(make_plan(structure, head_dim=head_dim, dtype=dtype, arch=arch, score_mods=score_mods))
