"""ViT, R+ViT hybrids and MLP-Mixer as flax.linen modules, built by name.

  model = get_model('ViT-B_16', num_classes=10)
  params = model.init({'params': key}, images, train=False)['params']
  logits = model.apply({'params': params}, images, train=False)
"""

from mixer_vit.models.mixer import MlpMixer
from mixer_vit.models.registry import build_model
from mixer_vit.models.registry import get_model
from mixer_vit.models.registry import get_model_config
from mixer_vit.models.registry import list_models
from mixer_vit.models.registry import num_layers
from mixer_vit.models.registry import pixels_per_token
from mixer_vit.models.registry import resolve_name
from mixer_vit.models.registry import token_grid
from mixer_vit.models.registry import validate_config
from mixer_vit.models.vit import VisionTransformer

__all__ = [
    'MlpMixer', 'VisionTransformer', 'build_model', 'get_model',
    'get_model_config', 'list_models', 'num_layers', 'pixels_per_token',
    'resolve_name', 'token_grid', 'validate_config',
]
