"""The model zoo: one file per family, each builder registered by name."""

from dynets.models import (
    dynamic_params,  # noqa: F401
    moe_transformer,  # noqa: F401
    msdnet,  # noqa: F401
    resnet,  # noqa: F401
    rnn,  # noqa: F401
    routing,  # noqa: F401
    skipnet,  # noqa: F401
    slimmable,  # noqa: F401
)
from dynets.spatial import glance, halting, merging, token_pruning  # noqa: F401  (vit_tiny, spatial zoo)
