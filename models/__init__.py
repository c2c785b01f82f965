"""unusual's detector core: models, features, thresholds, bundles and the Scorer.

Pure PyTorch + numpy + pyarrow + fsspec; never imports Ray.
"""

__version__ = "0.1.0"

from models.bundle import Bundle, load_bundle, save_bundle  # noqa: E402
from models.detector import Detector  # noqa: E402
from models.errors import BundleError, BundleVersionError, NotFittedError, SchemaError  # noqa: E402
from models.registry import kinds  # noqa: E402
from models.scorer import Scorer  # noqa: E402

__all__ = [
    "Bundle",
    "BundleError",
    "BundleVersionError",
    "Detector",
    "NotFittedError",
    "SchemaError",
    "Scorer",
    "kinds",
    "load_bundle",
    "save_bundle",
]
