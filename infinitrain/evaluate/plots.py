"""PNG figures for the evaluations (matplotlib from the ``plots`` extra; without it the caller prints a one-line
note)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

MISSING = "matplotlib is not installed (pip install 'infinitrain[plots]'): no PNG written"


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmap(path: Path, values: Sequence[Sequence[float]], *, rows: Sequence[str], cols: Sequence[str],
            title: str, xlabel: str, ylabel: str, label: str = "accuracy, %", cmap: str = "RdYlGn") -> Path | None:
    """values[r][c] in [0, 1] as a red-to-green grid with the percentage in each cell (needle-in-a-haystack style);
    the colour bar is in percent too."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(cols), 1.0 + 0.6 * len(rows)))
    im = ax.imshow(values, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows)
    for r, row in enumerate(values):
        for c, v in enumerate(row):
            ax.text(c, r, f"{100 * v:.0f}", ha="center", va="center", fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    bar = fig.colorbar(im, ax=ax, label=label)
    bar.set_ticks([0.0, 0.25, 0.5, 0.75, 1.0], labels=["0", "25", "50", "75", "100"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def curves(path: Path, series: dict[str, tuple[Sequence[float], Sequence[float]]], *, title: str, xlabel: str,
           ylabel: str, logy: bool = False) -> Path | None:
    """One line per named (x, y) series."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (x, y) in series.items():
        ax.plot(x, y, marker="o", markersize=3, label=name)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
