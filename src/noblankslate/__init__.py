"""noblankslate: Coconut (reasoning in a continuous latent space) and the No Blank Slate memory."""

__version__ = "0.1.0"
