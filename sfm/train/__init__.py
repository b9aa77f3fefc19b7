"""The trainer: tasks (codec, pretrain, duplex), the sharded step, the loop, checkpoints,
metrics and ahead-of-time compilation."""
