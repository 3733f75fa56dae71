"""Datasets, transforms and training recipes for the MobileTL experiments.

MobileTL (Chiang et al., AAAI 2023) evaluates on-device transfer learning on
the eight fine-grained and object benchmarks popularised by TinyTL (Cai et al.,
"TinyTL: Reduce Memory, Not Parameters for Efficient On-Device Learning",
NeurIPS 2020). This module gives every one of them the same entry point::

    train_ds, test_ds, num_classes = build_datasets("flowers102", root)

Standard splits
    cifar10 / cifar100  the official train (50k) and test (10k) batches.
    flowers102          train + val (2,040 images) for training, test (6,149)
                        for evaluation, as in TinyTL's dataset scripts.
    pets                torchvision's ``trainval`` / ``test`` splits.
    aircraft            ``trainval`` / ``test``, 100 variant labels.
    cars                ``train`` / ``test``. The original download URL is
                        dead upstream, so the files must be placed by hand.
    food101             ``train`` / ``test`` from ``meta/*.json``.
    cub200              the official ``train_test_split.txt``; read by
                        :class:`CUB200` from the archive's own layout.

Transforms follow TinyTL: random-resized crops with scale (0.22, 1) and a
horizontal flip for training; resize to ``res * 256 / 224`` and a centre crop
for testing; ImageNet mean/std normalisation for both.

Recipe defaults (:func:`recipe`) are the per-dataset initial learning rates and
label-smoothing factors of TinyTL's released batch-8 training scripts (Adam,
50 epochs, cosine schedule; ``exp_scripts/batch8/*.sh`` in mit-han-lab/tinyml);
MobileTL reuses that recipe. The two offline tasks carry our own values.

Offline data
    ``offline-source`` and ``offline-target`` need no network and no files on
    disk: they read ``assets/fashion_mnist_subset.npz``, 5,500 real 28x28
    grey-scale images taken from Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017;
    (c) 2017 Zalando SE, MIT licence; copied from Debian's
    ``dataset-fashion-mnist`` package). The first 400 training and first 150
    test images of every class were kept. The ten clothing classes are split
    into two disjoint five-class tasks so that a network pretrained on the
    source task can be fine-tuned on the target task. Images are converted to
    three-channel RGB so the same MobileNet stem and transforms apply.

Nothing is downloaded unless ``download=True`` is passed; a missing dataset
raises :class:`FileNotFoundError` naming the folder that was looked at.
"""

from __future__ import annotations

import random
import socket
import warnings
from http.client import HTTPException
from pathlib import Path
from typing import Callable
from urllib.error import URLError

import numpy as np
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset
from torchvision import datasets, transforms
from torchvision.datasets.utils import download_and_extract_archive

from .choices import (CARS_LAYOUT, CUSTOM_DATASET, DATASET_NAMES, DATASETS, DEFAULT_DATASET,  # noqa: F401
                      FOLDER_DATASET, SOURCE_DATASET, DatasetInfo, check_choice)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRAIN_CROP_SCALE = (0.22, 1.0)

OFFLINE_ASSET = Path(__file__).resolve().parent / "assets" / "fashion_mnist_subset.npz"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Each task mixes upper-body garments and footwear, so features learnt on the
# source task are useful, but no target class is ever seen during pretraining.
OFFLINE_SOURCE_CLASSES = (0, 1, 2, 5, 8)
OFFLINE_TARGET_CLASSES = (3, 4, 6, 7, 9)

CUB_URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1"
CUB_ARCHIVE = "CUB_200_2011.tgz"
CUB_MD5 = "97eceeb196236b17998738112f37df78"

Transform = Callable[[Image.Image], object]


# --------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------
def _normalise() -> transforms.Normalize:
    return transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)


def train_transform(resolution: int) -> transforms.Compose:
    """TinyTL training augmentation: random-resized crop + horizontal flip."""
    return transforms.Compose([
        transforms.RandomResizedCrop(resolution, scale=TRAIN_CROP_SCALE),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        _normalise(),
    ])


def test_transform(resolution: int) -> transforms.Compose:
    """TinyTL evaluation: resize to res*256/224, then centre-crop to res."""
    return transforms.Compose([
        transforms.Resize(round(resolution * 256 / 224)),
        transforms.CenterCrop(resolution),
        transforms.ToTensor(),
        _normalise(),
    ])


# --------------------------------------------------------------------------
# CUB-200-2011, read from the official archive layout
# --------------------------------------------------------------------------
def _read_id_table(path: Path) -> dict[int, str]:
    """Parse the ``<id> <value>`` lines used by every CUB metadata file."""
    table = {}
    for line in path.read_text().splitlines():
        if line.strip():
            key, value = line.split(maxsplit=1)
            table[int(key)] = value.strip()
    return table


class CUB200(Dataset):
    """Caltech-UCSD Birds-200-2011 with its official train/test split.

    ``root`` must contain ``CUB_200_2011/`` with ``images.txt``,
    ``image_class_labels.txt``, ``train_test_split.txt``, ``classes.txt`` and
    ``images/<class dir>/<file>.jpg``. Labels are 0-based (class id - 1).
    """

    folder = "CUB_200_2011"

    def __init__(self, root: str | Path, train: bool = True,
                 transform: Transform | None = None, download: bool = False):
        self.base = Path(root).expanduser() / self.folder
        if download and not self._is_complete():
            download_cub200(root)
        if not self._is_complete():
            raise FileNotFoundError(
                f"CUB-200-2011 metadata not found in {self.base}; "
                "use download=True or extract CUB_200_2011.tgz there")
        self.transform = transform
        self.classes = self._read_classes()
        self.samples = self._read_samples(train)
        self.targets = [label for _, label in self.samples]

    def _is_complete(self) -> bool:
        names = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")
        return all((self.base / name).is_file() for name in names)

    def _read_classes(self) -> list[str]:
        table = _read_id_table(self.base / "classes.txt")
        return [table[class_id] for class_id in sorted(table)]

    def _read_samples(self, train: bool) -> list[tuple[Path, int]]:
        paths = _read_id_table(self.base / "images.txt")
        labels = _read_id_table(self.base / "image_class_labels.txt")
        is_train = _read_id_table(self.base / "train_test_split.txt")
        wanted = "1" if train else "0"
        return [(self.base / "images" / paths[i], int(labels[i]) - 1)
                for i in sorted(paths) if is_train[i] == wanted]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        with Image.open(path) as image:
            image = image.convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, label


def download_cub200(root: str | Path) -> None:
    """Fetch and unpack the official CUB_200_2011.tgz (about 1.1 GB) into ``root``."""
    download_and_extract_archive(CUB_URL, str(Path(root).expanduser()),
                                 filename=CUB_ARCHIVE, md5=CUB_MD5)


# --------------------------------------------------------------------------
# Offline Fashion-MNIST subset
# --------------------------------------------------------------------------
class ArrayImageDataset(Dataset):
    """Grey-scale uint8 images held in memory, returned as RGB PIL images."""

    def __init__(self, images: np.ndarray, labels: np.ndarray,
                 classes: list[str], transform: Transform | None = None):
        self.images = images
        self.targets = [int(label) for label in labels]
        self.classes = classes
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index]).convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def _select_classes(images: np.ndarray, labels: np.ndarray,
                    class_ids: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Keep the images of ``class_ids`` and relabel them 0..len(class_ids)-1."""
    keep = np.isin(labels, class_ids)
    relabel = {original: new for new, original in enumerate(class_ids)}
    return images[keep], np.array([relabel[int(label)] for label in labels[keep]])


def load_offline(class_ids: tuple[int, ...], train_tf: Transform,
                 test_tf: Transform) -> tuple[Dataset, Dataset]:
    """Build one offline task (a class subset of the bundled Fashion-MNIST)."""
    names = [FASHION_MNIST_CLASSES[i] for i in class_ids]
    with np.load(OFFLINE_ASSET, allow_pickle=False) as arrays:
        train = _select_classes(arrays["train_images"], arrays["train_labels"], class_ids)
        test = _select_classes(arrays["test_images"], arrays["test_labels"], class_ids)
    return (ArrayImageDataset(*train, names, train_tf),
            ArrayImageDataset(*test, names, test_tf))


# --------------------------------------------------------------------------
# Your own images: one sub-folder per class
# --------------------------------------------------------------------------
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
FOLDER_VAL_FRACTION = 0.2  # without train/ and val/, this share of each class is held out ...
FOLDER_SPLIT_SEED = 0  # ... drawn with this seed, the same for every run and method


class SkippedImageWarning(UserWarning):
    """An image file that cannot be decoded (corrupt or truncated) was left out."""


def readable_image(path: Path) -> str | None:
    """None if ``path`` decodes completely, else why not (a reduced-size decode reads every byte)."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (64, 64))  # JPEG: decode at 1/8 scale, still to the last byte
            image.load()
        return None
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError ... for bad files
        return " ".join(str(error).split()) or type(error).__name__


class ImageFolderDataset(Dataset):
    """``(image, label)`` pairs from a list of ``(path, label)``; ``classes`` names the labels."""

    def __init__(self, samples: list[tuple[Path, int]], classes: list[str], transform: Transform | None = None):
        self.samples, self.classes, self.transform = samples, classes, transform
        self.targets = [label for _, label in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except Exception as error:  # changed on disk after the scan
            raise ValueError(f"cannot read image {path}: {' '.join(str(error).split())}") from error
        return (self.transform(image) if self.transform is not None else image), label


def scan_image_folder(root: Path, classes: list[str] | None = None,
                      strict: bool = False) -> tuple[list[tuple[Path, int]], list[str], list[str]]:
    """``(samples, classes, skipped)`` of ``root/<class>/<image>``, sorted by name.

    Every image is decoded once: an unreadable one is skipped with a ``SkippedImageWarning``
    naming it, or with ``strict`` raises ValueError naming it.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist ({DATASETS[FOLDER_DATASET].manual_steps})")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    classes = found if classes is None else classes
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"{root} has class folders that the training classes lack: {', '.join(unknown)}")
    if len(classes) < 2:
        raise ValueError(f"{root} needs one sub-folder per class, at least two; found {found or 'none'}")
    samples, skipped = [], []
    for label, name in enumerate(classes):
        files = sorted(f for f in (root / name).rglob("*")
                       if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file() and not f.name.startswith("."))
        for path in files:
            problem = readable_image(path)
            if problem is None:
                samples.append((path, label))
            elif strict:
                raise ValueError(f"unreadable image {path} ({problem}); remove it, or leave out --strict-data "
                                 f"to skip such files with a warning")
            else:
                skipped.append(str(path))
                warnings.warn(f"skipped unreadable image {path} ({problem})", SkippedImageWarning, stacklevel=2)
    return samples, classes, skipped


def load_folder(root: Path, train_tf: Transform, test_tf: Transform, download: bool, strict: bool = False):
    """Your own images: ``root/train/<class>/`` and ``root/val/<class>/``, or ``root/<class>/`` split
    into train and val (``FOLDER_VAL_FRACTION`` of each class, drawn with ``FOLDER_SPLIT_SEED``)."""
    root = Path(root)
    if (root / "train").is_dir() and (root / "val").is_dir():
        train, classes, skipped = scan_image_folder(root / "train", strict=strict)
        test, _, skipped_test = scan_image_folder(root / "val", classes, strict=strict)
        skipped += skipped_test
    else:
        samples, classes, skipped = scan_image_folder(root, strict=strict)
        train, test = [], []
        shuffle = random.Random(FOLDER_SPLIT_SEED)
        for label in range(len(classes)):
            mine = [s for s in samples if s[1] == label]
            shuffle.shuffle(mine)
            held_out = min(len(mine) - 1, max(1, round(len(mine) * FOLDER_VAL_FRACTION))) if len(mine) > 1 else 0
            test, train = test + mine[:held_out], train + mine[held_out:]
    empty = [classes[k] for k in range(len(classes)) if not any(label == k for _, label in train)]
    if empty:
        raise ValueError(f"no readable training image for class {', '.join(empty)} in {root}")
    train_ds, test_ds = ImageFolderDataset(train, classes, train_tf), ImageFolderDataset(test, classes, test_tf)
    train_ds.skipped = test_ds.skipped = skipped
    return train_ds, test_ds


# --------------------------------------------------------------------------
# Loaders: (root, train transform, test transform, download) -> (train, test)
# --------------------------------------------------------------------------
def _require_scipy(name: str) -> None:
    try:
        import scipy.io  # noqa: F401  (torchvision reads the .mat files with it)
    except ImportError as err:
        raise ImportError(f"{name} stores its labels in .mat files; "
                          "install scipy (pip install scipy) to read them") from err


def load_cifar10(root: Path, train_tf: Transform, test_tf: Transform, download: bool,
                 dataset_cls: type = datasets.CIFAR10) -> tuple[Dataset, Dataset]:
    """CIFAR-10 (or another torchvision CIFAR class): official batches."""
    return (dataset_cls(root, train=True, transform=train_tf, download=download),
            dataset_cls(root, train=False, transform=test_tf, download=download))


def load_cifar100(root: Path, train_tf: Transform, test_tf: Transform, download: bool):
    """CIFAR-100: official batches."""
    return load_cifar10(root, train_tf, test_tf, download, datasets.CIFAR100)


def load_flowers102(root: Path, train_tf: Transform, test_tf: Transform, download: bool,
                    dataset_cls: type = datasets.Flowers102) -> tuple[Dataset, Dataset]:
    """Flowers102: train and val together for training, test for evaluation."""
    _require_scipy("Flowers102")
    train = ConcatDataset([
        dataset_cls(root, split=split, transform=train_tf, download=download)
        for split in ("train", "val")])
    return train, dataset_cls(root, split="test", transform=test_tf, download=download)


def load_pets(root: Path, train_tf: Transform, test_tf: Transform,
              download: bool) -> tuple[Dataset, Dataset]:
    """Oxford-IIIT Pets, 37 breeds: ``trainval`` / ``test``."""
    def split(name, tf):
        return datasets.OxfordIIITPet(root, split=name, target_types="category",
                                      transform=tf, download=download)
    return split("trainval", train_tf), split("test", test_tf)


def load_aircraft(root: Path, train_tf: Transform, test_tf: Transform,
                  download: bool) -> tuple[Dataset, Dataset]:
    """FGVC-Aircraft, 100 variants: ``trainval`` / ``test``."""
    def split(name, tf):
        return datasets.FGVCAircraft(root, split=name, annotation_level="variant",
                                     transform=tf, download=download)
    return split("trainval", train_tf), split("test", test_tf)


def load_cars(root: Path, train_tf: Transform, test_tf: Transform,
              download: bool) -> tuple[Dataset, Dataset]:
    """Stanford Cars, 196 models: ``train`` / ``test``; cannot be downloaded."""
    if download:
        raise ValueError(
            "Stanford Cars cannot be downloaded: its original URL is broken upstream "
            "(torchvision's StanfordCars.download() refuses as well). "
            f"Place the files by hand under {root / 'stanford_cars'}. {CARS_LAYOUT}")
    _require_scipy("Stanford Cars")
    return (datasets.StanfordCars(root, split="train", transform=train_tf),
            datasets.StanfordCars(root, split="test", transform=test_tf))


def load_food101(root: Path, train_tf: Transform, test_tf: Transform,
                 download: bool) -> tuple[Dataset, Dataset]:
    """Food-101: ``train`` (75,750) / ``test`` (25,250) from ``meta/*.json``."""
    def split(name, tf):
        return datasets.Food101(root, split=name, transform=tf, download=download)
    return split("train", train_tf), split("test", test_tf)


def load_cub200(root: Path, train_tf: Transform, test_tf: Transform,
                download: bool) -> tuple[Dataset, Dataset]:
    """CUB-200-2011 with the official split file."""
    return (CUB200(root, train=True, transform=train_tf, download=download),
            CUB200(root, train=False, transform=test_tf))


def load_offline_source(root: Path, train_tf: Transform, test_tf: Transform, download: bool):
    """The offline source task (bundled; ``root`` and ``download`` are not used)."""
    return load_offline(OFFLINE_SOURCE_CLASSES, train_tf, test_tf)


def load_offline_target(root: Path, train_tf: Transform, test_tf: Transform, download: bool):
    """The offline target task (bundled; ``root`` and ``download`` are not used)."""
    return load_offline(OFFLINE_TARGET_CLASSES, train_tf, test_tf)


# --------------------------------------------------------------------------
# Registry: the facts live in mobiletl_edu.choices.DATASETS (no torch needed)
# --------------------------------------------------------------------------
def dataset_names() -> list[str]:
    """Every name accepted by :func:`build_datasets`."""
    return list(DATASET_NAMES)


def _spec(name: str) -> DatasetInfo:
    check_choice("dataset", name, DATASET_NAMES)
    return DATASETS[name]


def recipe(name: str) -> dict[str, float]:
    """TinyTL's initial learning rate and label smoothing for ``name`` (your own data, ``folder`` or
    ``custom``: CIFAR's, a starting point)."""
    spec = _spec(FOLDER_DATASET if name == CUSTOM_DATASET else name)
    return {"lr": spec.lr, "label_smoothing": spec.label_smoothing}


def _how_to_get(spec: DatasetInfo) -> str:
    if not spec.downloadable:
        return spec.manual_steps
    return ("Pass --download (download=True) to fetch it, or place it manually: "
            + spec.manual_steps)


def require_dataset(name: str, root: str | Path, download: bool = False) -> None:
    """FileNotFoundError, with how to get it, when ``name`` is neither on disk nor to be downloaded."""
    spec = _spec(name)
    if spec.folder is not None and not (download and spec.downloadable):
        _require_local(name, spec, Path(root).expanduser())


def _require_local(name: str, spec: DatasetInfo, root: Path) -> None:
    """Fail early, with instructions, when a dataset's folder is absent."""
    path = root / spec.folder
    if not path.is_dir():
        raise FileNotFoundError(
            f"dataset {name!r} not found: looked for {path}. {_how_to_get(spec)}")


NETWORK_ERRORS = (URLError, HTTPException, ConnectionError, TimeoutError, socket.gaierror)


def download_failed(what: str, error: BaseException, manual: str) -> ValueError:
    """One message for a download that could not reach its server: why, and how to place files by hand."""
    reason = " ".join(str(getattr(error, "reason", error)).split()) or type(error).__name__
    return ValueError(f"cannot download {what} ({reason}): this machine looks offline, or the server "
                      f"refused. Place the files by hand instead: {manual}")


def remove_new_empty_folders(path: Path, existed: Path) -> None:
    """Remove the empty folders from ``path`` up to, not including, ``existed`` (a failed download's)."""
    while path != existed and existed in path.parents:
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        elif path.exists():
            return
        path = path.parent


def build_datasets(name: str, root: str | Path, resolution: int = 224, download: bool = False,
                   strict_data: bool = False) -> tuple[Dataset, Dataset, int]:
    """Return ``(train_ds, test_ds, num_classes)`` with TinyTL's transforms.

    ``root`` is the folder that holds (or will receive) the dataset's own sub-folder; the
    bundled offline tasks ignore it, the ``folder`` dataset reads its class folders there.
    Nothing is downloaded unless ``download`` is true; a download that cannot reach its
    server is a ValueError saying how to place the files by hand, and leaves no new folder.
    ``strict_data``: an unreadable image of the ``folder`` dataset is an error, not a warning.
    """
    spec = _spec(name)
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    root = Path(root).expanduser()
    if spec.folder is not None and not download:
        _require_local(name, spec, root)
    loader = globals()[spec.loader]  # the load_* function of this module that spec names
    options = {"strict": strict_data} if name == FOLDER_DATASET else {}
    target = root / (spec.folder or "")
    existed = next(p for p in (target, *target.parents) if p.exists())
    try:
        train_ds, test_ds = loader(root, train_transform(resolution), test_transform(resolution), download,
                                   **options)
    except NETWORK_ERRORS as err:
        remove_new_empty_folders(target, existed)
        raise download_failed(f"dataset {name!r}", err, f"{spec.manual_steps} (under {target})") from err
    except RuntimeError as err:  # torchvision's "not found or corrupted"
        if spec.folder is None:
            raise
        raise FileNotFoundError(
            f"dataset {name!r} in {root / spec.folder} is incomplete or corrupted "
            f"({err}). {_how_to_get(spec)}") from err
    return train_ds, test_ds, spec.num_classes or len(train_ds.classes)
