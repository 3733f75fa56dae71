"""mobiletl-edu: MobileTL (Chiang et al., AAAI 2023) memory-efficient transfer learning.

The names below are imported when first used (PEP 562), so ``import mobiletl_edu`` and the
command line's ``--help`` do not pay for importing torch.
"""
__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "METHODS": "choices",
    "MODEL_NAMES": "choices",
    "build_model": "models",
    "prepare": "methods",
    "summary": "methods",
    "profile": "profiler",
    "profile_model": "profiler",
    "load_trained": "train",
    "plain_model": "export",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mobiletl_edu' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])
