"""The model zoo: one file per family, each builder registered by name."""

from dynets.models import resnet  # noqa: F401
