"""Dynamic width: slimmable layers, channel and attention-head gating, mixture-of-experts (with expert
parallelism over torch.distributed). Import the submodules directly."""
