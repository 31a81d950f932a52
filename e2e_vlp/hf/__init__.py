"""Hugging Face interop: a PyTorch mirror of the model and the weight converters.

Optional dependencies (torch, transformers) are imported only where needed: the
configuration and modeling files import transformers / torch; `convert` needs neither
to turn JAX variables into safetensors.
"""
