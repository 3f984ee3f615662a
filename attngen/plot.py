"""Masks as pictures: `plot_mask` draws a dense bool mask the way attention-gym shows masks (queries down, keys
across, kept and dropped positions in two colours, a legend, axis labels, a title) and returns the matplotlib
Figure, saving it as an image when given a path. `Pattern.plot` is the usual way in.

matplotlib is optional (`pip install "attngen[plot]"`) and imported only when a picture is drawn. Nothing here
touches pyplot or matplotlib's global backend: the Figure is built directly and rendered with the Agg canvas, so a
user's own plotting setup (an interactive backend, rcParams) is left as it was.

This module imports nothing from attngen but its errors, so the pattern DSL can import it lazily without a cycle."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

from attngen.errors import InputError

KEPT = "#2166ac"  # blue
DROPPED = "#f0f0f0"  # light grey
INSTALL_HINT = 'drawing a mask needs matplotlib: pip install "attngen[plot]"'


def _figure_class() -> Any:
    """matplotlib's Figure class; InputError naming the extra to install when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401 - fails first when matplotlib is absent (or blocked)
        from matplotlib.figure import Figure
    except ImportError:
        raise InputError(INSTALL_HINT) from None
    return Figure


def _index(name: str, value: object, size: int) -> int:
    """`value` as an index into a dimension of `size` that broadcasts when it is 1 (a pattern that does not depend
    on the batch or the head has one mask for all of them)."""
    if type(value) is not int or value < 0:
        raise InputError(f"{name} must be a non-negative int, got {value!r}")
    if size != 1 and value >= size:
        raise InputError(f"{name} {value} is out of range: the mask has {size}")
    return 0 if size == 1 else value


def cells_of(mask: Any, cells: int) -> Any:
    """The fraction of kept positions per cell of a 2-D bool mask shrunk to at most `cells` cells a side (float
    tensor; 0 or 1 exactly where the mask is no larger than that)."""
    import torch

    Sq, Sk = mask.shape
    kept = mask.float()[None]
    return torch.nn.functional.adaptive_avg_pool2d(kept, (min(cells, Sq), min(cells, Sk)))[0]


def plot_mask(
    mask: Any,
    title: str,
    path: str | Path | None = None,
    *,
    cells: int = 256,
    batch: int = 0,
    head: int = 0,
    dpi: int = 100,
) -> Any:
    """Draw `mask` ([Sq, Sk], or [B, H, Sq, Sk] whose `batch`, `head` is drawn; a dimension of 1 broadcasts) and
    return the matplotlib Figure; save it to `path` when given (the format follows the suffix, e.g. .png).

    Masks larger than `cells` positions a side are shrunk to `cells` cells: a cell with some positions kept and
    some dropped is shaded in between and the legend says how many positions a cell covers."""
    Figure = _figure_class()
    if type(cells) is not int or cells < 1:
        raise InputError(f"cells must be a positive int, got {cells!r}")
    if mask.dim() == 4:
        mask = mask[_index("batch", batch, mask.shape[0]), _index("head", head, mask.shape[1])]
    elif mask.dim() != 2:
        raise InputError(f"a mask to draw is [Sq, Sk] or [B, H, Sq, Sk], got shape {tuple(mask.shape)}")
    Sq, Sk = mask.shape
    if Sq == 0 or Sk == 0:
        raise InputError(f"an empty mask ({Sq} x {Sk}) has nothing to draw")
    shown = cells_of(mask.detach().cpu().bool(), cells)

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LinearSegmentedColormap
    from matplotlib.patches import Patch

    # The axes keep the mask's shape (a position is a square) unless it is very wide or tall; the figure's height
    # follows, so a wide mask has no empty band above and below it.
    ratio = min(max(Sq / Sk, 0.25), 1.5)
    fig = Figure(figsize=(5.2, 1.8 + 4.4 * ratio), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)  # renders and saves without pyplot or the global backend
    ax = fig.add_subplot()
    colours = LinearSegmentedColormap.from_list("attngen_mask", [DROPPED, KEPT])
    ax.imshow(
        shown.numpy(),
        cmap=colours,
        vmin=0.0,
        vmax=1.0,
        interpolation="nearest",
        extent=(0, Sk, Sq, 0),  # positions, not cells, on the axes; query 0 at the top
        aspect="equal" if ratio == Sq / Sk else "auto",
    )
    ax.set_xlabel(f"key position k (Sk = {Sk})")
    ax.set_ylabel(f"query position q (Sq = {Sq})")
    ax.set_title("\n".join(textwrap.wrap(title, 56)) or title, fontsize=10)
    handles = [Patch(facecolor=KEPT, label="kept"), Patch(facecolor=DROPPED, edgecolor="#999999", label="dropped")]
    partial = bool(((shown > 0) & (shown < 1)).any())
    if partial:
        rows, cols = math.ceil(Sq / shown.shape[0]), math.ceil(Sk / shown.shape[1])
        handles.append(Patch(facecolor=colours(0.5), label=f"partly kept (cells of {rows} x {cols})"))
    kept = f"{float(mask.float().mean()):.1%} of the positions kept"
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False, title=kept)
    if path is not None:
        fig.savefig(path, dpi=dpi)  # the figure's own size, whatever savefig.dpi says
    return fig


__all__ = ["DROPPED", "INSTALL_HINT", "KEPT", "cells_of", "plot_mask"]
