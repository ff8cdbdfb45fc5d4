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
