"""The Keras BLAST-CT network against a PyTorch statement of their architecture (needs torch).

The PyTorch module below restates ``blast_ct/models/deepmedic.py`` and ``base.py`` of
biomedia-mira/blast-ct (three pathways at scale 5, 3, 1; pre-activation BN -> PReLU -> conv;
residuals where channels match; nearest upsampling; centre crops; 1x1x1 fully connected
blocks) so that its state dict has their names. Weights go through
``scripts/convert_blast_ct.py`` and the outputs are compared on a fixed random input.

Measured (2026-12-03, torch 2.14 CPU, Keras 3.15 / TensorFlow 2.21), max |softmax difference|
over the 5 x 30^3 outputs of a fixed uniform [-1, 1] 110^3 input:

* random weights, float32 conversion: 4.8e-7 (tolerance 1e-4);
* random weights, float16 kernels as shipped: 1.6e-4 (tolerance 1e-2);
* the shipped ``model_1.npz`` against the original ``model_1.pt`` in float32, on the central
  110^3 of the real GE head CT as the teacher prepares it: 2.4e-5 (tolerance 2e-2).

Runs where torch is installed (``pip install -e '.[convert]'``); skipped elsewhere.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: the conversion test needs the 'convert' extra")
nn = torch.nn

from tests.conftest import REPO_ROOT, SHARED_DATA  # noqa: E402
from worker.imaging.dicom_load import load_study  # noqa: E402
from worker.imaging.series_selection import SelectionRules  # noqa: E402
from worker.measure.teacher import window  # noqa: E402
from worker.measure.teacher_grid import to_reoriented_1mm  # noqa: E402
from worker.model.blast_ct_net import build_blast_ct, set_blast_ct_weights, shipped_blast_ct  # noqa: E402


def _converter():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("convert_blast_ct", REPO_ROOT / "scripts" / "convert_blast_ct.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _crop(x, size):  # type: ignore[no-untyped-def]
    c = x.shape[2]
    s = c // 2 - size // 2
    return x[:, :, s : s + size, s : s + size, s : s + size]


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, k: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm3d(cin)
        self.prelu = nn.PReLU()
        self.conv = nn.Conv3d(cin, cout, kernel_size=k, bias=False)
        self.k = k

    def forward(self, x):  # type: ignore[no-untyped-def]
        out = self.conv(self.prelu(self.bn(x)))
        if x.shape[1] == out.shape[1]:
            h = self.k // 2
            out = out + (x if h == 0 else x[:, :, h:-h, h:-h, h:-h])
        return out


class _Path(nn.Module):
    def __init__(self, scale: int, maps: tuple[int, ...]) -> None:
        super().__init__()
        self.scale = scale
        chans = (1, *maps)
        # index 0 is their DownSample and the last their UpSample (no parameters)
        self.path = nn.Sequential(nn.Identity(), *[_Block(chans[i], chans[i + 1], 3) for i in range(len(maps))])

    def forward(self, x, out_size):  # type: ignore[no-untyped-def]
        s = self.scale
        coarse = out_size // s + bool(out_size % s)
        x = _crop(x, (coarse + 16) * s)
        x = x[:, :, s // 2 :: s, s // 2 :: s, s // 2 :: s]
        x = self.path(x)
        x = nn.functional.interpolate(x, scale_factor=s, mode="nearest") if s > 1 else x
        return _crop(x, out_size)


class TorchDeepMedic(nn.Module):
    def __init__(self, maps: tuple[int, ...] = (30, 30, 40, 40, 40, 40, 50, 50), fc: tuple[int, ...] = (250, 250)):
        super().__init__()
        for i, s in enumerate((5, 3, 1)):
            self.add_module(f"path{(s, s, s)}{i}", _Path(s, maps))
        chans = (3 * maps[-1], *fc, 5)
        self.fully_connected = nn.Sequential(*[_Block(chans[i], chans[i + 1], 1) for i in range(len(chans) - 1)])

    def forward(self, x):  # type: ignore[no-untyped-def]
        out_size = ((x.shape[2] - 5) // 5 + 1 - 16) * 5
        paths = [m for name, m in self.named_children() if name.startswith("path")]
        return self.fully_connected(torch.cat([p(x, out_size) for p in paths], dim=1))


def _randomised(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var") or name.endswith("bn.weight"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=gen))
            elif name.endswith("prelu.weight"):
                tensor.copy_(0.1 + 0.2 * torch.rand(tensor.shape, generator=gen))
            else:
                fan_in = tensor[0].numel() if tensor.ndim > 1 else 1
                tensor.copy_(torch.randn(tensor.shape, generator=gen) / (fan_in**0.5))
    return module.eval()


def _compare(net: nn.Module, arrays: dict[str, np.ndarray], x: np.ndarray, width: float = 1.0) -> float:
    with torch.no_grad():
        expected = torch.softmax(net(torch.from_numpy(x[None, None])), dim=1)[0].numpy()
    model = build_blast_ct(width, input_size=x.shape[0])
    set_blast_ct_weights(model, arrays)
    got = np.moveaxis(model(x[None, ..., None], training=False).numpy()[0], -1, 0)
    assert got.shape == expected.shape
    return float(np.abs(got - expected).max())


def _state(net: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in net.state_dict().items()}


def test_keras_matches_pytorch_on_random_weights() -> None:
    torch.manual_seed(0)
    net = _randomised(TorchDeepMedic(), seed=1)
    x = np.random.default_rng(2).uniform(-1.0, 1.0, (110, 110, 110)).astype(np.float32)
    convert = _converter()
    diff32 = _compare(net, convert.convert_state_dict(_state(net), conv_dtype=np.float32), x)
    diff16 = _compare(net, convert.convert_state_dict(_state(net)), x)
    print(f"max |p_keras - p_torch|: float32 {diff32:.2e}, float16 kernels {diff16:.2e}")
    assert diff32 < 1e-4
    assert diff16 < 1e-2


def _real_patch() -> np.ndarray:
    """The central 110^3 of the real GE head CT, prepared as the teacher prepares it (noise if absent)."""
    ge = SHARED_DATA / "real-head-ct-ge"
    if not ge.is_dir():
        hu = np.random.default_rng(3).normal(40.0, 30.0, (110, 110, 110)).astype(np.float32)
        return window(hu)
    volume = window(to_reoriented_1mm(load_study(ge, rules=SelectionRules())).volume)
    starts = [(n - 110) // 2 for n in volume.shape]
    return np.ascontiguousarray(volume[tuple(slice(s, s + 110) for s in starts)])


def test_shipped_model_matches_its_pytorch_original() -> None:
    """The shipped float16 ``model_1.npz`` against ``model_1.pt`` in PyTorch float32, on real CT.

    Measured: see the printed line (recorded in the module docstring and MODEL_CARD.md).
    """
    source = SHARED_DATA / "blast-ct-models" / "model_1.pt"
    if not source.is_file():
        pytest.skip(f"the BLAST-CT originals are absent: expected {source}")
    net = TorchDeepMedic().eval()
    net.load_state_dict(torch.load(source, map_location="cpu", weights_only=True))
    weights = {w.name: w for w in shipped_blast_ct()}["model_1"]
    with np.load(weights.path) as data:
        arrays = {k: data[k] for k in data.files}
    x = _real_patch()
    diff = _compare(net, arrays, x)
    print(f"shipped model_1 float16 vs PyTorch float32: max |dp| {diff:.2e}")
    assert diff < 2e-2


def test_state_dict_names_match_their_architecture() -> None:
    names = set(TorchDeepMedic().state_dict())
    assert "path(5, 5, 5)0.path.1.bn.running_mean" in names
    assert "path(1, 1, 1)2.path.8.conv.weight" in names
    assert "fully_connected.2.prelu.weight" in names
    source = SHARED_DATA / "blast-ct-models" / "model_1.pt"
    if source.is_file():
        theirs = torch.load(source, map_location="cpu", weights_only=True)
        assert set(theirs) == names
        assert Path(source).stat().st_size > 0
