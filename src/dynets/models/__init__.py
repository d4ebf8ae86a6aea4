"""The model zoo: one file per family, each builder registered by name."""

from dynets.models import (
    msdnet,  # noqa: F401
    resnet,  # noqa: F401
)
