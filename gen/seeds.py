"""The range every image seed lies in, in one torch-free place (the CLI checks ``--seed`` without importing torch).

Image ``i`` of a request uses ``seed + i``, and each must be below ``SEED_LIMIT``: what
``torch.Generator.manual_seed`` takes without wrapping or overflow.
"""

SEED_LIMIT = 2**63
