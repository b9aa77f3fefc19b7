"""The multi-stream speech-text LM: stream layout, temporal and depth transformers, loss,
LoRA and the streaming generator."""
