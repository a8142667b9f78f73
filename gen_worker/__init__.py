"""The generator stage: diffusers text-to-image and inpainting."""
