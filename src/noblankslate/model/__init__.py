"""The Coconut model: multi-pass latent forward and batched KV-cached generation."""
