"""models/hooks.py: vectors added to decoder-block outputs (the white-box steering attack's mechanism)."""
from __future__ import annotations

import pytest
import torch

from repbend.errors import RepbendError
from repbend.models.hooks import shift_block_outputs as row_shifts


def test_row_shifts_move_only_the_selected_rows_from_that_block_on(tiny_model):
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]])
    shift = torch.randn(tiny_model.config.hidden_size)
    with torch.no_grad():
        plain = tiny_model(input_ids=ids, output_hidden_states=True).hidden_states
        with row_shifts(tiny_model, [(slice(1, 2), {2: shift})]):
            moved = tiny_model(input_ids=ids, output_hidden_states=True).hidden_states
        again = tiny_model(input_ids=ids, output_hidden_states=True).hidden_states
    for l in (0, 1, 2):
        torch.testing.assert_close(moved[l], plain[l])            # up to the hooked block's own recorded state
    assert not torch.allclose(moved[3][1], plain[3][1])           # the shifted row, from the next block on
    torch.testing.assert_close(moved[3][[0, 2]], plain[3][[0, 2]])  # the other rows untouched
    torch.testing.assert_close(again[4], plain[4])                # hooks removed
    with pytest.raises(RepbendError, match="out of range"):
        with row_shifts(tiny_model, [(slice(0, 1), {4: shift})]):
            pass
