"""BatchNorm folding: same outputs, fewer BatchNorms, original untouched, unsafe patterns left alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from carspotter.config import ModelConfig
from carspotter.models.factory import create_model
from carspotter.models.fuse import fold_batchnorm, forward_chunked


def _randomise_bn(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)


def _n_bn(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize(
    "mcfg",
    [
        ModelConfig(arch="scratch_cnn", pretrained=False, channels=[8, 16], batchnorm=True, hidden_dim=16),
        ModelConfig(arch="test_efficientnet", pretrained=False),  # timm BatchNormAct2d, depthwise convs
        ModelConfig(arch="test_resnet", pretrained=False),  # residual blocks, downsample branches
    ],
    ids=lambda c: c.arch,
)
def test_folded_model_gives_the_same_embeddings(mcfg: ModelConfig) -> None:
    torch.manual_seed(0)
    model = create_model(mcfg, 5, img_size=32).eval()
    _randomise_bn(model)
    x = torch.randn(3, 3, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded, n = fold_batchnorm(model, x[:2], lambda m, t: m.embed(t))
    assert n > 0 and n == _n_bn(model) - _n_bn(folded)
    with torch.no_grad():
        ref, got = model.embed(x), folded.embed(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # original untouched
    if mcfg.arch == "scratch_cnn":
        assert _n_bn(folded) == 0


class SharedConvOutput(nn.Module):
    """The conv output feeds BN *and* a skip connection: folding it would change the skip."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class InplaceBetween(nn.Module):
    """conv → in-place ReLU → BN: the BN's input is the same tensor object but not the conv's output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.act(self.conv(x)))


@pytest.mark.parametrize("cls", [SharedConvOutput, InplaceBetween])
def test_unsafe_patterns_are_not_folded(cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = cls().eval()
    _randomise_bn(model)
    x = torch.randn(2, 3, 8, 8)
    folded, n = fold_batchnorm(model, x)
    assert n == 0
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x))


def test_folding_works_inside_inference_mode() -> None:
    """embed_dataset runs under torch.inference_mode(); folding must work there too."""
    torch.manual_seed(0)
    model = create_model(ModelConfig(arch="test_efficientnet", pretrained=False), 0, img_size=32).eval()
    _randomise_bn(model)
    with torch.inference_mode():
        x = torch.randn(3, 3, 32, 32)  # an inference tensor, as a DataLoader batch would be there
        folded, n = fold_batchnorm(model, x[:2], lambda m, t: m.embed(t))
        torch.testing.assert_close(folded.embed(x), model.embed(x), rtol=1e-4, atol=1e-5)
    assert n > 0


@pytest.mark.parametrize("chunk", [None, 1, 3, 7, 16])
def test_chunked_forward_equals_one_call(chunk: int | None) -> None:
    """Cutting a batch into chunks (the CPU speed-up) changes nothing: same rows, same order, same values."""
    torch.manual_seed(0)
    model = create_model(ModelConfig(arch="test_resnet", pretrained=False), 5, img_size=32).eval()
    _randomise_bn(model)
    x = torch.randn(10, 3, 32, 32)  # 10 is not a multiple of 3 or 7: the last chunk is short
    with torch.inference_mode():
        whole = model(x)  # (10, 5)
        out = forward_chunked(model, x, chunk)
    assert out.shape == whole.shape
    torch.testing.assert_close(out, whole, rtol=1e-5, atol=1e-5)


def test_embed_dataset_chunking_keeps_the_vectors() -> None:
    from torch.utils.data import TensorDataset

    from carspotter.retrieval.embed import embed_dataset

    torch.manual_seed(0)
    model = create_model(ModelConfig(arch="test_efficientnet", pretrained=False), 0, img_size=32).eval()
    _randomise_bn(model)
    ds = TensorDataset(torch.randn(11, 3, 32, 32))
    one = embed_dataset(model, ds, batch_size=8, cpu_chunk=None, fold_bn=False)  # (11, D)
    chunked = embed_dataset(model, ds, batch_size=8, cpu_chunk=3)
    assert chunked.shape == one.shape == (11, model.embed_dim)
    assert abs(chunked - one).max() < 1e-4
