"""tools/judge_probe.py: the logistic probe it fits on tune rows."""
from __future__ import annotations

import numpy as np


def test_probe_learns_a_direction_and_scores_held_out_rows(load_script):
    tool = load_script("tools/judge_probe.py")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 16))
    y = x[:, 3] - 0.5 * x[:, 7] > 0                     # label = side of a hyperplane in two features
    train = np.arange(200) < 100
    score = tool.probe_scores(x, y, train, l2=0.01)
    assert tool.kappa(y[~train], score[~train] > 0) > 0.8   # held-out rows, never seen by the fit
    flipped = tool.probe_scores(x, ~y, train, l2=0.01)
    assert tool.kappa(y[~train], flipped[~train] > 0) < -0.8
