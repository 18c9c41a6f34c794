"""Pair mining: CircleLoss with PML's MultiSimilarityMiner and CrossBatchMemory.

CircleLoss is pair-based (no class weights), so it composes with PML's miners and
with ``CrossBatchMemory``, which keeps the last ``memory_size`` embeddings and mines
pairs between the batch and that memory: more (and harder) pairs per step than one
batch holds. Trained on digits 0-4, evaluated by retrieval among digits 5-9 (classes
never seen in training).

Run:  python examples/02_circle_pair_mining.py [--tiny]
"""

from __future__ import annotations

import argparse

import torch
from pytorch_metric_learning.losses import CrossBatchMemory
from pytorch_metric_learning.miners import MultiSimilarityMiner
from sklearn.datasets import load_digits
from torch import nn

from pml_margins.evaluation import RetrievalAccuracyCalculator
from pml_margins.losses import CircleLoss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few steps (CI smoke test)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    seen = y < 5  # train on 0-4, retrieve among 5-9
    x_train, y_train, x_test, y_test = x[seen], y[seen], x[~seen], y[~seen]

    embedding_size = 32
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, embedding_size))
    # m: relaxation of the similarity targets; gamma: scale (the paper's retrieval setting)
    circle = CircleLoss(m=0.4, gamma=80)
    miner = MultiSimilarityMiner(epsilon=0.1)
    loss_fn = CrossBatchMemory(circle, embedding_size, memory_size=512, miner=miner)
    # CircleLoss has no parameters: only the model is optimized
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    epochs = 2 if args.tiny else 10
    for epoch in range(epochs):
        for batch in torch.randperm(len(x_train)).split(64):
            loss = loss_fn(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        # the miner keeps only the hard pairs: fewer and fewer as the embedding improves
        print(f"epoch {epoch + 1:2d}  loss {loss.item():.3f}  pairs {miner.num_pos_pairs}")

    with torch.no_grad():
        embeddings = model.eval()(x_test)
    keys = ("recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "r_precision")
    calculator = RetrievalAccuracyCalculator(include=keys, recall_ks=(1, 2, 4, 8))
    metrics = calculator.get_accuracy(embeddings, y_test)
    print("retrieval among unseen digits 5-9:")
    for key in keys:
        print(f"  {key:12s} {100 * metrics[key]:.1f}")


if __name__ == "__main__":
    main()
