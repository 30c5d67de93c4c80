"""Figure of a placement: affinity matrices ordered by worker, and the expert -> worker map.

Glossary: block  the square of an affinity matrix where both experts sit on one worker; a good
placement puts most mass inside blocks. matplotlib is imported lazily with the Agg backend.
"""
from __future__ import annotations

import numpy as np

from .placement import Placement
from .problem import AffinityProblem


def plot_placement(problem: AffinityProblem, placement: Placement, path: str, max_pairs: int = 3) -> None:
    """Write a PNG with up to ``max_pairs`` reordered affinity matrices and the placement map."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m_LEG = placement.membership_LEG()
    prim_LE = m_LEG.argmax(-1)                         # first worker of each expert
    pairs = list(range(min(max_pairs, problem.aff_PEE.shape[0])))
    fig, axes = plt.subplots(1, len(pairs) + 1, figsize=(4 * (len(pairs) + 1), 4))
    G = placement.num_workers
    for ax, l in zip(axes, pairs):
        r, c = np.argsort(prim_LE[l], kind="stable"), np.argsort(prim_LE[l + 1], kind="stable")
        a = problem.aff_PEE[l][np.ix_(r, c)]
        ax.imshow(np.log1p(a / max(a.mean(), 1e-12)), cmap="viridis", interpolation="nearest")
        for cut in np.flatnonzero(np.diff(prim_LE[l][r])) + 0.5:
            ax.axhline(cut, color="w", lw=0.5)
        for cut in np.flatnonzero(np.diff(prim_LE[l + 1][c])) + 0.5:
            ax.axvline(cut, color="w", lw=0.5)
        ax.set_title(f"affinity layer {l}->{l + 1} by worker")
        ax.set_xlabel(f"layer {l + 1} experts")
        ax.set_ylabel(f"layer {l} experts")
    ax = axes[-1]
    ax.imshow(prim_LE, aspect="auto", cmap="tab20" if G <= 20 else "nipy_spectral", interpolation="nearest")
    ax.set_title(f"placement: worker of each expert ({G} workers)")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(prim_LE.shape[0]) if prim_LE.shape[0] <= 16 else ax.get_yticks())
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
