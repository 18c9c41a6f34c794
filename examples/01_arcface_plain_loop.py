"""ArcFace in a plain PyTorch loop: class weights in the optimizer, predictions from get_logits.

The loss owns the class weights ``W`` (embedding_size x num_classes), so they are
*not* in ``model.parameters()``: give them to the optimizer yourself (here in their
own parameter group with their own learning rate), or they never train.

Run:  python examples/01_arcface_plain_loop.py [--tiny]
"""

from __future__ import annotations

import argparse
import math

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from pml_margins.losses import ArcFaceLoss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few steps (CI smoke test)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.3, random_state=0, stratify=y
    )

    embedding_size, num_classes = 32, 10
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, embedding_size))
    # margin in RADIANS (PML's ArcFaceLoss takes degrees): 0.3 rad = 17.2 degrees
    loss_fn = ArcFaceLoss(num_classes, embedding_size, margin=0.3, scale=16.0)
    optimizer = torch.optim.Adam(
        [
            {"params": model.parameters(), "lr": 1e-3},
            {"params": loss_fn.parameters(), "lr": 1e-2},  # W: the class weights
        ]
    )
    print(f"loss: {loss_fn}")
    print(f"margin = {loss_fn.margin} rad = {math.degrees(loss_fn.margin):.1f} degrees")

    epochs = 2 if args.tiny else 30
    for epoch in range(epochs):
        model.train()
        for batch in torch.randperm(len(x_train)).split(128):
            loss = loss_fn(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if epoch % 10 == 0 or epoch == epochs - 1:
            print(f"epoch {epoch + 1:2d}  loss {loss.item():.3f}")

    model.eval()
    with torch.no_grad():
        # get_logits: s * cos(theta_j), no margin -- the classifier to use at test time
        logits = loss_fn.get_logits(model(x_test))
    accuracy = (logits.argmax(dim=1) == y_test).float().mean().item()
    print(f"test accuracy (argmax of get_logits): {100 * accuracy:.1f}%")


if __name__ == "__main__":
    main()
