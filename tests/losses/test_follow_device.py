"""A loss's parameters and buffers follow the embeddings' device, as PML's losses move
``W`` (``cast_types``): PML's trainers put the data on the GPU and never move the loss."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils import parametrize

import pml_margins.losses as losses
from pml_margins.losses.checked_forward import follow_device

C, D = 6, 8
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
MAKERS = {
    "arcface": lambda: losses.ArcFaceLoss(C, D, scale=16.0),
    "subcenter": lambda: losses.SubCenterArcFaceLoss(C, D, scale=16.0),
    "curricularface": lambda: losses.CurricularFaceLoss(C, D, scale=16.0),
    "adaface": lambda: losses.AdaFaceLoss(C, D, scale=16.0),
    "adacos": lambda: losses.AdaCosLoss(C, D),
    "proxy_circle": lambda: losses.ProxyCircleLoss(C, D),
    "center": lambda: losses.CenterLoss(C, D),
    "nsl": lambda: losses.NormSoftmaxLoss(C, D),
}


def _moves(loss: torch.nn.Module, device: torch.device, monkeypatch) -> list:
    """What ``follow_device`` asks ``loss.to`` for (recorded, not done)."""
    calls: list = []
    monkeypatch.setattr(loss, "to", lambda *args: calls.append(args))
    follow_device(loss, device)
    return calls


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_a_loss_elsewhere_is_moved_and_one_in_place_is_not(name, monkeypatch):
    loss = MAKERS[name]()
    assert _moves(loss, torch.device("cpu"), monkeypatch) == []
    gpu = torch.device("cuda", 0)  # (not touched: the move is recorded)
    assert _moves(loss, gpu, monkeypatch) == [(gpu,)]
    assert _moves(loss, torch.device("meta"), monkeypatch) == []


def test_a_parametrized_w_is_looked_at_and_a_meta_loss_is_left_to_its_error(monkeypatch):
    class Doubled(torch.nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

    loss = losses.ArcFaceLoss(C, D)
    parametrize.register_parametrization(loss, "W", Doubled())
    assert not loss._parameters  # W is the parametrization's
    assert _moves(loss, torch.device("cuda", 0), monkeypatch) != []
    with torch.device("meta"):
        meta = losses.ArcFaceLoss(C, D)
    assert _moves(meta, torch.device("cuda", 0), monkeypatch) == []


def test_on_one_device_nothing_is_copied():
    loss = losses.ArcFaceLoss(C, D)
    w, pointer = loss.W, loss.W.data_ptr()
    loss(torch.randn(12, D), torch.arange(12) % C).backward()
    assert loss.W is w and loss.W.data_ptr() == pointer


@CUDA
@pytest.mark.parametrize("name", sorted(MAKERS))
def test_a_cpu_built_loss_trains_on_cuda_embeddings(name):
    """The optimizer built on the CPU loss keeps its tensors; its state is made on CUDA."""
    torch.manual_seed(0)
    loss = MAKERS[name]()
    params = list(loss.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9) if params else None
    x = torch.randn(12, D, device="cuda", requires_grad=True)
    y = torch.arange(12, device="cuda") % C
    value = loss(x, y)
    value.backward()
    assert all(t.device.type == "cuda" for t in [*loss.parameters(), *loss.buffers()])
    assert all(a is b for a, b in zip(loss.parameters(), params, strict=True))  # same objects
    if optimizer is not None:
        optimizer.step()
    torch.manual_seed(0)
    reference = MAKERS[name]().cuda()
    torch.testing.assert_close(reference(x.detach(), y), value.detach())


@CUDA
def test_get_outliers_and_get_logits_follow_the_device_to_cuda():
    loss = losses.SubCenterArcFaceLoss(C, D)
    x, y = torch.randn(12, D, device="cuda"), torch.arange(12, device="cuda") % C
    _, centers = loss.get_outliers(x, y)
    assert centers.device.type == "cuda" and loss.W.device.type == "cuda"
    assert losses.ArcFaceLoss(C, D).get_logits(x).device.type == "cuda"


def test_a_move_under_inference_mode_leaves_trainable_tensors(monkeypatch):
    """A first call under inference mode (a validation before training) would otherwise
    leave W an inference tensor, which no later training step can save for backward."""
    loss = losses.ArcFaceLoss(C, D)
    seen: list = []
    monkeypatch.setattr(loss, "to", lambda *a: seen.append(torch.is_inference_mode_enabled()))
    with torch.inference_mode():
        follow_device(loss, torch.device("cuda", 0))
    assert seen == [False]
