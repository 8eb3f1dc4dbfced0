"""eDiff-I-style text-to-image diffusion in plain PyTorch.

An ensemble of expert denoisers per cascade stage (Balaji et al. 2022,
arXiv 2211.01324), EDM preconditioning and samplers (Karras et al. 2022),
T5 + CLIP text conditioning, CLIP image (style) conditioning and
paint-with-words. No serving code lives here.
"""

__version__ = "0.1.0"
