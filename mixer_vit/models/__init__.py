"""ViT, R+ViT hybrids and MLP-Mixer as flax.linen modules, built by name; loading checkpoints.

  config = get_model_config('ViT-B_16', num_classes=10)
  model = build_model(config)
  params = model.init({'params': key}, images, train=False)['params']
  logits = model.apply({'params': params}, images, train=False)
  logits, out = apply_with_intermediates(model, params, images)  # out['blocks'], ['attention']
  params = load_pretrained('ViT-B_16.npz', params, config)  # new head, resized posemb

Files: `registry.py` (names, configs, `build_model`), `vit.py` / `mixer.py` (each model and the
checkpoint adaptation it needs), `resnet.py` (the hybrids' stem), `common.py` (shared layers,
token grid, intermediates), `precision.py` (mixed precision: bfloat16 multiplies, float32 sums),
`loading.py` (`load_pretrained`, `load_params`), `augreg.py` (the AugReg release's file names).
"""

from mixer_vit.models.common import REMAT_POLICIES
from mixer_vit.models.common import apply_with_intermediates
from mixer_vit.models.geometry import pixels_per_token
from mixer_vit.models.geometry import token_grid
from mixer_vit.models.loading import image_size_from_params
from mixer_vit.models.loading import load_params
from mixer_vit.models.loading import load_pretrained
from mixer_vit.models.mixer import MlpMixer
from mixer_vit.models.registry import build_model
from mixer_vit.models.registry import get_model
from mixer_vit.models.registry import get_model_config
from mixer_vit.models.registry import list_models
from mixer_vit.models.registry import num_layers
from mixer_vit.models.registry import resolve_name
from mixer_vit.models.registry import validate_config
from mixer_vit.models.vit import VisionTransformer

__all__ = [
  'REMAT_POLICIES',
  'MlpMixer',
  'VisionTransformer',
  'apply_with_intermediates',
  'build_model',
  'get_model',
  'get_model_config',
  'image_size_from_params',
  'list_models',
  'load_params',
  'load_pretrained',
  'num_layers',
  'pixels_per_token',
  'resolve_name',
  'token_grid',
  'validate_config',
]
