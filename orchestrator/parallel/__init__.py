"""Data x pipeline x branch parallelism for Multi-ResNet, applied from outside the model.
May import models (and errors); nothing here knows Ray or the run above it (`RankEngine` is
handed the run's config).

degrees.py   the degrees' schema (no torch: run files validate without it)
mesh.py      the degrees as one DeviceMesh (pp outermost, dp, bp innermost)
branch.py    each rank keeps its share of every block's k functions; f/g autograd operators
pipeline.py  consecutive blocks as pipeline stages balanced by FLOPs (torch.distributed.pipelining)
engine.py    one rank's engine: the local model, forward/backward, evaluation, canonical checkpoints
process_group.py  joining the ranks, with every listener on the address the ranks use
"""
