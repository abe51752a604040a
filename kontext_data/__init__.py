"""kontext_data: turn image folders into validated FLUX.1 Kontext edit pairs (the manifest)."""

__version__ = "0.1.0"
