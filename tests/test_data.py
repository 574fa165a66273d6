"""The datamodule on the offline CIFAR-10 copy."""

import pytest
import torch

import hbgs.data
from hbgs.data import DataError, ImageDataModule


def test_split_sizes_and_classes(cifar10):
    assert len(cifar10.splits["train"]) == 50_000 - 500
    assert len(cifar10.splits["calibration"]) == 500
    assert len(cifar10.splits["test"]) == 10_000
    assert cifar10.splits["train"].images.dtype == torch.uint8
    assert cifar10.splits["train"].images.shape[1:] == (3, 32, 32)
    assert torch.bincount(cifar10.splits["test"].labels).tolist() == [1000] * 10
    assert cifar10.input_size == (3, 32, 32)


def test_calibration_split_is_disjoint_from_training_and_seeded(cifar10, cifar10_root):
    train, calib = set(cifar10.train_index.tolist()), set(cifar10.calib_index.tolist())
    assert not train & calib
    assert len(train | calib) == 50_000
    same_seed = ImageDataModule(root=cifar10_root, calib_size=500, seed=0)
    same_seed.setup()
    assert torch.equal(same_seed.calib_index, cifar10.calib_index)
    other_seed = ImageDataModule(root=cifar10_root, calib_size=500, seed=1)
    other_seed.setup()
    assert not torch.equal(other_seed.calib_index, cifar10.calib_index)


def test_no_image_decoding_after_setup(cifar10, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an image was decoded after set-up")

    monkeypatch.setattr(hbgs.data, "decode_image", refuse)
    monkeypatch.setattr(hbgs.data, "read_file", refuse)
    for loader in (cifar10.train_dataloader(), cifar10.val_dataloader(), cifar10.test_dataloader()):
        x, y = next(iter(loader))
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32) and y.dtype == torch.int64


def test_augmentation_is_a_padded_crop_and_flip(cifar10):
    plain = cifar10.dataset("train", augment=False)
    augmented = cifar10.dataset("train", augment=True)
    image, _ = plain[0]
    # Every augmented view equals the plain image shifted by at most 4 pixels, possibly mirrored.
    padded = torch.nn.functional.pad(image, (4, 4, 4, 4), value=float("nan"))
    torch.manual_seed(0)
    for _ in range(10):
        view, _ = augmented[0]
        candidates = [padded[:, t : t + 32, l : l + 32] for t in range(9) for l in range(9)]
        candidates += [c.flip(-1) for c in candidates]
        zero = (torch.zeros(3, 1, 1) - plain.mean) / plain.std  # padding is black before normalising
        assert any(torch.allclose(torch.where(c.isnan(), zero.expand_as(c), c), view, atol=1e-6) for c in candidates)


def test_normalisation_gives_zero_mean_unit_std(cifar10):
    x, _ = cifar10.calibration_batch(500)
    assert x.shape == (500, 3, 32, 32)
    assert x.mean((0, 2, 3)).abs().max() < 0.1
    assert (x.std((0, 2, 3)) - 1).abs().max() < 0.1


def test_limits_subsample(cifar10_root):
    dm = ImageDataModule(root=cifar10_root, calib_size=100, limit_train=300, limit_test=200)
    dm.setup()
    assert (len(dm.splits["train"]), len(dm.splits["calibration"]), len(dm.splits["test"])) == (300, 100, 200)
    assert len(dm.train_dataloader()) == 3  # 300 images, batches of 128


def test_missing_data_says_where_and_how(tmp_path):
    dm = ImageDataModule(name="cifar10", root=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"nowhere.*download=true"):
        dm.setup()


def test_wrong_class_count_names_the_fix(cifar10_root):
    dm = ImageDataModule(name="imagefolder", root=cifar10_root, num_classes=100)
    with pytest.raises(DataError, match="dataset.num_classes=10"):
        dm.setup()
