"""TorchBridge: small Hugging Face text models, faster, with proof that their outputs held.

Importing this package probes no device and changes no global torch state; devices are
detected lazily by :func:`torchbridge.backends.detect`.
"""

__version__ = "0.1.0"
