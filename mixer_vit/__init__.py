"""mixer_vit: Vision Transformer and MLP-Mixer in JAX/Flax, compatible with the released checkpoints."""

__version__ = "0.1.0"
