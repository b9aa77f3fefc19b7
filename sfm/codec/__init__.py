"""The Mimi-compatible codec: SEANet, split RVQ, streaming, discriminators, losses, files."""
