"""Training checkpoints keep weight norm as (g, v) pairs; import folds them into one weight."""

from __future__ import annotations

import numpy as np
import torch

from sfm.io.mimi import _fold_weight_norm


def test_fold_matches_torch_weight_norm():
    conv = torch.nn.utils.parametrizations.weight_norm(torch.nn.Conv1d(4, 6, 3))
    with torch.no_grad():
        conv.parametrizations.weight.original0.mul_(torch.rand(6, 1, 1) + 0.5)
    sd = {f"enc.conv.{k}": v.detach().numpy() for k, v in conv.state_dict().items()}
    folded = _fold_weight_norm(sd)
    assert set(folded) == {"enc.conv.weight", "enc.conv.bias"}
    np.testing.assert_allclose(folded["enc.conv.weight"], conv.weight.detach().numpy(), rtol=1e-6)


def test_fold_legacy_weight_g_v_names():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((6, 4, 3)).astype(np.float32)
    g = rng.random((6, 1, 1)).astype(np.float32)
    folded = _fold_weight_norm({"x.weight_g": g, "x.weight_v": v})
    expected = g * v / np.linalg.norm(v.reshape(6, -1), axis=1)[:, None, None]
    np.testing.assert_allclose(folded["x.weight"], expected, rtol=1e-6)
