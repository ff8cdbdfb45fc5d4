"""Training on several processes (torchrun): sharded embedding tables, data-parallel dense layers.

plan.py: which rank owns which rows; comm.py: process groups, counted collectives;
embedding.py: the sharded collection (all_to_all of IDs and pooled rows);
trainer.py: the rank's training loop and world-size-independent checkpoints;
run.py: the `tierec train` entry under torchrun. See docs/distributed.md.
"""
