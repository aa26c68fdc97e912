"""Draw docs/img/transport_plan.png: a Sinkhorn plan between two small point clouds.

Left: the two clouds, each source point joined to the target points it sends mass to (line
opacity proportional to the mass). Right: the plan as a matrix, for a large and a small epsilon.

    python docs/make_ot_figure.py
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402, TID251 (a plotting script, not compute code)

from minivit import ops  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "img", "transport_plan.png")


def clouds(seed=0):
    rng = np.random.default_rng(seed)
    s = np.sort(rng.uniform(-np.pi, np.pi, 14))
    t = np.sort(rng.uniform(-np.pi, np.pi, 18))
    x = np.stack([np.cos(s), np.sin(s)], 1) * 0.7 + rng.normal(0, 0.04, (14, 2))  # a ring
    y = np.stack([np.cos(t) * 0.5, np.sin(t)], 1) * 0.6 + np.array([1.9, 0.0])  # an ellipse
    return x, y  # both ordered by angle, so a good plan is close to a diagonal band


def main():
    x, y = clouds()
    cost = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)  # (14, 18) squared distances
    cost /= np.median(cost)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1.5, 1, 1]})
    for k, eps in enumerate((0.2, 0.01)):
        plan, _ = ops.sinkhorn_forward(cost, epsilon=eps, n_iters=2000, tol=1e-9)
        if k == 1:
            ax = axes[0]
            for i in range(len(x)):
                for j in range(len(y)):
                    w = plan[i, j] / plan.max()
                    if w > 0.02:
                        ax.plot(*zip(x[i], y[j]), color="0.2", alpha=float(w), lw=1.2)
            ax.scatter(*x.T, s=28, c="tab:blue", label="source a (uniform)", zorder=3)
            ax.scatter(*y.T, s=28, c="tab:orange", label="target b (uniform)", zorder=3)
            ax.set_title(f"transport, epsilon = {eps}")
            ax.set_aspect("equal")
            ax.legend(loc="upper center", fontsize=7, frameon=False, ncol=2)
            ax.set_ylim(-0.85, 1.05)
            ax.set_xticks([])
            ax.set_yticks([])
        ax = axes[1 + k]
        ax.imshow(plan, cmap="magma_r", aspect="auto", interpolation="nearest")
        ax.set_title(f"plan (14 x 18), epsilon = {eps}")
        ax.set_xlabel("target j")
        ax.set_ylabel("source i")
    fig.tight_layout()
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    fig.savefig(OUT, dpi=80)
    print(f"wrote {OUT} ({os.path.getsize(OUT) / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
