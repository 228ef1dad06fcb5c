"""Fast text generation: static KV cache, compiled prompt layers (CPU) and single-token decode step."""

from torchbridge.generation.generator import FastGenerator, cache_length_bucket
from torchbridge.generation.verify import verify_greedy

__all__ = ["FastGenerator", "verify_greedy", "cache_length_bucket"]
