"""LoRA presets on the real Flux transformer, and the saved file in diffusers format (alpha honoured)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from conftest import forward_backward

from kontext_trainer.adapters import attach_lora, save_lora, target_modules
from kontext_trainer.flow import kontext_ids


def _fresh(tiny_model):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer")


def test_presets(tiny_model):
    tr = _fresh(tiny_model)
    att = target_modules(tr, "attention")
    assert "transformer_blocks.0.attn.to_q" in att and "transformer_blocks.0.attn.to_add_out" in att
    assert "transformer_blocks.0.attn.add_k_proj" in att and "single_transformer_blocks.0.attn.to_v" in att
    assert not any(".ff." in n or "proj_mlp" in n for n in att)
    ffs = target_modules(tr, "attention+ffs")
    assert set(att) < set(ffs) and "transformer_blocks.0.ff_context.net.2" in ffs
    assert "single_transformer_blocks.0.proj_mlp" in ffs
    every = target_modules(tr, "all")
    assert set(ffs) <= set(every) and "transformer_blocks.0.norm1.linear" in every
    assert target_modules(tr, "to_q, to_k") == sorted(n for n in att if n.endswith(("to_q", "to_k")))
    assert len(target_modules(tr, ["to_q", "to_k"])) == 4  # both blocks, both projections
    with pytest.raises(ValueError, match="attention\\+ffs"):
        target_modules(tr, "to_qq")


def test_saved_lora_loads_into_the_pipeline_with_its_alpha(tiny_model, tmp_path):
    from diffusers import FluxKontextPipeline

    tr = _fresh(tiny_model)
    attach_lora(tr, rank=4, alpha=2.0, dropout=0.0, targets="attention+ffs")
    with torch.no_grad():
        for name, p in tr.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    path = save_lora(tr, tmp_path / "lora", training_config={"lora_rank": 4})
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert all(k.startswith("transformer.") and (".lora_A.weight" in k or ".lora_B.weight" in k) for k in keys)
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in keys
    assert '"transformer.lora_alpha": 2.0' in meta["lora_adapter_metadata"]
    assert '"lora_rank": 4' in meta["kontext_training_config"]

    pipe = FluxKontextPipeline.from_pretrained(tiny_model)
    pipe.load_lora_weights(tmp_path / "lora")
    g = torch.Generator().manual_seed(0)
    args = dict(hidden_states=torch.randn(1, 32, 16, generator=g), timestep=torch.tensor([0.5]),
                guidance=torch.tensor([1.0]), pooled_projections=torch.randn(1, 32, generator=g),
                encoder_hidden_states=torch.randn(1, 12, 32, generator=g), txt_ids=torch.zeros(12, 3),
                img_ids=kontext_ids((8, 8), [(8, 8)]), return_dict=False)
    tr.eval()
    with torch.no_grad():
        live = tr(**args)[0]
        loaded = pipe.transformer(**args)[0]
        base = _fresh(tiny_model)(**args)[0]
    assert torch.allclose(live, loaded, atol=1e-5)
    assert not torch.allclose(live, base, atol=1e-3)


def test_lora_runs_in_the_activations_dtype_with_peft_gradients(tiny_model):
    """bf16 activations: both LoRA matmuls in bf16 (no float32 copies of every input and output), the master
    weights and their gradients float32, and the same outputs and gradients as peft's float32 forward within bf16
    tolerance; float32 activations take peft's forward unchanged."""
    from diffusers import FluxTransformer2DModel
    from peft.tuners.lora.layer import Linear as LoraLinear

    from kontext_trainer.adapters import attach_lora, use_activation_dtype_lora
    from kontext_trainer.flow import kontext_ids

    tr = FluxTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer", torch_dtype=torch.bfloat16)
    attach_lora(tr, rank=4, alpha=8.0, dropout=0.0, targets="attention+ffs")
    layers = [m for m in tr.modules() if isinstance(m, LoraLinear)]
    assert layers and all(type(m).__name__ == "ActivationDtypeLoraLinear" for m in layers)
    g = torch.Generator().manual_seed(0)
    params = [p for p in tr.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in params)
    for p in params:  # non-zero B, so the LoRA path changes the output
        p.data = torch.randn(p.shape, generator=g) * 0.1
    args = dict(hidden_states=torch.randn(1, 32, 16, generator=g).bfloat16(), timestep=torch.tensor([0.5]),
                guidance=torch.tensor([1.0]), pooled_projections=torch.randn(1, 32, generator=g).bfloat16(),
                encoder_hidden_states=torch.randn(1, 12, 32, generator=g).bfloat16(), txt_ids=torch.zeros(12, 3),
                img_ids=kontext_ids((8, 8), [(8, 8)]), return_dict=False)

    def run(ours: bool):
        use_activation_dtype_lora(tr, enable=ours)
        return forward_backward(tr, args, params)

    ref_out, ref_grad = run(False)
    out, grad = run(True)
    assert all(p.grad.dtype == torch.float32 for p in params)
    cos = torch.nn.functional.cosine_similarity
    assert cos(out.flatten(), ref_out.flatten(), dim=0) > 0.999
    assert cos(grad, ref_grad, dim=0) > 0.999
    assert not torch.equal(out, ref_out)  # a different computation, not peft's path under another name
    tr.float()
    for p in params:
        p.data = p.data.float()
    args = {k: v.float() if torch.is_tensor(v) and v.dtype == torch.bfloat16 else v for k, v in args.items()}
    out32, _ = run(True)
    ref32, _ = run(False)
    assert torch.equal(out32, ref32)  # float32 activations: peft's forward
