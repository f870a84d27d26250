"""The analyses of Park & Kim, "How Do Vision Transformers Work?" (ICLR 2022), on any checkpoint.

One module per analysis, each with `analyse(subject, ...) -> dict` (JSON-ready numbers) and
`plot(result) -> matplotlib figure`; `python -m mixer_vit.analysis NAME` runs one on a checkpoint:
- `fourier`: per sub-block high-frequency Delta log amplitude of the feature maps vs depth;
- `noise`: accuracy drop per 0.1 pi frequency band of added noise of equal energy;
- `hessian`: top Hessian eigenvalue per mini-batch (power iteration on Hessian-vector products;
  optional Lanczos);
- `landscape`: loss on a 1-D / 2-D grid of filter-normalised random directions;
- `variance`: feature-map variance per sub-block.
`common` loads a checkpoint with its preprocessing and batches over all devices; `features`
reads every model family's sub-block feature maps from outside (`nn.intercept_methods`).
"""

ANALYSES = ('fourier', 'noise', 'hessian', 'landscape', 'variance')
