"""Sizes written once: byte units, and the query block of the CPU attention both model files use
(and the memory plan counts)."""

MIB = 2 ** 20
GIB = 2 ** 30

# Causal attention on the CPU runs one block of this many queries at a time, against only the keys
# at or before the block (backend_torch/model.py, backend_mlx/model.py): the score matrix in memory
# is (block x keys), not (T x T).
ATTENTION_BLOCK = 128
