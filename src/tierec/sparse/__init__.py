from tierec.sparse.jagged import JaggedTensor, KeyedJaggedTensor, dedup_kjt, jagged_index_select

__all__ = ["JaggedTensor", "KeyedJaggedTensor", "dedup_kjt", "jagged_index_select"]
