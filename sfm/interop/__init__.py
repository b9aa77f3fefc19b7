"""Checkpoint interop with Kyutai's PyTorch models (safetensors layouts); no torch import here."""
