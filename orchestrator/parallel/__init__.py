"""Data x pipeline x branch parallelism for Multi-ResNet, applied from outside the model.

mesh.py      the degrees as one DeviceMesh (pp outermost, dp, bp innermost)
branch.py    each rank keeps its share of every block's k functions; f/g autograd operators
pipeline.py  consecutive blocks as pipeline stages balanced by FLOPs (torch.distributed.pipelining)
sharded.py   one rank's view: the local model, forward/backward, evaluation, canonical checkpoints
"""
from orchestrator.parallel.sharded import ShardedModel

__all__ = ["ShardedModel"]
