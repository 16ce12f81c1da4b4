"""distill: turn a trained diffusion teacher into fast students and ship them.

Kept import-light on purpose: ``distill --help`` must not import torch.
"""

__version__ = "0.1.0"
