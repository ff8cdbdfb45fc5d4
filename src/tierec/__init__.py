"""tierec: recommendation models whose embedding tables are bigger than memory.

Layers (see ARCHITECTURE.md):
  tierec.sparse   - keyed jagged batches (TorchRec conventions)
  tierec.data     - readers, preprocessing, on-disk data sets, synthetic generator
  tierec.modules  - embedding tables with fused sparse optimizers, DLRM
  tierec.train    - training loop, metrics, checkpoints
  tierec.sim     - offline cache simulators (LRU, LFU, Belady's MIN) and trace readers
"""

__version__ = "0.1.0"
