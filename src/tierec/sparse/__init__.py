from tierec.sparse.jagged import JaggedTensor, KeyedJaggedTensor

__all__ = ["JaggedTensor", "KeyedJaggedTensor"]
