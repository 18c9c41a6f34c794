"""Evaluate saved embeddings with RetrievalAccuracyCalculator and print a Recall@K table.

Embeddings come from a file: a ``.pt`` dict ``{"embeddings": (N, D), "labels": (N,)}``
or an ``.npz`` with the same keys. Without ``--embeddings`` the example writes two
such files itself (raw pixels of the digits and a random projection of them) so that
it runs anywhere. Two protocols:

* every item queries all the others (``reference=None``: the query itself is
  excluded), the CUB/SOP protocol;
* a query set against a separate gallery (``ref_includes_query=False``).

Run:  python examples/04_evaluate_saved_embeddings.py [--embeddings FILE ...] [--tiny]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import torch
from sklearn.datasets import load_digits

from pml_margins.evaluation import RetrievalAccuracyCalculator

KS = (1, 2, 4, 8)


def load(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    if path.endswith(".npz"):
        data = np.load(path)
        return torch.from_numpy(data["embeddings"]), torch.from_numpy(data["labels"])
    data = torch.load(path, map_location="cpu", weights_only=True)
    return data["embeddings"], data["labels"]


def write_demo_files(folder: str, tiny: bool) -> list[str]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)
    y = torch.tensor(digits.target)
    if tiny:
        x, y = x[:300], y[:300]
    projection = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    paths = [os.path.join(folder, "pixels.pt"), os.path.join(folder, "random16.npz")]
    torch.save({"embeddings": x, "labels": y}, paths[0])
    np.savez(paths[1], embeddings=(x @ projection).numpy(), labels=y.numpy())
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embeddings", nargs="*", help=".pt or .npz files")
    parser.add_argument("--tiny", action="store_true", help="fewer items (CI smoke test)")
    args = parser.parse_args()

    keys = (*(f"recall_at_{k}" for k in KS), "precision_at_1", "r_precision")
    keys = (*keys, "mean_average_precision_at_r")
    # include: only the retrieval metrics (the default adds clustering: NMI, AMI)
    calculator = RetrievalAccuracyCalculator(include=keys, recall_ks=KS)
    with tempfile.TemporaryDirectory() as folder:
        paths = args.embeddings or write_demo_files(folder, args.tiny)
        header = ["embeddings", *(f"R@{k}" for k in KS), "P@1", "R-Prec", "MAP@R"]
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for path in paths:
            embeddings, labels = load(path)
            m = calculator.get_accuracy(embeddings, labels)  # each item queries the rest
            cells = [f"{100 * m[k]:.1f}" for k in keys]
            print(f"| {os.path.basename(path)} | " + " | ".join(cells) + " |")

        # query/gallery protocol: first half queries, second half gallery
        embeddings, labels = load(paths[0])
        half = len(labels) // 2
        m = calculator.get_accuracy(
            embeddings[:half], labels[:half], embeddings[half:], labels[half:], False
        )
        print(
            f"\nquery/gallery split of {os.path.basename(paths[0])}: "
            f"R@1 {100 * m['recall_at_1']:.1f}, MAP@R {100 * m['mean_average_precision_at_r']:.1f}"
        )


if __name__ == "__main__":
    main()
