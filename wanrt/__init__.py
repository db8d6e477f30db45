"""wanrt: an optimized runtime for the open Wan2.2 video diffusion models."""

__version__ = "0.1.0"
