"""Fast text generation: static KV cache, eager prefill, compiled single-token decode step."""

from torchbridge.generation.generator import FastGenerator, cache_length_bucket
from torchbridge.generation.verify import verify_greedy

__all__ = ["FastGenerator", "verify_greedy", "cache_length_bucket"]
