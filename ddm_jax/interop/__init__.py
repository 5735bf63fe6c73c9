"""Interoperability with PyTorch ecosystems (diffusers checkpoints), without PyTorch."""
