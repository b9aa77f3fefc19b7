"""Evaluation metrics: codec, ASR, speech-LM and turn-taking."""
