"""The toy world: a synthetic world of coloured shapes, small models trained on it, and
the ``toy`` model profile that plugs them into the workers.

- :mod:`toy.world`: deterministic scenes (image, caption, exact per-object masks)
  and the colour-based search that finds an asked object in a *generated* image;
- :mod:`toy.profiles`: the ``toy`` profile of both workers (declared as entry points
  in pyproject.toml; the workers never import this package by name);
- :mod:`toy.train_gen`: trains the ``toy`` Stable Diffusion pipeline (VAE, text
  encoder, UNet) with the diffusers/transformers classes, saved with
  ``save_pretrained``; its parts: :mod:`toy.gen_model`, :mod:`toy.gen_data`,
  :mod:`toy.gen_losses`;
- :mod:`toy.train_sam`: trains a small Segment Anything model, saved as safetensors;
  its parts: :mod:`toy.sam_data`, :mod:`toy.sam_losses`, :mod:`toy.sam_eval`;
- :mod:`toy.quality`: what the quality benchmark measures;
- :mod:`toy.bf16`: whether this CPU runs the recipe's bf16 natively;
- :mod:`toy.weights`: where the shipped weights live.

See docs/toy.md.
"""
