"""Image-classification data: decoded once into uint8 tensors, augmented per sample from memory.

Splits: `train` (what the optimiser sees), `calibration` (held out from the training images,
seeded; the pruning criteria and Lightning's validation use it) and `test` (reporting only, never
a decision). JPEGs are decoded once at set-up and cached as a tensor file, so an epoch never
decodes an image.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image, read_file

from hbgs.atomic import atomic_file
from hbgs.errors import HbgsError

REPO_ROOT = Path(__file__).resolve().parent.parent
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

# Per-channel mean and std of the training images.
STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


class DataError(HbgsError):
    """Data missing or malformed; the message says where we looked and how to fix it."""


@dataclass
class ImageSplit:
    images: torch.Tensor  # uint8 (N, 3, H, W)
    labels: torch.Tensor  # int64 (N,)

    def subset(self, index: torch.Tensor) -> "ImageSplit":
        return ImageSplit(self.images[index], self.labels[index])

    def __len__(self) -> int:
        return len(self.labels)


class AugmentedImages(Dataset):
    """uint8 images → normalised float tensors; with `augment`, a 4-pixel padded random crop and a
    horizontal flip."""

    def __init__(self, split: ImageSplit, mean, std, augment: bool, image_size: int | None = None, pad: int = 4):
        self.split, self.augment, self.image_size, self.pad = split, augment, image_size, pad
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        image = self.split.images[i].float().div_(255)
        if self.image_size is not None and image.shape[-1] != self.image_size:
            image = F.interpolate(image[None], size=self.image_size, mode="bilinear", antialias=True)[0]
        if self.augment:
            size = image.shape[-1]
            padded = F.pad(image, (self.pad,) * 4)
            top, left = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            image = padded[:, top : top + size, left : left + size]
            if torch.rand(()) < 0.5:
                image = image.flip(-1)
        return (image - self.mean) / self.std, self.split.labels[i]


class DeviceBatches:
    """Batches drawn from uint8 images that live on the training device, augmented there.

    The GPU counterpart of a DataLoader over `AugmentedImages`: the whole split sits on the device
    as uint8 (CIFAR-10's training images are 150 MB), and each batch is cropped (zero padding of
    `pad` pixels, a random offset per image) and flipped with batched tensor ops, so no worker
    process decodes or copies images and a small model is not starved. The augmentation is the
    same as `AugmentedImages` (tests compare them); one pass is one epoch in a fresh random order.
    `cutout` > 0 also erases a `cutout`-pixel square from each augmented image (DeVries & Taylor,
    2017: its centre anywhere in the image, clipped at the border, the pixels set to the mean), a
    regulariser for networks that fit their training set; `AugmentedImages` has no counterpart.
    """

    def __init__(self, split: ImageSplit, mean, std, batch_size: int, augment: bool, device="cpu",
                 seed: int = 0, drop_last: bool = False, pad: int = 4, cutout: int = 0,
                 memory_format: torch.memory_format = torch.contiguous_format):
        self.device = torch.device(device)
        self.images, self.labels = split.images.to(self.device), split.labels.to(self.device)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255
        self.batch_size, self.augment, self.drop_last, self.pad = batch_size, augment, drop_last, pad
        self.cutout = cutout
        self.memory_format = memory_format
        self.generator = torch.Generator(self.device).manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        n = len(self.labels)
        order = (torch.randperm(n, device=self.device, generator=self.generator) if self.augment
                 else torch.arange(n, device=self.device))
        for batch in range(len(self)):
            index = order[batch * self.batch_size:(batch + 1) * self.batch_size]
            images = self.images[index]
            if self.augment:
                images = self.crop_and_flip(images)
            x = (images.float() - self.mean) / self.std
            if self.augment and self.cutout:
                x = x.masked_fill(self.cutout_mask(len(images), *images.shape[2:]), 0.0)  # 0 is the mean
            yield x.contiguous(memory_format=self.memory_format), self.labels[index]

    def crop_and_flip(self, images: torch.Tensor) -> torch.Tensor:
        n, _, h, w = images.shape
        padded = F.pad(images, (self.pad,) * 4)
        top, left = torch.randint(0, 2 * self.pad + 1, (2, n), device=self.device, generator=self.generator)
        flip = torch.rand(n, device=self.device, generator=self.generator) < 0.5
        rows = top[:, None] + torch.arange(h, device=self.device)
        cols = left[:, None] + torch.arange(w, device=self.device)
        cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flipped crop reads its columns backwards
        # Advanced indices around a slice put their dims first: (n, h, w, channels).
        cropped = padded[torch.arange(n, device=self.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
        return cropped.permute(0, 3, 1, 2)

    def cutout_mask(self, n: int, h: int, w: int) -> torch.Tensor:
        """(n, 1, h, w), True inside each image's erased square (centre drawn per image)."""
        centre_row = torch.randint(0, h, (n,), device=self.device, generator=self.generator)
        centre_col = torch.randint(0, w, (n,), device=self.device, generator=self.generator)
        top, left = centre_row - self.cutout // 2, centre_col - self.cutout // 2
        rows, cols = torch.arange(h, device=self.device), torch.arange(w, device=self.device)
        in_rows = (rows >= top[:, None]) & (rows < top[:, None] + self.cutout)
        in_cols = (cols >= left[:, None]) & (cols < left[:, None] + self.cutout)
        return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]


def find_cifar10_root() -> str | None:
    """The offline ImageFolder copy of CIFAR-10: $HBGS_CIFAR10_ROOT, else `shared/data/cifar10`
    beside the repository, the working directory or one of their parents (this workplace keeps it
    at /work/shared, beside the checkout), when this machine has one."""
    env = os.environ.get("HBGS_CIFAR10_ROOT")
    bases = [REPO_ROOT, *REPO_ROOT.parents, Path.cwd(), *Path.cwd().parents, Path("/work")]
    candidates = [Path(env)] if env else []
    candidates += [base / "shared" / "data" / "cifar10" for base in bases]
    return next((str(c) for c in candidates if (c / "train").is_dir()), None)


def is_image_folder(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "test").is_dir()


def decode_image_folder(directory: Path) -> tuple[ImageSplit, list[str]]:
    """Decode every image under `directory/<class>/` (sorted classes, sorted files) to uint8 RGB."""
    classes = sorted(d.name for d in directory.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"No class folders in {directory}: expected {directory}/<class>/<image files>.")
    images, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (directory / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        images += [decode_image(read_file(str(p)), mode=ImageReadMode.RGB) for p in files]
        labels += [label] * len(files)
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        raise DataError(f"Images in {directory} have different sizes {sorted(shapes)[:3]}...: resize them to one size first.")
    return ImageSplit(torch.stack(images), torch.tensor(labels)), classes


def load_image_folder(root: Path, split: str, cache_dir: str | None) -> tuple[ImageSplit, list[str]]:
    """Decode `root/split` once, then reuse a tensor cache keyed by the folder's path and file count."""
    directory = root / split
    if cache_dir is None:
        return decode_image_folder(directory)
    n_files = sum(len(files) for _, _, files in os.walk(directory))
    key = hashlib.sha1(f"{directory.resolve()}|{n_files}".encode()).hexdigest()[:12]
    cache = Path(cache_dir).expanduser() / f"{root.name}-{split}-{key}.pt"
    if cache.exists():
        saved = torch.load(cache)
        return ImageSplit(saved["images"], saved["labels"]), saved["classes"]
    data, classes = decode_image_folder(directory)
    with atomic_file(cache) as f:  # never leave a half-written cache behind
        torch.save({"images": data.images, "labels": data.labels, "classes": classes}, f)
    return data, classes


def load_torchvision_cifar(name: str, root: Path, split: str, download: bool) -> tuple[ImageSplit, list[str]]:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = {"cifar10": CIFAR10, "cifar100": CIFAR100}[name]
    try:
        ds = cls(str(root), train=split == "train", download=download)
    except RuntimeError as e:
        raise DataError(
            f"{name} not found under {root} (looked for torchvision's binary release and for an ImageFolder "
            f"copy with train/ and test/). Fix: pass dataset.download=true on a machine with internet, or point "
            f"dataset.root at a folder that has it (e.g. dataset.root=/path/to/cifar10)."
        ) from e
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return ImageSplit(images, torch.tensor(ds.targets)), list(ds.classes)


class ImageDataModule(L.LightningDataModule):
    """CIFAR-10/100 (torchvision binary or ImageFolder copy) or any ImageFolder with train/ and test/."""

    def __init__(self, name: str = "cifar10", root: str | None = None, num_classes: int = 10, download: bool = False,
                 batch_size: int = 128, eval_batch_size: int = 512, num_workers: int = 0, calib_size: int = 1000,
                 seed: int = 0, limit_train: int | None = None, limit_test: int | None = None,
                 mean=None, std=None, image_size: int | None = None, cache_dir: str | None = "~/.cache/hbgs"):
        super().__init__()
        if name not in ("cifar10", "cifar100", "imagefolder"):
            raise DataError(f"Unknown dataset name {name!r}: use cifar10, cifar100 or imagefolder.")
        if root is None:
            root = find_cifar10_root() if name == "cifar10" else None
        if root is None:
            raise DataError(f"dataset.root is not set for {name}: pass dataset.root=/path/to/data.")
        self.name, self.root, self.num_classes, self.download = name, Path(root).expanduser(), num_classes, download
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.calib_size, self.seed, self.limit_train, self.limit_test = calib_size, seed, limit_train, limit_test
        self.mean, self.std, self.image_size, self.cache_dir = mean, std, image_size, cache_dir
        self.splits: dict[str, ImageSplit] = {}
        self._device_batches: DeviceBatches | None = None  # train_batches on a GPU, built once

    def prepare_data(self) -> None:
        if self.download and not is_image_folder(self.root):
            load_torchvision_cifar(self.name, self.root, "train", download=True)
            load_torchvision_cifar(self.name, self.root, "test", download=True)

    def _load(self, split: str) -> ImageSplit:
        if is_image_folder(self.root):
            data, classes = load_image_folder(self.root, split, self.cache_dir)
        elif self.name == "imagefolder":
            raise DataError(f"{self.root} is not an ImageFolder root: it needs train/<class>/ and test/<class>/ folders.")
        else:
            data, classes = load_torchvision_cifar(self.name, self.root, split, self.download)
        if len(classes) != self.num_classes:
            raise DataError(f"{self.root / split} has {len(classes)} classes but dataset.num_classes={self.num_classes}: "
                            f"set dataset.num_classes={len(classes)}.")
        return data

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        train_all, test = self._load("train"), self._load("test")
        if self.calib_size >= len(train_all):
            raise DataError(f"dataset.calib_size={self.calib_size} leaves no training images (only {len(train_all)}).")
        order = torch.randperm(len(train_all), generator=torch.Generator().manual_seed(self.seed))
        calib_index, train_index = order[: self.calib_size], order[self.calib_size :]
        if self.limit_train is not None:
            train_index = train_index[: self.limit_train]
        if self.limit_test is not None:
            test = test.subset(torch.randperm(len(test), generator=torch.Generator().manual_seed(self.seed))[: self.limit_test])
        self.splits = {"train": train_all.subset(train_index), "calibration": train_all.subset(calib_index), "test": test}
        self.train_index, self.calib_index = train_index, calib_index  # indices into the full training folder
        if self.mean is None or self.std is None:
            self.mean, self.std = STATS.get(self.name) or channel_stats(self.splits["train"].images)

    @property
    def input_size(self) -> tuple[int, int, int]:
        """(channels, height, width) of what the model sees."""
        self.setup()
        _, h, w = self.splits["test"].images.shape[1:]
        return (3, self.image_size, self.image_size) if self.image_size else (3, h, w)

    def dataset(self, split: str, augment: bool | None = None) -> AugmentedImages:
        self.setup()
        augment = split == "train" if augment is None else augment
        return AugmentedImages(self.splits[split], self.mean, self.std, augment, self.image_size)

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        return DataLoader(self.dataset(split), batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          drop_last=False, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, self.batch_size)

    def train_batches(self, device="cpu") -> DataLoader | DeviceBatches:
        """Training batches for a model on ``device``. On a GPU: ``DeviceBatches``, the split
        copied there once as uint8 and cropped and flipped there (a DataLoader cropping one image
        at a time in Python starves it), reseeded from torch's global generator at every call so
        a seeded run draws the same batches. Elsewhere, or with ``image_size`` (resized on the
        CPU): ``train_dataloader()``."""
        device = torch.device(device)
        if device.type != "cuda" or self.image_size is not None:
            return self.train_dataloader()
        self.setup()
        if self._device_batches is None or self._device_batches.device != device:
            self._device_batches = DeviceBatches(self.splits["train"], self.mean, self.std, self.batch_size,
                                                 augment=True, device=device)
        self._device_batches.generator.manual_seed(int(torch.randint(2**62, ())))
        return self._device_batches

    def val_dataloader(self) -> DataLoader:
        return self._loader("calibration", False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)

    def calibration_batch(self, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `n` calibration images (all when None), normalised, not augmented: the data the
        pruning criteria score on."""
        ds = self.dataset("calibration", augment=False)
        n = len(ds) if n is None else min(n, len(ds))
        xs, ys = zip(*(ds[i] for i in range(n)))
        return torch.stack(xs), torch.stack(ys)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.float().div(255).transpose(0, 1).flatten(1)
    return tuple(x.mean(1).tolist()), tuple(x.std(1).tolist())
