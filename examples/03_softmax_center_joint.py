"""Joint supervision: softmax + lambda * CenterLoss with PML's MultipleLosses (Wen et al., 2016).

Softmax alone makes features *separable*; the centre loss pulls each feature to its
class centre and makes them *discriminative* (compact classes). Both terms share
the embeddings: ``MultipleLosses([SoftmaxLoss, CenterLoss], weights=[1, lambda])``.
The class weights of the softmax live in the loss, so ``loss_fn.parameters()`` goes
to the optimizer; with ``update="ema"`` the centres are updated inside the loss
(the paper's rule, rate ``alpha``) and are not parameters.

Prints the intra-/inter-class distance ratio of held-out features for lambda = 0
and lambda > 0: the centre loss shrinks it.

Run:  python examples/03_softmax_center_joint.py [--tiny]
"""

from __future__ import annotations

import argparse

import torch
from pytorch_metric_learning.losses import MultipleLosses
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from pml_margins.evaluation import RetrievalAccuracyCalculator
from pml_margins.losses import CenterLoss, SoftmaxLoss


def compactness(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean distance to the own class mean / mean distance between class means."""
    classes = labels.unique()
    means = torch.stack([features[labels == c].mean(0) for c in classes])
    intra = torch.stack(
        [(features[labels == c] - means[i]).norm(dim=1).mean() for i, c in enumerate(classes)]
    ).mean()
    inter = torch.pdist(means).mean()
    return (intra / inter).item()


def train(lam: float, x: torch.Tensor, y: torch.Tensor, epochs: int) -> nn.Module:
    torch.manual_seed(0)
    embedding_size = 16
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, embedding_size))
    loss_fn = MultipleLosses(
        [SoftmaxLoss(10, embedding_size), CenterLoss(10, embedding_size, alpha=0.5, update="ema")],
        weights=[1.0, lam],
    )
    optimizer = torch.optim.Adam(
        [{"params": model.parameters(), "lr": 1e-3}, {"params": loss_fn.parameters(), "lr": 1e-2}]
    )
    for _ in range(epochs):
        for batch in torch.randperm(len(x)).split(128):
            loss = loss_fn(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few steps (CI smoke test)")
    parser.add_argument("--lam", type=float, default=0.1, help="weight of the centre loss")
    args = parser.parse_args()
    torch.set_num_threads(1)

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.3, random_state=0, stratify=y
    )
    epochs = 2 if args.tiny else 30
    calculator = RetrievalAccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r"), recall_ks=(1,)
    )
    print("| lambda | intra/inter distance | P@1 | MAP@R |")
    print("|---|---|---|---|")
    for lam in (0.0, args.lam):
        model = train(lam, x_train, y_train, epochs)
        with torch.no_grad():
            features = model(x_test)
        metrics = calculator.get_accuracy(features, y_test)
        print(
            f"| {lam} | {compactness(features, y_test):.3f} | "
            f"{100 * metrics['precision_at_1']:.1f} | "
            f"{100 * metrics['mean_average_precision_at_r']:.1f} |"
        )


if __name__ == "__main__":
    main()
