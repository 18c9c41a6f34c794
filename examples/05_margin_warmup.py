"""A margin warm-up (the seed articles' "dynamic margin") with MarginScheduler.

A randomly initialized network cannot meet a large angular margin at once; ArcFace
then learns slowly or collapses. Starting from m = 0 and raising it to the target
over the first epochs avoids that. ``MarginScheduler`` sets ``loss.margin`` on each
``step()`` (after ``optimizer.step()``), like ``torch.optim.lr_scheduler``, and
saves/restores with ``state_dict()`` / ``load_state_dict()``.

Run:  python examples/05_margin_warmup.py [--tiny]
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from pml_margins.losses import ArcFaceLoss
from pml_margins.schedules import MarginScheduler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few steps (CI smoke test)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.3, random_state=0, stratify=y
    )
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    loss_fn = ArcFaceLoss(10, 32, margin=0.5, scale=16.0)
    optimizer = torch.optim.Adam(
        [{"params": model.parameters(), "lr": 1e-3}, {"params": loss_fn.parameters(), "lr": 1e-2}]
    )

    epochs = 3 if args.tiny else 30
    steps_per_epoch = -(-len(x_train) // 128)
    warmup_epochs = max(1, epochs // 3)
    # 0 -> 0.5 rad (cosine ramp) over the first third of training, then held at 0.5
    scheduler = MarginScheduler(
        loss_fn, start=0.0, end=0.5, total_steps=warmup_epochs * steps_per_epoch, mode="cosine"
    )
    for epoch in range(epochs):
        for batch in torch.randperm(len(x_train)).split(128):
            loss = loss_fn(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        print(f"epoch {epoch + 1:2d}  margin {loss_fn.margin:.3f} rad  loss {loss.item():.3f}")

    # the schedule is part of the training state: checkpoint it with the optimizer
    state = scheduler.state_dict()
    resumed = MarginScheduler(loss_fn, start=0.0, end=0.5, total_steps=1)
    resumed.load_state_dict(state)
    print(f"resumed scheduler at step {resumed.last_step}, margin {loss_fn.margin:.3f} rad")

    with torch.no_grad():
        accuracy = (loss_fn.get_logits(model(x_test)).argmax(1) == y_test).float().mean()
    print(f"test accuracy: {100 * accuracy.item():.1f}%")


if __name__ == "__main__":
    main()
