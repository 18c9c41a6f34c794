"""One training run for one loss, and embedding a dataset with the trained model.

The class weights ``W`` (and biases, centres) of a loss live in the loss, not the
model, so they get their own optimizer parameter group: forgetting them is the
classic bug that leaves ``W`` at its random initialization.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pml_margins.bench.registry import LossSetup
from pml_margins.terminal import bars_reach_a_terminal

__all__ = [
    "AMP_DTYPES",
    "TrainConfig",
    "TrainResult",
    "autocast",
    "dataset_labels",
    "embed",
    "random_shift",
    "resolve_device",
    "seed_everything",
    "torch_threads",
    "train_embedding",
]

#: ``--amp`` choices.
AMP_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    """Optimization settings for :func:`train_embedding`.

    Attributes:
        epochs: passes over the training set.
        batch_size: samples per step.
        lr: Adam learning rate of the model (cosine-annealed to 0, as ``loss_lr``: one
            schedule over both parameter groups).
        loss_lr: Adam learning rate of the loss's own parameters (class weights, centres),
            cosine-annealed to 0.
        weight_decay: on the model parameters only.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        amp: ``None``, ``"bf16"`` or ``"fp16"`` (autocast; fp16 adds a gradient scaler).
        seed: seeds Python, NumPy, torch and the data order.
        num_workers: DataLoader workers (0 for in-memory tensors).
        progress: report progress: a tqdm bar when stdout is a terminal, otherwise
            one line per finished epoch (logs stay readable).
        shift: translate each training image by a random ``-shift..shift`` pixels
            in each direction (zero fill); 0 for none.
    """

    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    loss_lr: float = 1e-2
    weight_decay: float = 1e-4
    device: str = "cpu"
    amp: str | None = None
    seed: int = 0
    num_workers: int = 0
    progress: bool = True
    shift: int = 0


@dataclass
class TrainResult:
    """What a run reports: wall time of the training loop, steps, images, loss per epoch."""

    seconds: float
    steps: int
    epoch_losses: list[float] = field(default_factory=list)
    images: int = 0
    forward_dtype: str = ""  # the model output's dtype in training (autocast shows here)

    @property
    def images_per_second(self) -> float:
        """Training throughput: images through forward and backward per second of the loop."""
        return self.images / self.seconds if self.seconds > 0 else float("nan")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 -- PML samplers/miners draw from the global state
    torch.manual_seed(seed)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)`` (``None``: unchanged), then restore."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite during training (a learning rate or scale too high)."""


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``, with a clear error when CUDA is asked for but missing."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name} requested but torch.cuda.is_available() is False")
    return device


def autocast(device: torch.device, amp: str | None) -> contextlib.AbstractContextManager[None]:
    """``torch.autocast`` for ``amp`` on ``device``, or a no-op context when ``amp`` is None."""
    if amp is None:
        return contextlib.nullcontext()
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)} or None, got {amp!r}")
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def dataset_labels(dataset: Dataset) -> list[int]:
    """The (remapped) labels of a ``TensorDataset`` or PML image dataset; loads no image."""
    tensors = getattr(dataset, "tensors", None)
    if tensors is not None:
        return [int(v) for v in tensors[1]]
    labels = dataset.labels  # type: ignore[attr-defined]
    remap = getattr(dataset, "target_transform", None)
    return [int(remap(v)) if remap else int(v) for v in labels]


def _loader(dataset: Dataset, setup: LossSetup, cfg: TrainConfig) -> DataLoader:
    generator = torch.Generator().manual_seed(cfg.seed)
    kwargs = {"num_workers": cfg.num_workers, "pin_memory": cfg.device.startswith("cuda")}
    if setup.miner is not None:
        # pair losses need positives in every batch: m samples per class when possible
        from pytorch_metric_learning.samplers import MPerClassSampler

        labels = dataset_labels(dataset)
        # two classes at least (one class per batch: no negative pair, a pair loss of 0
        # every step): 4 per class from a batch of 8, 2 in a batch of 4 or 6
        m = 4 if cfg.batch_size >= 8 else 2
        # (a set smaller than one batch: the plain loader below, empty, and its error)
        fits = len(labels) >= cfg.batch_size and len(set(labels)) * m >= cfg.batch_size
        if cfg.batch_size % m == 0 and cfg.batch_size >= 2 * m and fits:
            sampler = MPerClassSampler(
                labels, m, batch_size=cfg.batch_size, length_before_new_iter=len(labels)
            )
            return DataLoader(dataset, cfg.batch_size, sampler=sampler, drop_last=True, **kwargs)
    return DataLoader(
        dataset, cfg.batch_size, shuffle=True, drop_last=True, generator=generator, **kwargs
    )


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image of ``(B, C, H, W)`` by its own offset in ``-max_shift..max_shift``.

    Pixels moved in from outside are 0 (the glyphs' background). Offsets are drawn
    on the CPU from ``generator`` so that runs are reproducible on any device.
    """
    if max_shift == 0:
        return images
    b, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (max_shift,) * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator).to(images.device)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    channel = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


class _Progress:
    """A tqdm bar on a terminal; otherwise one printed line per finished epoch."""

    def __init__(self, enabled: bool, total: int, label: str, epochs: int) -> None:
        self.label, self.epochs = label, epochs
        self.lines = enabled and not bars_reach_a_terminal()
        self.bar = tqdm(total=total, desc=label, disable=not enabled or self.lines, unit="step")

    def step(self) -> None:
        self.bar.update()

    def epoch(self, epoch: int, loss: float, images_per_second: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.3f}")
        if self.lines:
            print(
                f"{self.label}: epoch {epoch}/{self.epochs} loss {loss:.4f} "
                f"({images_per_second:.0f} images/s)",
                flush=True,
            )

    def close(self) -> None:
        self.bar.close()


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def train_embedding(
    model: nn.Module, setup: LossSetup, dataset: Dataset, cfg: TrainConfig
) -> TrainResult:
    """Train ``model`` with ``setup.loss`` (and ``setup.miner``) on ``dataset``, in place.

    The loss is computed in float32 even under autocast (margins on bf16 cosines lose
    most of their digits). A non-finite loss stops the run with :class:`TrainingDiverged`
    (a ``RuntimeError``).
    """
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    model.to(device).train()
    setup.loss.to(device).train()
    loader = _loader(dataset, setup, cfg)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(
            f"the training set has {len(dataset)} samples, fewer than one batch of "
            f"{cfg.batch_size}; lower --batch-size"
        )
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    if cfg.batch_size < 2 and any(isinstance(m, norms) for m in model.modules()):
        raise ValueError(
            f"--batch-size {cfg.batch_size} cannot train this model: its batch-norm layers "
            "need at least 2 rows per batch (one image's 1 x 1 feature map has no batch "
            "statistics); use --batch-size >= 2"
        )
    groups = [{"params": _trainable(model), "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    loss_params = _trainable(setup.loss)
    if loss_params:
        groups.append({"params": loss_params, "lr": cfg.loss_lr, "weight_decay": 0.0})
    optimizer = torch.optim.Adam(groups)
    total = cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")

    schedule = setup.schedule(setup.loss, total) if setup.schedule is not None else None
    shifts = torch.Generator().manual_seed(cfg.seed + 1)

    result = TrainResult(seconds=0.0, steps=0)
    progress = _Progress(cfg.progress, total, setup.label, cfg.epochs)
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        running, count = 0.0, 0
        for inputs, labels in loader:
            inputs, labels = inputs.to(device, non_blocking=True), labels.to(device)
            inputs = random_shift(inputs, cfg.shift, shifts)
            with autocast(device, cfg.amp):
                embeddings = model(inputs)
            result.forward_dtype = str(embeddings.dtype)
            embeddings = embeddings.float()
            # NaN/Inf, or rows whose squared norm overflows (the losses refuse them)
            if not bool(torch.isfinite(embeddings.square().sum(dim=1)).all()):
                raise TrainingDiverged(
                    f"{setup.label}: the model's embeddings became NaN, Inf or too large "
                    f"(a squared norm beyond float32) at step {result.steps}; lower the "
                    "learning rate"
                )
            indices = setup.miner(embeddings, labels) if setup.miner is not None else None
            loss = setup.loss(embeddings, labels, indices)
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"{setup.label}: non-finite loss {loss.item()} at step {result.steps}; "
                    "lower the learning rate or the scale"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if schedule is not None:
                schedule.step()
            result.steps += 1
            result.images += len(labels)
            running, count = running + loss.item(), count + 1
            progress.step()
        result.epoch_losses.append(running / count)
        elapsed = time.perf_counter() - start
        progress.epoch(epoch + 1, result.epoch_losses[-1], result.images / elapsed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    result.seconds = time.perf_counter() - start
    progress.close()
    return result


def _batches(
    dataset: Dataset, batch_size: int, num_workers: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    yield from DataLoader(dataset, batch_size, shuffle=False, num_workers=num_workers)


def diverged_embeddings(embeddings: torch.Tensor, label: str) -> str | None:
    """Why a trained model's test ``embeddings`` cannot be evaluated (NaN or Inf: its
    training diverged, in steps after the last check of the embeddings), or ``None``."""
    if bool(torch.isfinite(embeddings).all()):
        return None
    return (
        f"{label}: the model's test embeddings are NaN or Inf (its training diverged); "
        "train it again with a lower learning rate"
    )


def _batch_count(dataset: Dataset, batch_size: int) -> int | None:
    """Batches of ``dataset``, or ``None`` where it has no length (an iterable dataset,
    torch's ``ChainDataset``, whose ``len`` raises)."""
    try:
        return -(-len(dataset) // batch_size)  # type: ignore[arg-type]
    except TypeError:
        return None


@torch.no_grad()
def embed(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int = 256,
    device: str = "cpu",
    amp: str | None = None,
    num_workers: int = 0,
    keep_on_device: bool = False,
    progress: bool = False,
    label: str = "embedding",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (float32) and labels of ``dataset``, in dataset order, in eval mode.

    Both come back on the CPU, or on ``device`` with ``keep_on_device=True`` (so that
    the retrieval evaluation runs on the GPU too). ``progress``: a tqdm bar (``label``)
    over the batches on a terminal (the test split of SOP is 60k images).
    """
    dev = resolve_device(device)
    model.to(dev).eval()
    chunks, labels = [], []
    shown = progress and bars_reach_a_terminal()
    batches = tqdm(
        _batches(dataset, batch_size, num_workers),
        total=_batch_count(dataset, batch_size) if shown else None,
        desc=label,
        unit="batch",
        disable=not shown,
        leave=False,
    )
    for inputs, targets in batches:
        with autocast(dev, amp):
            out = model(inputs.to(dev, non_blocking=True))
        chunks.append(out.float() if keep_on_device else out.float().cpu())
        labels.append(torch.as_tensor(targets))
    embeddings, all_labels = torch.cat(chunks), torch.cat(labels)
    return embeddings, all_labels.to(embeddings.device)
