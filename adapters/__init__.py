"""bespoke-diffusion's adapter layer: LoRA training, the registry, formats and diagnostics.

Stands on ``gen`` (base, world, evaluator); ``gen`` never imports from here.
"""
