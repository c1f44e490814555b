"""lnb: the paper's experiments and the ``lnb`` command, on top of ``lnb_ref`` and ``lnb_fast``.

* :mod:`lnb.data` — datasets that need no download at run time (scikit-learn's digits, the
  Debian package of Fashion-MNIST, synthetic shapes for segmentation);
* :mod:`lnb.models` — plain-JAX MLP, CNN, ViT and UNet (unmodified models: ``lnb_fast`` finds
  their neurons itself);
* :mod:`lnb.train` — the training loop shared by every experiment (LNB and optax baselines);
* :mod:`lnb.experiments` — the paper's §5 experiments, scaled to a CPU;
* :mod:`lnb.check` — the fast-vs-reference cross-check behind ``lnb check``;
* :mod:`lnb.cli` — the ``lnb`` command (``lnb demo``, ``lnb reproduce``, ``lnb check``).
"""
