"""Offline tests for mobiletl_edu.data.

Every benchmark gets a tiny fixture written in its real on-disk layout under
tmp_path; nothing here touches the network.

CIFAR and Flowers102: torchvision compares the MD5 of each metadata/batch
file with the checksum of the official release, which a fixture cannot match.
The tests therefore subclass the torchvision class and give the subclass the
checksums of the fixture files (torchvision's own CIFAR100 is written the same
way, as a CIFAR10 subclass with other file lists). The integrity check still
runs, against our files, and torchvision itself is left untouched.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import datasets

from mobiletl_edu import data

RES = 16  # small crops keep the fixture tests fast
TINYTL_RECIPES = {
    "aircraft": (16e-4, 0.7), "cars": (8e-4, 0.7), "cifar10": (3e-4, 0.1),
    "cifar100": (3e-4, 0.1), "cub200": (6e-4, 0.7), "flowers102": (2e-4, 0.7),
    "food101": (2e-4, 0.1), "pets": (0.5e-4, 0.7),
}
BENCHMARKS = sorted(TINYTL_RECIPES)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def write_jpg(path: Path, shade: int = 128, size=(24, 20)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (shade, 255 - shade, 64)).save(path)


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def labels_of(dataset) -> list[int]:
    return [int(dataset[i][1]) for i in range(len(dataset))]


def check_items(dataset) -> None:
    image, label = dataset[0]
    assert image.shape == (3, RES, RES)
    assert image.dtype == torch.float32
    assert isinstance(label, int)


def tiny_transforms():
    return data.train_transform(RES), data.test_transform(RES)


# --------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (pickled batches, MD5-checked by torchvision)
# --------------------------------------------------------------------------
def pickle_to(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj))


def cifar_batch(labels: list[int], label_key: str) -> dict:
    pixels = np.random.default_rng(0).integers(0, 256, (len(labels), 3 * 32 * 32), dtype=np.uint8)
    return {"data": pixels, label_key: labels}


def fixture_dataset_class(base_cls, base: Path, train_files, test_files, meta: dict):
    """A subclass of ``base_cls`` that knows the checksums of our fixture files."""
    attrs = {
        "train_list": [[name, md5(base / name)] for name in train_files],
        "test_list": [[name, md5(base / name)] for name in test_files],
        "meta": {**meta, "md5": md5(base / meta["filename"])},
    }
    return type(f"Fixture{base_cls.__name__}", (base_cls,), attrs)


def make_cifar10(root: Path):
    base = root / "cifar-10-batches-py"
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    for i, name in enumerate(train_files):
        pickle_to(base / name, cifar_batch([i, (i + 1) % 10], "labels"))
    pickle_to(base / "test_batch", cifar_batch([7, 8, 9], "labels"))
    pickle_to(base / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    meta = {"filename": "batches.meta", "key": "label_names"}
    return fixture_dataset_class(datasets.CIFAR10, base, train_files, ["test_batch"], meta)


def make_cifar100(root: Path):
    base = root / "cifar-100-python"
    pickle_to(base / "train", cifar_batch([0, 42, 99, 5], "fine_labels"))
    pickle_to(base / "test", cifar_batch([13, 77], "fine_labels"))
    pickle_to(base / "meta", {"fine_label_names": [f"f{i}" for i in range(100)]})
    meta = {"filename": "meta", "key": "fine_label_names"}
    return fixture_dataset_class(datasets.CIFAR100, base, ["train"], ["test"], meta)


def test_cifar10_fixture(tmp_path):
    fixture_cls = make_cifar10(tmp_path)
    train, test = data.load_cifar10(tmp_path, *tiny_transforms(), False, dataset_cls=fixture_cls)
    assert labels_of(train) == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5]
    assert labels_of(test) == [7, 8, 9]
    check_items(train)
    check_items(test)


def test_cifar100_fixture(tmp_path):
    fixture_cls = make_cifar100(tmp_path)
    train, test = data.load_cifar10(tmp_path, *tiny_transforms(), False, dataset_cls=fixture_cls)
    assert labels_of(train) == [0, 42, 99, 5]
    assert labels_of(test) == [13, 77]
    check_items(test)


def test_cifar10_checksum_failure_is_reported_as_corrupt(tmp_path):
    make_cifar10(tmp_path)  # files exist but cannot match the official MD5s
    with pytest.raises(FileNotFoundError, match="incomplete or corrupted") as err:
        data.build_datasets("cifar10", tmp_path, RES)
    assert str(tmp_path / "cifar-10-batches-py") in str(err.value)


# --------------------------------------------------------------------------
# Flowers102 (jpg/ + imagelabels.mat + setid.mat, MD5-checked by torchvision)
# --------------------------------------------------------------------------
def make_flowers102(root: Path):
    savemat = pytest.importorskip("scipy.io").savemat
    base = root / "flowers-102"
    labels = [1, 5, 102, 7, 3, 2]  # 1-based, image_00001 .. image_00006
    for image_id in range(1, len(labels) + 1):
        write_jpg(base / "jpg" / f"image_{image_id:05d}.jpg", shade=20 * image_id)
    savemat(base / "imagelabels.mat", {"labels": np.array([labels])})
    savemat(base / "setid.mat", {"trnid": np.array([[1, 2]]), "valid": np.array([[3, 4]]),
                                 "tstid": np.array([[5, 6]])})
    file_dict = {
        **datasets.Flowers102._file_dict,
        "label": ("imagelabels.mat", md5(base / "imagelabels.mat")),
        "setid": ("setid.mat", md5(base / "setid.mat")),
    }
    return type("FixtureFlowers102", (datasets.Flowers102,), {"_file_dict": file_dict})


def test_flowers102_fixture_trains_on_train_plus_val(tmp_path):
    fixture_cls = make_flowers102(tmp_path)
    train, test = data.load_flowers102(tmp_path, *tiny_transforms(), False,
                                       dataset_cls=fixture_cls)
    assert labels_of(train) == [0, 4, 101, 6]
    assert labels_of(test) == [2, 1]
    check_items(train)


# --------------------------------------------------------------------------
# Oxford-IIIT Pets (images/ + annotations/{trainval,test}.txt)
# --------------------------------------------------------------------------
def make_pets(root: Path) -> None:
    base = root / "oxford-iiit-pet"
    rows = {  # image id, breed id (1-based), species (1 cat, 2 dog)
        "trainval": [("Abyssinian_1", 1, 1), ("beagle_3", 11, 2), ("yorkshire_terrier_9", 37, 2)],
        "test": [("Bengal_2", 6, 1), ("pug_4", 29, 2)],
    }
    for split, entries in rows.items():
        lines = []
        for image_id, class_id, species in entries:
            write_jpg(base / "images" / f"{image_id}.jpg")
            lines.append(f"{image_id} {class_id} {species} 1")
        (base / "annotations").mkdir(parents=True, exist_ok=True)
        (base / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")


def test_pets_fixture(tmp_path):
    make_pets(tmp_path)
    train, test, num_classes = data.build_datasets("pets", tmp_path, RES)
    assert num_classes == 37
    assert labels_of(train) == [0, 10, 36]
    assert labels_of(test) == [5, 28]
    check_items(train)


# --------------------------------------------------------------------------
# FGVC-Aircraft (fgvc-aircraft-2013b/data/...)
# --------------------------------------------------------------------------
def make_aircraft(root: Path) -> None:
    folder = root / "fgvc-aircraft-2013b" / "data"
    variants = ["707-320", "A300B4", "Cessna 172", "F-16A/B"]
    folder.mkdir(parents=True)
    (folder / "variants.txt").write_text("\n".join(variants) + "\n")
    splits = {"trainval": [("0034309", "A300B4"), ("0056978", "F-16A/B"), ("1025794", "707-320")],
              "test": [("0062765", "Cessna 172")]}
    for split, entries in splits.items():
        for image_name, _ in entries:
            write_jpg(folder / "images" / f"{image_name}.jpg")
        lines = [f"{image_name} {variant}" for image_name, variant in entries]
        (folder / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")


def test_aircraft_fixture(tmp_path):
    make_aircraft(tmp_path)
    train, test, num_classes = data.build_datasets("aircraft", tmp_path, RES)
    assert num_classes == 100
    assert labels_of(train) == [1, 3, 0]
    assert labels_of(test) == [2]
    check_items(test)


# --------------------------------------------------------------------------
# Stanford Cars (devkit/*.mat + cars_train/ + cars_test/)
# --------------------------------------------------------------------------
def cars_annotations(entries: list[tuple[str, int]]) -> np.ndarray:
    """A MATLAB struct array with the fields torchvision reads."""
    table = np.zeros(len(entries), dtype=[("fname", object), ("class", object)])
    for row, (fname, class_id) in enumerate(entries):
        table[row] = (fname, class_id)
    return table


def make_cars(root: Path) -> None:
    savemat = pytest.importorskip("scipy.io").savemat
    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    class_names = np.array([f"car model {i}" for i in range(1, 197)], dtype=object)
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": class_names})
    train = [("00001.jpg", 1), ("00002.jpg", 196), ("00003.jpg", 50)]
    test = [("00001.jpg", 12), ("00002.jpg", 3)]
    savemat(base / "devkit" / "cars_train_annos.mat", {"annotations": cars_annotations(train)})
    savemat(base / "cars_test_annos_withlabels.mat", {"annotations": cars_annotations(test)})
    for folder, entries in (("cars_train", train), ("cars_test", test)):
        for fname, _ in entries:
            write_jpg(base / folder / fname)


def test_cars_fixture(tmp_path):
    make_cars(tmp_path)
    train, test, num_classes = data.build_datasets("cars", tmp_path, RES)
    assert num_classes == 196
    assert labels_of(train) == [0, 195, 49]
    assert labels_of(test) == [11, 2]
    check_items(train)


def test_cars_download_explains_that_upstream_is_broken(tmp_path):
    with pytest.raises(ValueError, match="broken upstream"):
        data.build_datasets("cars", tmp_path, RES, download=True)


# --------------------------------------------------------------------------
# Food-101 (food-101/meta/{train,test}.json + images/<class>/<id>.jpg)
# --------------------------------------------------------------------------
def make_food101(root: Path) -> None:
    base = root / "food-101"
    splits = {
        "train": {"waffles": ["waffles/7"], "apple_pie": ["apple_pie/101", "apple_pie/102"],
                  "sushi": ["sushi/9"]},
        "test": {"waffles": ["waffles/8"], "apple_pie": ["apple_pie/3"], "sushi": ["sushi/55"]},
    }
    (base / "meta").mkdir(parents=True)
    for split, metadata in splits.items():
        (base / "meta" / f"{split}.json").write_text(json.dumps(metadata))
        for paths in metadata.values():
            for rel_path in paths:
                write_jpg(base / "images" / f"{rel_path}.jpg")


def test_food101_fixture(tmp_path):
    make_food101(tmp_path)
    train, test, num_classes = data.build_datasets("food101", tmp_path, RES)
    assert num_classes == 101
    # classes are numbered alphabetically: apple_pie 0, sushi 1, waffles 2
    assert labels_of(train) == [2, 0, 0, 1]
    assert labels_of(test) == [2, 0, 1]
    check_items(train)


# --------------------------------------------------------------------------
# CUB-200-2011 (our own loader)
# --------------------------------------------------------------------------
def make_cub200(root: Path) -> None:
    base = root / "CUB_200_2011"
    classes = {1: "001.Black_footed_Albatross", 2: "002.Laysan_Albatross",
               200: "200.Common_Yellowthroat"}
    images = {1: (1, 1), 2: (1, 0), 3: (2, 1), 4: (200, 0), 5: (200, 1)}  # id: (class, is_train)
    base.mkdir(parents=True)
    (base / "classes.txt").write_text(
        "".join(f"{class_id} {name}\n" for class_id, name in classes.items()))
    paths, labels, split = [], [], []
    for image_id, (class_id, is_train) in images.items():
        rel_path = f"{classes[class_id]}/bird_{image_id:04d}.jpg"
        write_jpg(base / "images" / rel_path, shade=40 * image_id)
        paths.append(f"{image_id} {rel_path}\n")
        labels.append(f"{image_id} {class_id}\n")
        split.append(f"{image_id} {is_train}\n")
    (base / "images.txt").write_text("".join(paths))
    (base / "image_class_labels.txt").write_text("".join(labels))
    (base / "train_test_split.txt").write_text("".join(split))


def test_cub200_fixture(tmp_path):
    make_cub200(tmp_path)
    train, test, num_classes = data.build_datasets("cub200", tmp_path, RES)
    assert num_classes == 200
    assert labels_of(train) == [0, 1, 199]
    assert labels_of(test) == [0, 199]
    assert train.classes[-1] == "200.Common_Yellowthroat"
    expected = tmp_path / "CUB_200_2011" / "images" / "002.Laysan_Albatross" / "bird_0003.jpg"
    assert train.samples[1][0] == expected
    check_items(test)


def test_cub200_class_reports_missing_metadata(tmp_path):
    (tmp_path / "CUB_200_2011").mkdir()
    with pytest.raises(FileNotFoundError, match="CUB_200_2011"):
        data.CUB200(tmp_path)


# --------------------------------------------------------------------------
# errors, registry, recipes
# --------------------------------------------------------------------------
@pytest.mark.parametrize("name", BENCHMARKS)
def test_missing_dataset_names_the_path_and_the_remedy(tmp_path, name):
    with pytest.raises(FileNotFoundError) as err:
        data.build_datasets(name, tmp_path / "empty", RES)
    message = str(err.value)
    assert str(tmp_path / "empty") in message
    if name == "cars":
        assert "broken upstream" in message
    else:
        assert "--download" in message and "manually" in message


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError) as err:
        data.build_datasets("imagenet-21k", ".")
    assert "'imagenet-21k'" in str(err.value)
    for name in data.dataset_names():
        assert name in str(err.value)
    with pytest.raises(ValueError, match="cifar10"):
        data.recipe("nope")


def test_registry_covers_the_paper_and_the_offline_tasks():
    names = data.dataset_names()
    assert set(BENCHMARKS) <= set(names)
    assert {data.SOURCE_DATASET, data.DEFAULT_DATASET} <= set(names)
    assert data.DEFAULT_DATASET in names


@pytest.mark.parametrize("name", BENCHMARKS)
def test_recipes_match_tinytl(name):
    lr, label_smoothing = TINYTL_RECIPES[name]
    assert data.recipe(name) == pytest.approx({"lr": lr, "label_smoothing": label_smoothing})


def test_rejects_non_positive_resolution():
    with pytest.raises(ValueError, match="resolution"):
        data.build_datasets(data.DEFAULT_DATASET, ".", resolution=0)


# --------------------------------------------------------------------------
# transforms
# --------------------------------------------------------------------------
@pytest.mark.parametrize("resolution", [32, 64, 224])
def test_transforms_produce_square_normalised_tensors(resolution):
    image = Image.new("RGB", (300, 200), (255, 255, 255))
    for transform in (data.train_transform(resolution), data.test_transform(resolution)):
        tensor = transform(image)
        assert tensor.shape == (3, resolution, resolution)
    white = data.test_transform(resolution)(image)[:, 0, 0]
    expected = (1 - torch.tensor(data.IMAGENET_MEAN)) / torch.tensor(data.IMAGENET_STD)
    assert torch.allclose(white, expected, atol=1e-5)


def test_test_transform_resizes_by_256_over_224():
    resize = data.test_transform(224).transforms[0]
    assert resize.size == 256
    assert data.test_transform(64).transforms[0].size == round(64 * 256 / 224)


def test_train_transform_uses_tinytl_crop_scale():
    crop = data.train_transform(224).transforms[0]
    assert crop.scale == (0.22, 1.0)


# --------------------------------------------------------------------------
# offline Fashion-MNIST tasks
# --------------------------------------------------------------------------
def test_offline_asset_is_small_and_bundled():
    assert data.OFFLINE_ASSET.is_file()
    assert data.OFFLINE_ASSET.stat().st_size < 4_000_000


@pytest.mark.parametrize("name", [data.SOURCE_DATASET, data.DEFAULT_DATASET])
def test_offline_tasks_load_without_any_root(tmp_path, name):
    train, test, num_classes = data.build_datasets(name, tmp_path / "never-created", 32)
    assert num_classes == 5
    assert (len(train), len(test)) == (2000, 750)
    assert sorted(set(train.targets)) == list(range(5))
    assert np.bincount(test.targets).tolist() == [150] * 5
    image, label = train[0]
    assert image.shape == (3, 32, 32) and 0 <= label < 5
    assert not (tmp_path / "never-created").exists()


def test_offline_source_and_target_are_disjoint():
    source, _, _ = data.build_datasets(data.SOURCE_DATASET, ".", 32)
    target, _, _ = data.build_datasets(data.DEFAULT_DATASET, ".", 32)
    assert not set(source.classes) & set(target.classes)
    source_images = {image.tobytes() for image in source.images}
    assert not any(image.tobytes() in source_images for image in target.images)


def test_offline_images_are_real_and_varied():
    train, _, _ = data.build_datasets(data.DEFAULT_DATASET, ".", 32)
    assert train.images.dtype == np.uint8 and train.images.shape[1:] == (28, 28)
    assert train.images.std() > 50  # real photos of garments, not blank arrays
    assert len({image.tobytes() for image in train.images}) == len(train)


# ---------------------------------------------------------------------------------------------
# Your own images: --dataset folder
# ---------------------------------------------------------------------------------------------
def _image_tree(root, per_class=5, broken=True):
    """Real JPEG and PNG files (Pillow), two classes; one truncated JPEG among the cats."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = (rng.random((24 + i, 30, 3)) * 120 + 100 * label).astype("uint8")
            Image.fromarray(pixels).save(root / name / f"{i}.{'jpg' if i % 2 else 'png'}")
    (root / "dog" / "notes.txt").write_text("not an image")
    if broken:
        whole = (root / "cat" / "1.jpg").read_bytes()
        (root / "cat" / "broken.jpg").write_bytes(whole[: len(whole) // 2])
    return root / "cat" / "broken.jpg"


def test_folder_dataset_reads_real_images_and_skips_a_truncated_one_by_name(tmp_path):
    broken = _image_tree(tmp_path)
    with pytest.warns(data.SkippedImageWarning, match=re.escape(str(broken))):
        train, test, num_classes = data.build_datasets("folder", tmp_path, 16)
    assert num_classes == 2 and train.classes == test.classes == ["cat", "dog"]
    files = [p for p, _ in train.samples + test.samples]
    assert len(files) == 10 and broken not in files and len(set(files)) == 10  # no image in both splits
    assert {label for _, label in test.samples} == {0, 1}  # every class is held out once at least
    assert train.skipped == [str(broken)]
    image, label = train[0]
    assert image.shape == (3, 16, 16) and label in (0, 1)
    again, _, _ = data.build_datasets("folder", tmp_path, 16)
    assert again.samples == train.samples  # the split is fixed (FOLDER_SPLIT_SEED), not the run's seed


def test_folder_dataset_uses_given_train_and_val_folders(tmp_path):
    _image_tree(tmp_path / "train", broken=False)
    _image_tree(tmp_path / "val", per_class=2, broken=False)
    train, test, _ = data.build_datasets("folder", tmp_path, 16)
    assert len(train) == 10 and len(test) == 4
    assert all("val" in str(path) for path, _ in test.samples)


def test_strict_data_stops_at_the_first_unreadable_image(tmp_path):
    broken = _image_tree(tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"unreadable image {broken}")):
        data.build_datasets("folder", tmp_path, 16, strict_data=True)


def test_cli_trains_on_a_folder_and_names_its_classes(tmp_path, capsys):
    from mobiletl_edu.cli import main
    _image_tree(tmp_path / "photos")
    command = ["train", "--dataset", "folder", "--data-root", str(tmp_path / "photos"), "--weights", "source",
               "--resolution", "32", "--epochs", "1", "--out", str(tmp_path / "run"), "--quiet"]
    assert main([*command, "--strict-data"]) == 2 and not (tmp_path / "run").exists()
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "broken.jpg" in error
    with pytest.warns(data.SkippedImageWarning, match="broken.jpg"):
        assert main(command) == 0
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["classes"] == ["cat", "dog"] and record["skipped_images"][0].endswith("broken.jpg")
