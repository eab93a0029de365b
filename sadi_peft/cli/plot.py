"""``sadi-peft plot``: a saved adapter's calibration scores as a layer x unit map (the paper's Fig. 3)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from . import EXIT_FAILED, EXIT_OK


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "plot", help="layer x unit map of an adapter's calibration scores",
        description="Draw the per-unit calibration scores stored in a saved SADI adapter (sadi_scores) as a "
        "layer x unit heatmap, with the kept units (sadi_mask) outlined. Reads only the adapter folder.",
    )
    parser.add_argument("adapter", type=Path, help="saved SADI adapter folder")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default: <adapter>/scores.png)")
    parser.set_defaults(func=run)


def _layer_index(key: str) -> int:
    match = re.search(r"\.(\d+)\.", key)
    return int(match.group(1)) if match else -1


def run(args: argparse.Namespace) -> int:
    from safetensors.torch import load_file

    weights = args.adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} does not exist: is {args.adapter} a saved SADI adapter?")
    tensors = load_file(str(weights))
    scores = {k.rsplit(".sadi_scores", 1)[0]: v.float() for k, v in tensors.items() if k.endswith("sadi_scores")}
    masks = {k.rsplit(".sadi_mask", 1)[0]: v for k, v in tensors.items() if k.endswith("sadi_mask")}
    if not scores:
        raise ValueError(f"{weights} holds no sadi_scores: not a SADI adapter, or saved before calibration")
    names = sorted(scores, key=_layer_index)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib)")
        return EXIT_FAILED
    import torch

    grid = torch.stack([scores[n] for n in names]).numpy()
    fig, ax = plt.subplots(figsize=(min(14, 2 + grid.shape[1] * 0.35), 1 + len(names) * 0.22))
    limit = float(abs(grid).max()) or 1.0
    image = ax.imshow(grid, cmap="coolwarm", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
    for row, name in enumerate(names):
        for unit in torch.nonzero(masks[name]).flatten().tolist():
            ax.add_patch(plt.Rectangle((unit - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.5))
    ax.set_yticks(range(len(names)), [str(_layer_index(n)) for n in names])
    ax.set_ylabel("layer")
    ax.set_xlabel("unit")
    ax.set_title("SADI calibration scores (mean positive - negative); kept units outlined")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    out = args.out or args.adapter / "scores.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"wrote {out}")
    return EXIT_OK
