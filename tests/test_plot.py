"""Masks as pictures: `Pattern.plot` returns a matplotlib Figure titled with the pattern, queries down and keys
across, whose rendered pixels are the mask's colours position by position; it saves a PNG of the figure's size,
shrinks large masks to cells (shading partly kept ones), draws a chosen batch and head, leaves pyplot alone, and
without matplotlib raises InputError naming the extra to install."""

import sys

import numpy as np
import pytest
import torch

import attngen as ag
from attngen import InputError
from attngen import plot as plot_module

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.colors import to_rgb  # noqa: E402 - after the skip: matplotlib is an optional extra


def _rendered(fig) -> np.ndarray:
    """The figure as RGB floats [height, width, 3], row 0 at the top."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3] / 255.0


def _pixel_colours(fig, Sq, Sk) -> np.ndarray:
    """The rendered colour at the centre of every (query, key) position: [Sq, Sk, 3]."""
    image = _rendered(fig)
    ax = fig.axes[0]
    q, k = np.meshgrid(np.arange(Sq) + 0.5, np.arange(Sk) + 0.5, indexing="ij")
    x, y = ax.transData.transform(np.stack([k.ravel(), q.ravel()], axis=1)).T  # display: origin at the bottom left
    rows = (image.shape[0] - y).astype(int)
    cols = x.astype(int)
    return image[rows, cols].reshape(Sq, Sk, 3)


def test_plot_is_a_figure_of_the_mask():
    pat = ag.causal() & ag.sliding_window(8) | ag.global_tokens(3)
    Sq, Sk = 24, 40
    fig = pat.plot(Sq, Sk)
    assert isinstance(fig, matplotlib.figure.Figure)
    (ax,) = fig.axes
    assert ax.get_title() == repr(pat)
    assert ax.get_xlabel() == f"key position k (Sk = {Sk})"
    assert ax.get_ylabel() == f"query position q (Sq = {Sq})"
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["kept", "dropped"]  # no cell covers several positions
    mask = pat.mask(Sq, Sk)[0, 0]
    assert legend.get_title().get_text() == f"{mask.float().mean().item():.1%} of the positions kept"

    (image,) = ax.images
    np.testing.assert_array_equal(np.asarray(image.get_array()), mask.float().numpy())
    assert ax.get_ylim() == (Sq, 0) and ax.get_xlim() == (0, Sk)  # query 0 at the top, keys left to right

    colours = _pixel_colours(fig, Sq, Sk)
    expected = np.where(mask.numpy()[..., None], to_rgb(plot_module.KEPT), to_rgb(plot_module.DROPPED))
    np.testing.assert_allclose(colours, expected, atol=2 / 255)


def test_plot_saves_a_png_of_the_figure(tmp_path):
    path = tmp_path / "mask.png"
    fig = ag.causal().plot(64, 64, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = (fig.get_size_inches() * fig.dpi).round().astype(int)
    saved = matplotlib.image.imread(path)
    assert saved.shape[:2] == (height, width)
    assert 10_000 < path.stat().st_size < 100_000


def test_plot_shrinks_large_masks_to_cells():
    pat = ag.causal()
    fig = pat.plot(1000, 1000, cells=100)
    (ax,) = fig.axes
    shown = np.asarray(ax.images[0].get_array())
    assert shown.shape == (100, 100)
    mask = pat.mask(1000, 1000)[0, 0].float()
    expected = mask.view(100, 10, 100, 10).mean(dim=(1, 3)).numpy()
    np.testing.assert_allclose(shown, expected)
    np.testing.assert_allclose(np.diag(shown), 0.55)  # a diagonal cell of 10 x 10 keeps 55 positions
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts == ["kept", "dropped", "partly kept (cells of 10 x 10)"]
    assert ax.get_xlim() == (0, 1000)  # the axes still count positions


def test_plot_draws_the_chosen_batch_and_head():
    grids = torch.stack([torch.eye(4, dtype=torch.bool), torch.ones(4, 4, dtype=torch.bool).tril()])
    pat = ag.block_layout(grids, 8)  # one layout per head
    for head in (0, 1):
        shown = np.asarray(pat.plot(32, 32, head=head).axes[0].images[0].get_array())
        np.testing.assert_array_equal(shown, pat.mask(32, 32)[0, head].float().numpy())
    with pytest.raises(InputError, match="head 2 is out of range"):
        pat.plot(32, 32, head=2)

    ids = torch.tensor([[0] * 8 + [1] * 8, [0] * 4 + [1] * 12])
    docs = ag.documents() & ag.causal()
    shown = np.asarray(docs.plot(16, 16, batch=1, head=5, document_ids=ids).axes[0].images[0].get_array())
    np.testing.assert_array_equal(shown, docs.mask(16, 16, document_ids=ids)[1, 0].float().numpy())  # heads: one
    with pytest.raises(InputError, match="batch must be a non-negative int"):
        docs.plot(16, 16, batch=-1, document_ids=ids)


@pytest.mark.parametrize(("kwargs", "message"), [({"cells": 0}, "cells must be"), ({"Sq": 0}, "Sq")])
def test_plot_refuses_bad_sizes(kwargs, message):
    with pytest.raises(InputError, match=message):
        ag.causal().plot(**{"Sq": 8, "Sk": 8, **kwargs})


def test_plot_leaves_pyplot_alone(tmp_path):
    had_pyplot = "matplotlib.pyplot" in sys.modules
    backend = dict.__getitem__(matplotlib.rcParams, "backend")  # as set, without resolving it (which loads pyplot)
    ag.causal().plot(16, 16, tmp_path / "mask.png")  # rendering and saving too
    assert had_pyplot or "matplotlib.pyplot" not in sys.modules
    assert dict.__getitem__(matplotlib.rcParams, "backend") == backend


def test_without_matplotlib_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(InputError, match=r'pip install "attngen\[plot\]"'):
        ag.causal().plot(16, 16)
