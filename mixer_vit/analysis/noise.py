"""Robustness to band-limited noise: accuracy drop per frequency band (Park & Kim 2022, claim 3:
ViTs are robust to high-frequency noise, ResNets to low-frequency noise).

The normalised frequency of an FFT bin is max(|f_rows|, |f_cols|) / 0.5 * pi, from 0 to pi. Band k
of 10 covers [0.1 k pi, 0.1 (k + 1) pi) (the last one includes pi). Noise of band k: complex
Gaussian Fourier coefficients on the band's bins, each channel independently, back to pixels
(real part; the band is symmetric under f -> -f, so the real part stays in the band), scaled so
that every image's noise has the same L2 norm, `rms` x sqrt(H W C): the same energy in every
band. It is added to the preprocessed images (values in [-1, 1]; not clipped). The drop is the
clean accuracy minus the accuracy with that noise, over the same examples and one noise draw per
example and band (`seed`). A band without FFT bins (small images) is reported as null.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixer_vit.analysis import common

NUM_BANDS = 10


def frequency_radius(height: int, width: int) -> np.ndarray:
  """(H, W) normalised frequency of each FFT bin, in units of pi (0 .. 1)."""
  fh = np.abs(np.fft.fftfreq(height)) / 0.5
  fw = np.abs(np.fft.fftfreq(width)) / 0.5
  return np.maximum(fh[:, None], fw[None, :])


def band_mask(height: int, width: int, band: int, num_bands: int = NUM_BANDS) -> np.ndarray:
  """(H, W) bool: the FFT bins of `band` (module docstring)."""
  radius = frequency_radius(height, width)
  low, high = band / num_bands, (band + 1) / num_bands
  if band == num_bands - 1:
    return (radius >= low) & (radius <= 1.0 + 1e-9)
  return (radius >= low - 1e-9) & (radius < high - 1e-9)


def band_noise(key: jax.Array, shape: tuple[int, ...], band: int, norm: float) -> jax.Array:
  """(B, H, W, C) noise restricted to `band`, each example of L2 norm `norm`."""
  _, h, w, _ = shape
  return masked_noise(key, shape, jnp.asarray(band_mask(h, w, band)), norm)


def masked_noise(key: jax.Array, shape: tuple[int, ...], mask: jax.Array, norm) -> jax.Array:
  """`band_noise` on the FFT bins where the (H, W) `mask` is true (jittable in `mask`)."""
  mask = mask[None, :, :, None]
  re, im = jax.random.normal(key, (2, *shape))
  noise = jnp.real(jnp.fft.ifft2((re + 1j * im) * mask, axes=(1, 2)))
  size = jnp.sqrt(jnp.sum(noise**2, axis=(1, 2, 3), keepdims=True))
  return noise * (norm / jnp.maximum(size, 1e-30))


def analyse(
  subject: common.Subject,
  *,
  rms: float = 0.1,
  seed: int = 0,
  batch_size: int = 64,
  mesh: Any = None,
) -> dict[str, Any]:
  """Clean accuracy and, per band, the accuracy with noise and the drop (JSON-ready)."""
  if rms <= 0:
    raise ValueError(f'--noise_rms must be positive, got {rms}')
  n, h, w, c = subject.images.shape
  norm = rms * float(np.sqrt(h * w * c))
  model = subject.model
  evaluate = common.loss_and_correct_sums(model)
  _, clean = common.sharded_sums(
    evaluate, subject.params, (subject.images, subject.labels), batch_size=batch_size, mesh=mesh
  )
  # One key per example and band: the draw does not depend on the batching.
  keys = jax.random.split(jax.random.key(seed), n * NUM_BANDS)
  keys = np.asarray(jax.random.key_data(keys)).reshape(n, NUM_BANDS, -1)

  def noisy(params, images, labels, key_data, mask, band_bins):
    noise = jax.vmap(
      lambda k, x: masked_noise(jax.random.wrap_key_data(k), (1, *x.shape), band_bins, norm)[0]
    )(key_data, images)
    return evaluate(params, images + noise, labels, mask)

  bands = []
  for band in range(NUM_BANDS):
    row = {'band': band, 'low': band / NUM_BANDS, 'high': (band + 1) / NUM_BANDS}
    bins = band_mask(h, w, band)
    if not bins.any():
      bands.append({**row, 'accuracy': None, 'drop': None})
      continue
    _, correct = common.sharded_sums(
      noisy,
      subject.params,
      (subject.images, subject.labels, keys[:, band]),
      batch_size=batch_size,
      mesh=mesh,
      extra=(bins,),
    )
    accuracy = float(correct / n)
    bands.append({**row, 'accuracy': accuracy, 'drop': float(clean / n) - accuracy})
  return {
    'analysis': 'noise',
    **subject.describe(),
    'noise_rms': rms,
    'noise_norm': norm,
    'seed': seed,
    'clean_accuracy': float(clean / n),
    'bands': bands,
  }


def plot(result: dict[str, Any]):
  fig, (ax,) = common.figure(1)
  rows = [r for r in result['bands'] if r['drop'] is not None]
  ax.bar(
    [(r['low'] + r['high']) / 2 for r in rows],
    [100 * r['drop'] for r in rows],
    width=0.09,
    color='tab:blue',
  )
  ax.axhline(0, color='0.3', linewidth=0.8)
  ax.set_xlabel('noise frequency band (× π)')
  ax.set_ylabel('accuracy drop (points)')
  ax.set_xlim(0, 1)
  ax.set_title(
    f'{common.title(result)}\nclean {100 * result["clean_accuracy"]:.2f} %, '
    f'noise RMS {result["noise_rms"]:g} per value',
    fontsize=9,
  )
  fig.tight_layout()
  return fig
