"""kontext_trainer: train LoRA/LoKr adapters on FLUX.1 Kontext from a kontext_data manifest."""

__version__ = "0.1.0"
