"""Input-adaptive quantization: int8 early blocks with a per-input fall-back to fp32."""

from dynets.quant.adaptive import (
    AdaptivePrecisionNetwork,
    quantize_blocks,
    quantize_early_exit,
    replay_int8_acceptance,
)

__all__ = ["AdaptivePrecisionNetwork", "quantize_blocks", "quantize_early_exit", "replay_int8_acceptance"]
