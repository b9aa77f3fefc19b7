"""Inference: the batched streaming engine (`sfm.infer.engine`)."""
