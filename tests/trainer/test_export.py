"""Export to ComfyUI/Kohya: every key names a real BFL Flux module with the right shape; a round trip through
diffusers' own Kohya -> diffusers converter gives back the same weight deltas; LoKr keeps ComfyUI's arithmetic;
`kontext-train export` on the command line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from kontext_trainer.adapters import attach_lokr, attach_lora, save_lora
from kontext_trainer.cli import app
from kontext_trainer.export import (ExportError, comfyui_to_lokr, comfyui_to_lora, export_adapter, lokr_to_comfyui,
                                    lora_to_comfyui)

# Module names of the original (BFL) Flux transformer, from its model definition: these are the names ComfyUI and
# Kohya LoRAs address.
BFL_DOUBLE = ("img_mod.lin", "img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2",
              "txt_mod.lin", "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2")
BFL_SINGLE = ("linear1", "linear2", "modulation.lin")
BFL_TOP = ("img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer",
           "guidance_in.in_layer", "guidance_in.out_layer", "final_layer.linear", "final_layer.adaLN_modulation.1")


def bfl_shapes(transformer) -> dict[str, tuple[int, int]]:
    """(out, in) of every Linear of the BFL model, computed from a diffusers model's sizes (fused = parts summed)."""
    c = transformer.config
    h = c.num_attention_heads * c.attention_head_dim
    mods = dict(transformer.named_modules())
    shapes = {}
    for i in range(c.num_layers):
        b = f"transformer_blocks.{i}."
        ff = mods[b + "ff.net.0.proj"].out_features
        shapes.update({f"double_blocks.{i}.img_mod.lin": (6 * h, h), f"double_blocks.{i}.txt_mod.lin": (6 * h, h),
                       f"double_blocks.{i}.img_attn.qkv": (3 * h, h), f"double_blocks.{i}.txt_attn.qkv": (3 * h, h),
                       f"double_blocks.{i}.img_attn.proj": (h, h), f"double_blocks.{i}.txt_attn.proj": (h, h),
                       f"double_blocks.{i}.img_mlp.0": (ff, h), f"double_blocks.{i}.img_mlp.2": (h, ff),
                       f"double_blocks.{i}.txt_mlp.0": (ff, h), f"double_blocks.{i}.txt_mlp.2": (h, ff)})
    for i in range(c.num_single_layers):
        mlp = mods[f"single_transformer_blocks.{i}.proj_mlp"].out_features
        shapes.update({f"single_blocks.{i}.linear1": (3 * h + mlp, h), f"single_blocks.{i}.linear2": (h, h + mlp),
                       f"single_blocks.{i}.modulation.lin": (3 * h, h)})
    assert set(BFL_DOUBLE) == {k.split(".", 2)[2] for k in shapes if k.startswith("double_blocks.0.")}
    assert set(BFL_SINGLE) == {k.split(".", 2)[2] for k in shapes if k.startswith("single_blocks.0.")}
    return shapes


def _deltas_diffusers(sd, scale=1.0):
    """module -> (B @ A * scale) applied to a fixed random probe (in x 3): compares deltas without forming them."""
    out = {}
    for k, a in sd.items():
        if ".lora_A." in k:
            module = k.split(".lora_A.")[0].removeprefix("transformer.")
            probe = torch.randn(a.shape[1], 3, generator=torch.Generator().manual_seed(a.shape[1]))
            out[module] = sd[k.replace(".lora_A.", ".lora_B.")].float() @ (a.float() @ probe) * scale
    return out


def _random_lora(tiny_model, targets, rank=4, alpha=8.0):
    from diffusers import FluxTransformer2DModel

    tr = FluxTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer")
    attach_lora(tr, rank=rank, alpha=alpha, dropout=0.0, targets=targets)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in tr.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return tr


@pytest.mark.parametrize("targets", ["all", "attention"])
def test_comfyui_keys_are_bfl_modules_with_their_shapes(tiny_model, tmp_path, targets):
    tr = _random_lora(tiny_model, targets)
    save_lora(tr, tmp_path / "lora")
    result = export_adapter(tmp_path / "lora", "comfyui")
    assert result.path == tmp_path / "lora" / "pytorch_lora_weights_comfyui.safetensors"
    with safe_open(str(result.path), "pt") as fh:
        sd = {k: fh.get_tensor(k) for k in fh.keys()}
    shapes = bfl_shapes(tr)
    underscored = {"lora_unet_" + n.replace(".", "_"): n for n in shapes}
    names = {k.split(".", 1)[0] for k in sd}
    assert names <= set(underscored), names - set(underscored)
    for name in names:
        out_dim, in_dim = shapes[underscored[name]]
        down, up = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"]
        assert down.shape[1] == in_dim and up.shape[0] == out_dim and up.shape[1] == down.shape[0]
        assert sd[f"{name}.alpha"].ndim == 0
    assert "lora_unet_double_blocks_0_img_attn_qkv" in names and "lora_unet_single_blocks_0_linear1" in names
    # the deltas the Kohya file applies equal the trained adapter's, fused modules included
    live = {n: m.get_delta_weight("default") for n, m in tr.named_modules() if hasattr(m, "get_delta_weight")
            and "default" in getattr(m, "lora_A", {})}
    for name in names:
        bfl = underscored[name]
        delta = sd[f"{name}.lora_up.weight"] @ sd[f"{name}.lora_down.weight"] * (
            float(sd[f"{name}.alpha"]) / sd[f"{name}.lora_down.weight"].shape[0])
        if bfl.endswith("img_attn.qkv"):
            i = bfl.split(".")[1]
            want = torch.cat([live[f"transformer_blocks.{i}.attn.to_{x}"] for x in "qkv"])
            assert torch.allclose(delta, want, atol=1e-6)
        if bfl.endswith("linear1"):
            i = bfl.split(".")[1]
            h = tr.config.num_attention_heads * tr.config.attention_head_dim
            for j, x in enumerate("qkv"):
                assert torch.allclose(delta[j * h:(j + 1) * h], live[f"single_transformer_blocks.{i}.attn.to_{x}"],
                                      atol=1e-6)
            mlp = live.get(f"single_transformer_blocks.{i}.proj_mlp")
            assert torch.allclose(delta[3 * h:], mlp if mlp is not None else torch.zeros_like(delta[3 * h:]),
                                  atol=1e-6)


def _real_flux_lora(modules: dict[str, tuple[int, int]], rank=4, alpha=8.0):
    """A diffusers-format LoRA with FLUX.1's real sizes on a few modules (no model needed)."""
    g = torch.Generator().manual_seed(5)
    sd = {}
    for m, (o, i) in modules.items():
        sd[f"transformer.{m}.lora_A.weight"] = torch.randn(rank, i, generator=g) * 0.05
        sd[f"transformer.{m}.lora_B.weight"] = torch.randn(o, rank, generator=g) * 0.05
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": rank, "transformer.lora_alpha": alpha})}
    return sd, meta, alpha / rank


H = 3072
REAL = {
    **{f"transformer_blocks.0.attn.{m}": (H, H) for m in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj",
                                                         "add_k_proj", "add_v_proj", "to_add_out")},
    "transformer_blocks.0.ff.net.0.proj": (4 * H, H), "transformer_blocks.0.ff.net.2": (H, 4 * H),
    "transformer_blocks.0.ff_context.net.0.proj": (4 * H, H), "transformer_blocks.0.ff_context.net.2": (H, 4 * H),
    "transformer_blocks.0.norm1.linear": (6 * H, H), "transformer_blocks.0.norm1_context.linear": (6 * H, H),
    "transformer_blocks.18.attn.to_q": (H, H), "transformer_blocks.18.attn.to_v": (H, H),
    **{f"single_transformer_blocks.37.attn.{m}": (H, H) for m in ("to_q", "to_k", "to_v")},
    "single_transformer_blocks.37.proj_mlp": (4 * H, H), "single_transformer_blocks.37.proj_out": (H, 5 * H),
    "single_transformer_blocks.37.norm.linear": (3 * H, H),
    "single_transformer_blocks.5.attn.to_k": (H, H),
    "x_embedder": (H, 64), "norm_out.linear": (2 * H, H), "proj_out": (64, H),
}


def test_round_trip_through_diffusers_own_kohya_converter():
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    sd, meta, scale = _real_flux_lora(REAL)
    kohya = lora_to_comfyui(sd, meta)
    assert "lora_unet_double_blocks_18_img_attn_qkv.lora_down.weight" in kohya  # q and v only: k gets a zero block
    back = _convert_kohya_flux_lora_to_diffusers(dict(kohya))
    want = _deltas_diffusers(sd, scale)
    got = _deltas_diffusers(back)
    for module, delta in want.items():
        assert torch.allclose(got[module], delta, atol=1e-6), module
    extra = set(got) - set(want)  # parts not trained (zero blocks of fused modules) come back as zero
    assert extra == {"transformer_blocks.18.attn.to_k", "single_transformer_blocks.5.attn.to_q",
                     "single_transformer_blocks.5.attn.to_v", "single_transformer_blocks.5.proj_mlp"}
    assert all(not got[m].any() for m in extra)
    # and our own inverse gives the same deltas, without the zero parts
    ours = _deltas_diffusers(comfyui_to_lora(kohya))
    assert set(ours) == set(want)
    for module, delta in want.items():
        assert torch.allclose(ours[module], delta, atol=1e-6), module


def test_lokr_comfyui_export_follows_comfyui_arithmetic(tiny_model):
    from diffusers import FluxTransformer2DModel
    from peft.utils import get_peft_model_state_dict

    for full in (True, False):
        tr = FluxTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer")
        attach_lokr(tr, "attention+ffs", factor=16, factor_ff=8, full_matrix=full, rank=2, alpha=3.0)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for n, p in tr.named_parameters():
                if "lokr_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        sd = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(tr, adapter_name="default").items()}
        meta = {"kontext.alpha": str(tr.peft_config["default"].alpha), "kontext.rank": str(tr.peft_config["default"].r)}
        lyc = lokr_to_comfyui(sd, meta)
        real = {n.replace(".", "_"): n for n, _ in tr.named_modules()}
        for name in {k.split(".", 1)[0] for k in lyc}:
            module = real[name[len("lycoris_"):]]  # every key names a real module
            parts = {k.split(".", 1)[1]: v for k, v in lyc.items() if k.split(".", 1)[0] == name}
            w1 = parts["lokr_w1"] if "lokr_w1" in parts else parts["lokr_w1_a"] @ parts["lokr_w1_b"]
            if "lokr_w2" in parts:
                w2, dim = parts["lokr_w2"], None
            else:
                w2, dim = parts["lokr_w2_a"] @ parts["lokr_w2_b"], parts["lokr_w2_b"].shape[0]
            scale = float(parts["alpha"]) / dim if dim else 1.0  # ComfyUI: alpha/dim only when decomposed
            want = tr.get_submodule(module).get_delta_weight("default")
            assert torch.allclose(torch.kron(w1, w2) * scale, want, atol=1e-6), module
        back = comfyui_to_lokr(lyc)
        assert set(back) == set(sd)


def test_export_command(tiny_model, tmp_path):
    tr = _random_lora(tiny_model, "attention")
    save_lora(tr, tmp_path / "lora")
    runner = CliRunner()
    out = tmp_path / "x" / "comfy.safetensors"
    r = runner.invoke(app, ["export", str(tmp_path / "lora"), "--format", "comfyui", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output.strip().splitlines()[-1])
    assert info["path"] == str(out) and info["adapter"] == "lora" and out.is_file()
    r = runner.invoke(app, ["export", str(out), "--format", "diffusers"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "x" / "diffusers" / "pytorch_lora_weights.safetensors").is_file()
    bad = tmp_path / "bad.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, str(bad))
    r = runner.invoke(app, ["export", str(bad), "--format", "comfyui"])
    assert r.exit_code == 1 and "unrecognized adapter keys" in r.output
    r = runner.invoke(app, ["export", str(out), "--format", "a1111"])
    assert r.exit_code == 2 and "comfyui" in r.output
    with pytest.raises(ExportError, match="no such file"):
        export_adapter(tmp_path / "missing", "comfyui")
