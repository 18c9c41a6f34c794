"""One training step of the glyph CNN with our loss and with PML's, side by side.

The same ``GlyphCNN`` (same seed), the same batches, Adam on the model and ``W``; the
two are stepped alternately and each step is timed (zero_grad, forward, loss,
backward, optimizer step). Prints the median ms per step of each and PML / ours: the
loss's share of a real training step, where the model's convolutions dominate.

    PYTHONPATH=. python3 benchmarks/glyph_step.py --steps 60
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import pytorch_metric_learning.losses as pml
import torch
from tqdm.auto import tqdm

import pml_margins.losses as ours
from pml_margins.bench.glyphs import load_glyph_split
from pml_margins.bench.models import GlyphCNN

#: the glyph benchmark's settings for these two losses (margins in radians here)
LOSSES = {
    "arcface": (
        lambda c, d: ours.ArcFaceLoss(c, d, margin=0.3, scale=30.0),
        lambda c, d: pml.ArcFaceLoss(c, d, margin=math.degrees(0.3), scale=30),
    ),
    "cosface": (
        lambda c, d: ours.CosFaceLoss(c, d, margin=0.2, scale=30.0),
        lambda c, d: pml.CosFaceLoss(c, d, margin=0.2, scale=30),
    ),
}


def step_times(
    name: str, images: torch.Tensor, labels: torch.Tensor, classes: int, args: argparse.Namespace
) -> dict[str, list[float]]:
    """Seconds per step of ours and PML's, alternated, after ``args.warmup`` steps."""
    runs = {}
    for impl, make in zip(("ours", "pml"), LOSSES[name], strict=True):
        torch.manual_seed(0)
        model, loss = GlyphCNN(args.embedding), make(classes, args.embedding)
        if runs:  # the same W on both sides
            with torch.no_grad():
                loss.W.copy_(runs["ours"][1].W)
        opt = torch.optim.Adam([*model.parameters(), *loss.parameters()], lr=1e-3)
        runs[impl] = (model, loss, opt)
    times: dict[str, list[float]] = {impl: [] for impl in runs}
    g = torch.Generator().manual_seed(0)
    for step in tqdm(range(args.warmup + args.steps), desc=name, leave=False):
        idx = torch.randint(0, len(labels), (args.batch,), generator=g)
        xb, yb = images[idx], labels[idx]
        order = list(runs.items())  # each side first every other step: neither always
        for impl, (model, loss, opt) in order[::-1] if step % 2 else order:  # follows the other
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss(model(xb), yb).backward()
            opt.step()
            if step >= args.warmup:
                times[impl].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--losses", default="arcface,cosface", help="comma-separated")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--embedding", type=int, default=128)
    parser.add_argument("--size", type=int, default=32, help="glyph side in pixels")
    parser.add_argument("--max-classes", type=int, default=None, help="fewer training classes")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_glyph_split(size=args.size, max_classes=args.max_classes)
    images, labels = data.train.tensors
    classes = data.num_train_classes
    print(
        f"glyph step: {len(labels)} training images, {classes} classes, B={args.batch}, "
        f"D={args.embedding}, {args.threads} threads, torch {torch.__version__}"
    )
    print(f"{'loss':>8} {'ours ms':>8} {'PML ms':>8} {'PML/ours':>8}")
    for name in args.losses.split(","):
        times = step_times(name, images, labels, classes, args)
        med = {impl: statistics.median(t) * 1e3 for impl, t in times.items()}
        print(f"{name:>8} {med['ours']:8.1f} {med['pml']:8.1f} {med['pml'] / med['ours']:8.2f}")


if __name__ == "__main__":
    main()
