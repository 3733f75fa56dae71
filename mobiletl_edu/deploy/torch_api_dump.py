"""Print, as JSON, the torch API that the interpreter running this script has.

Run once in the Python 3.6 + torch 1.10.1 stack to make ``torch110_api.json``, the allow-list
that ``apicheck`` holds the device runner to (no torch API newer than the Jetson Nano's)::

    python -m mobiletl_edu.deploy.stacks build nano-py36
    $(python -m mobiletl_edu.deploy.stacks where nano-py36)/bin/python \\
        mobiletl_edu/deploy/torch_api_dump.py > mobiletl_edu/deploy/torch110_api.json

Python 3.6-safe on purpose; it imports nothing from the package.
"""
import importlib
import inspect
import json
import sys

import torch

MODULES = ("torch", "torch.nn", "torch.nn.functional", "torch.nn.grad", "torch.nn.init", "torch.autograd",
           "torch.optim", "torch.optim.lr_scheduler", "torch.cuda", "torch.backends", "torch.backends.cudnn",
           "torch.utils", "torch.utils.data")
# classes whose members a runner reaches through its own objects (a tensor, a module, an optimizer...)
CLASSES = ("torch.Tensor", "torch.nn.Module", "torch.nn.Parameter", "torch.optim.Optimizer", "torch.optim.Adam",
           "torch.optim.lr_scheduler.CosineAnnealingLR", "torch.Generator", "torch.device", "torch.dtype",
           "torch.Size", "torch.autograd.Function", "torch.autograd.function.BackwardCFunction",
           "torch.nn.Conv2d", "torch.nn.Linear", "torch.nn.BatchNorm2d", "torch.nn.Dropout")


def resolve(dotted):
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            obj = getattr(obj, part)
        return obj
    raise ImportError(dotted)


def parameters(obj):
    """Parameter names of a Python-level callable, or None where Python cannot see them."""
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    return [p.name if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) else "*" for p in signature.parameters.values()]


def main():
    names, members, signatures = set(), set(), {}
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        names.add(module_name)
        # dir(type(module)): torch.backends.cudnn is a module subclass with properties (benchmark)
        for attr in set(dir(module)) | set(dir(type(module))):
            if attr.startswith("__") and attr != "__version__":
                continue
            qualified = module_name + "." + attr
            names.add(qualified)
            obj = getattr(module, attr, None)
            if callable(obj):
                params = parameters(obj)
                if params is not None:
                    signatures[qualified] = params
    classes = [(name, resolve(name)) for name in CLASSES]
    classes.append(("torch.Tensor.topk()", type(torch.zeros(2).topk(1))))  # (values, indices)
    for class_name, cls in classes:
        names.add(class_name)
        for attr in dir(cls):
            members.add(attr)
            names.add(class_name + "." + attr)
    print(json.dumps({"torch": torch.__version__, "python": sys.version.split()[0], "names": sorted(names),
                      "members": sorted(members), "signatures": signatures}, indent=0, sort_keys=True))


if __name__ == "__main__":
    main()
