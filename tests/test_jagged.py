import pytest
import torch

from tierec.sparse import KeyedJaggedTensor


def make():
    # batch of 3; key a: [1,2], [], [3]; key b: [4], [5,6,7], [8]
    return KeyedJaggedTensor(["a", "b"], torch.tensor([1, 2, 3, 4, 5, 6, 7, 8]), torch.tensor([2, 0, 1, 1, 3, 1]))


def test_layout_follows_torchrec_conventions():
    kjt = make()
    assert kjt.stride() == 3
    assert kjt.offsets().tolist() == [0, 2, 2, 3, 4, 7, 8]
    assert kjt.length_per_key() == [3, 5]
    assert kjt.offset_per_key() == [0, 3, 8]
    a, b = kjt["a"], kjt["b"]
    assert [t.tolist() for t in a.to_dense()] == [[1, 2], [], [3]]
    assert [t.tolist() for t in b.to_dense()] == [[4], [5, 6, 7], [8]]
    assert list(kjt.to_dict()) == ["a", "b"]


def test_weights_follow_values():
    kjt = KeyedJaggedTensor(["a", "b"], torch.arange(4), torch.tensor([1, 1, 2, 0]), weights=torch.arange(4.0))
    assert kjt["b"].weights.tolist() == [2.0, 3.0]


@pytest.mark.parametrize("lengths", [torch.tensor([1, 2, 3]), torch.tensor([[1, 2]])])
def test_bad_shapes_are_rejected(lengths):
    with pytest.raises(ValueError):
        KeyedJaggedTensor(["a", "b"], torch.arange(6), lengths)


def test_to_torchrec_round_trip():
    pytest.importorskip("torchrec", reason="torchrec is an optional extra (make torchrec)")
    kjt = make().to_torchrec()
    assert kjt.keys() == ["a", "b"]
    assert kjt["b"].values().tolist() == [4, 5, 6, 7, 8]


def test_a_kjt_keeps_its_views_and_offsets_and_stays_itself_on_its_device():
    """The per-key views and offsets a step's forward asks for are computed once (the look-ahead worker computes
    them ahead) and equal what they were computed from; `to` its own device keeps them."""
    kjt = KeyedJaggedTensor(["a", "b"], torch.tensor([1, 2, 3, 4, 5, 6]), torch.tensor([2, 0, 1, 1, 2, 0]))
    a = kjt.to_dict()["a"]
    assert a.offsets() is a.offsets() and a.offsets().tolist() == [0, 2, 2, 3]
    assert kjt.to("cpu") is kjt and kjt.to_dict()["a"] is a
    b = kjt.to_dict()["b"]
    assert b.values.tolist() == [4, 5, 6] and b.offsets().tolist() == [0, 1, 3, 3]
    assert kjt.split_by_key() is not kjt.split_by_key()  # a new list each time: the caller's to change
