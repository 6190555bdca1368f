"""``nbs analyze``: the paper's latent analyses and its critics' tests on any checkpoint (docs/analysis.md)."""
