"""The names the package accepts: models, methods, datasets, precisions, conventions, formats.

This module imports nothing heavy (no torch), so the command line can list every choice in
``--help`` at once. The modules that do the work import their lists from here: each list
exists once.
"""
from __future__ import annotations

from dataclasses import dataclass

# ---------------------------------------------------------------------------------------------
# Models and fine-tuning methods
# ---------------------------------------------------------------------------------------------
MODEL_NAMES = ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "resnet18", "resnet50",
               "proxyless_mobile")

# MobileTL and its BatchNorm ablations (Figure 6): method -> which BNs of a trained block stay
# full BNs (scale and shift train); every other BN of the block keeps only its shift.
MOBILETL_FULL_BN = {
    "mobiletl": frozenset({"project", "last", "shortcut"}),  # = MobileTL-proj-bn, the paper's choice
    "mobiletl-exp-bn": frozenset({"expand"}),
    "mobiletl-dw-bn": frozenset({"depthwise"}),
    "mobiletl-all-bn-shift": frozenset(),
    "mobiletl-all-bn": frozenset({"expand", "depthwise", "project", "intermediate", "last", "shortcut"}),
}
GLOBAL_METHODS = ("ft-all", "ft-last", "ft-bn", "ft-bias")
SINGLE_BLOCK_METHODS = ("ft-blocks", *MOBILETL_FULL_BN, "remove-se", "relu")  # also apply to one block
BLOCK_METHODS = (*SINGLE_BLOCK_METHODS, "tinytl-lite-residual", "mobiletl+tinytl-lite-residual")
METHODS = GLOBAL_METHODS + BLOCK_METHODS
FROZEN_BOTTOM_METHODS = ("ft-last", *BLOCK_METHODS)  # their frozen bottom can run in chunks (bottom_chunk)
DEFAULT_BLOCKS = 3  # block-wise methods train the top 3 blocks unless told otherwise

PRECISIONS = ("int8", "float")  # how frozen conv / linear weights are stored
WEIGHT_NAMES = ("imagenet", "source", "none")  # --weights also takes a file or a run folder

# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------
CARS_LAYOUT = ("Expected: devkit/cars_meta.mat, devkit/cars_train_annos.mat, "
               "cars_test_annos_withlabels.mat, cars_train/ and cars_test/.")


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset: the ``mobiletl_edu.data`` function that loads it, its label count (None:
    read from the data) and TinyTL's recipe for it (learning rate, label smoothing)."""

    loader: str
    num_classes: int | None
    lr: float
    label_smoothing: float
    folder: str | None = None  # sub-folder of the data root holding the data; None: bundled
    manual_steps: str = ""  # how to place the data by hand
    downloadable: bool = True


DEFAULT_DATASET = "offline-target"
SOURCE_DATASET = "offline-source"
FOLDER_DATASET = "folder"
OFFLINE_DATASETS = (SOURCE_DATASET, DEFAULT_DATASET)

DATASETS = {
    "cifar10": DatasetInfo("load_cifar10", 10, 3e-4, 0.1, "cifar-10-batches-py",
                           "extract cifar-10-python.tar.gz into the data root."),
    "cifar100": DatasetInfo("load_cifar100", 100, 3e-4, 0.1, "cifar-100-python",
                            "extract cifar-100-python.tar.gz into the data root."),
    "flowers102": DatasetInfo("load_flowers102", 102, 2e-4, 0.7, "flowers-102",
                              "put jpg/ (from 102flowers.tgz), imagelabels.mat and setid.mat in that folder."),
    "pets": DatasetInfo("load_pets", 37, 0.5e-4, 0.7, "oxford-iiit-pet",
                        "extract images.tar.gz and annotations.tar.gz into that folder."),
    "aircraft": DatasetInfo("load_aircraft", 100, 16e-4, 0.7, "fgvc-aircraft-2013b",
                            "extract fgvc-aircraft-2013b.tar.gz into the data root."),
    "cars": DatasetInfo("load_cars", 196, 8e-4, 0.7, "stanford_cars",
                        "Stanford Cars cannot be downloaded (its original URL is broken upstream); copy the "
                        "original release into that folder by hand. " + CARS_LAYOUT, downloadable=False),
    "food101": DatasetInfo("load_food101", 101, 2e-4, 0.1, "food-101",
                           "extract food-101.tar.gz into the data root."),
    "cub200": DatasetInfo("load_cub200", 200, 6e-4, 0.7, "CUB_200_2011",
                          "extract the official CUB_200_2011.tgz into the data root."),
    # Not TinyTL's: our own settings for the bundled demo tasks, checked with MobileNetV3-Small
    # at 32 px, Adam, batch 32 and a cosine schedule.
    SOURCE_DATASET: DatasetInfo("load_offline_source", 5, 2e-3, 0.1),
    DEFAULT_DATASET: DatasetInfo("load_offline_target", 5, 2e-3, 0.1),
    # Your own images: one sub-folder per class; CIFAR's recipe as a starting point.
    FOLDER_DATASET: DatasetInfo("load_folder", None, 3e-4, 0.1, "",
                                "one sub-folder of images per class, directly under the data root or under "
                                "its train/ and val/", downloadable=False),
}
DATASET_NAMES = tuple(DATASETS)
# Datasets handed to train() as Python objects are recorded under this name, with the folder recipe.
CUSTOM_DATASET = "custom"

# ---------------------------------------------------------------------------------------------
# Profiling
# ---------------------------------------------------------------------------------------------
BLOCK_KINDS = ("conv", "mbv2", "mbv3")  # Table 1 / Figure 1 blocks


@dataclass(frozen=True)
class Convention:
    """How bytes and FLOPs are counted.

    Make a variant with ``dataclasses.replace(c, field=...)``.
    """

    name: str
    # "pytorch" or "paper": which column of RULES says what a layer keeps
    storage: str
    # "paper" storage: bits per element an exact ReLU6 keeps
    relu6_mask_bits: int = 2
    # bits per frozen parameter; None: as really stored
    frozen_param_bits: int | None = None
    # eager PyTorch on CPU keeps a float mask (CUDA: 8 bits, a bool)
    dropout_mask_bits: int = 32
    # a multiply-accumulate is two operations of one FLOP each
    flops_per_mac: int = 2
    # count the input gradient of the lowest trained layer
    lowest_input_gradient: bool = False
    # the paper's peak: BN and activations overwrite their input
    elementwise_in_place: bool = False
    # Table 1's MB: 0.306 MB = (conv input + BN input + mask) / 1e6
    bytes_per_mb: int = 10**6
    summary: str = ""


CONVENTIONS = {
    "pytorch": Convention(
        "pytorch", "pytorch",
        summary="what eager PyTorch with this package's operators keeps: agrees with measurement"),
    "paper": Convention(
        "paper", "paper", relu6_mask_bits=2, frozen_param_bits=8, lowest_input_gradient=True,
        elementwise_in_place=True,
        summary="TinyTL-style, exact ReLU6 as 2 bits (Table 2): Table 1, Figures 1 and 4, Table 3"),
    "paper-relu6-1bit": Convention(
        "paper-relu6-1bit", "paper", relu6_mask_bits=1, frozen_param_bits=8, lowest_input_gradient=True,
        elementwise_in_place=True,
        summary="'paper' with an exact ReLU6 as 1 bit, as TinyTL: Table 1 exactly, not Figure 1"),
}

# ---------------------------------------------------------------------------------------------
# Running and using what was trained
# ---------------------------------------------------------------------------------------------
PRETRAIN_OUT = "runs/source/offline_source_mobilenet_v3_small.pt"  # where `pretrain` writes by default
LAUNCHERS = ("local", "submitit")  # how an experiment grid runs its runs
EXPORT_FORMATS = ("torchscript", "onnx", "state-dict")

# ---------------------------------------------------------------------------------------------
# Training on the device (mobiletl_edu.deploy)
# ---------------------------------------------------------------------------------------------
DEVICE_NAMES = ("pi4", "nano", "host")  # device profiles: Raspberry Pi 4, Jetson Nano, this machine
TABLE6_METHODS = ("ft-all", "ft-bn", "ft-bias", "mobiletl")  # the methods the paper's Table 6 times


def check_choice(name: str, value, choices) -> None:
    """ValueError naming ``value`` and the valid ``choices`` when it is not one of them."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid choices: {', '.join(map(str, choices))}")
