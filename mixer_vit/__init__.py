"""mixer_vit: Vision Transformer and MLP-Mixer in JAX/Flax, compatible with the released checkpoints."""

import os

# TensorFlow serves only the input pipeline here: keep its C++ start-up messages out of every
# command's output unless the user asked for a log level. It must be set before TF is imported.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

__version__ = '0.1.0'
