"""diffcli: train class-conditional diffusion models and sample from them."""

__version__ = "0.1.0"
