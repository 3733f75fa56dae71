"""mobiletl-edu: MobileTL (Chiang et al., AAAI 2023) memory-efficient transfer learning."""
__version__ = "0.1.0"

from .methods import METHODS, prepare, summary  # noqa: E402
from .models import MODEL_NAMES, build_model  # noqa: E402
from .profiler import profile, profile_model  # noqa: E402

__all__ = ["METHODS", "MODEL_NAMES", "build_model", "prepare", "profile", "profile_model", "summary"]
