"""tierec.masks: the numpy-backed mask helpers answer exactly as torch's own ops."""

import pytest
import torch

from tierec.masks import any_true, count, select, where


@pytest.mark.parametrize("n,p", [(0, 0.5), (1, 1.0), (1000, 0.0), (1000, 0.07), (20000, 0.5), (20000, 1.0)])
def test_the_helpers_match_torch(n, p):
    g = torch.Generator().manual_seed(n)
    mask = torch.rand(n, generator=g) < p
    ids = torch.randint(0, 1 << 40, (n,), generator=g)
    rows = torch.randn(n, 3, generator=g)
    assert torch.equal(where(mask), mask.nonzero().squeeze(1))
    assert where(mask).dtype == torch.int64
    assert count(mask) == int(mask.sum())
    assert any_true(mask) == bool(mask.any())
    got_ids, got_rows = select(mask, ids, rows)
    assert torch.equal(got_ids, ids[mask]) and torch.equal(got_rows, rows[mask])


def test_where_of_an_int_array_is_its_nonzero_positions():
    pins = torch.tensor([0, 2, 0, 1, 0, 0, 5], dtype=torch.int32)
    assert where(pins).tolist() == [1, 3, 6]
    assert where(pins[2:5]).tolist() == [1]  # a view: positions within it
