"""The toy world: a synthetic world of coloured shapes, and small models trained on it.

- :mod:`toy.world`: deterministic scenes (image, caption, exact per-object masks)
  and the colour-based search that finds an asked object in a *generated* image;
- :mod:`toy.train_gen`: trains the ``toy`` Stable Diffusion pipeline (VAE, text
  encoder, UNet) with the diffusers/transformers classes, saved with ``save_pretrained``;
- :mod:`toy.train_sam`: trains a small Segment Anything model, saved as safetensors;
- :mod:`toy.weights`: where the shipped weights live.

See docs/toy.md.
"""
