"""reap-stream: streaming out-of-core REAP expert pruning for MoE checkpoints."""
__version__ = "0.1.0"
