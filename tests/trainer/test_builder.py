"""The random-model builder (`kontext-train make-random-model`): the full configurations are FLUX.1 Kontext [dev]'s
(checked on the meta device, no memory), and the tiny variant, written by the same code with small shards, is a
model that check_layout, diffusers and `kontext-train` accept, byte-identical for a seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from kontext_trainer import builder
from kontext_trainer.builder import BuildError, build_component, make_random_model
from kontext_trainer.cli import app
from kontext_trainer.model import check_layout, resolve_model_dir


def _shapes(model) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_full_configs_are_flux1_kontext_dev():
    counts = builder.parameter_counts("full")
    for name, expected in {"transformer": 11.90e9, "text_encoder_2": 4.762e9, "text_encoder": 123.06e6,
                           "vae": 83.82e6}.items():
        assert abs(counts[name] / expected - 1) < 0.001, (name, counts[name])
    # bf16 everywhere, as on the hub: ~34 GB on disk
    assert 33.5e9 < 2 * sum(counts.values()) < 34e9

    tr = build_component("transformer", "full", "meta")
    s = _shapes(tr)
    assert (len(tr.transformer_blocks), len(tr.single_transformer_blocks)) == (19, 38)
    assert s["x_embedder.weight"] == (3072, 64) and s["proj_out.weight"] == (64, 3072)
    assert s["context_embedder.weight"] == (3072, 4096)
    assert s["time_text_embed.text_embedder.linear_1.weight"] == (3072, 768)
    assert "time_text_embed.guidance_embedder.linear_1.weight" in s  # [dev]: guidance embedding
    assert s["transformer_blocks.0.attn.to_q.weight"] == (3072, 3072)
    assert s["transformer_blocks.0.attn.norm_q.weight"] == (128,)  # 24 heads x 128
    assert s["single_transformer_blocks.0.proj_mlp.weight"] == (12288, 3072)
    assert tuple(tr.config.axes_dims_rope) == (16, 56, 56) and tr.config.num_attention_heads == 24

    t5 = build_component("text_encoder_2", "full", "meta")
    s = _shapes(t5)
    assert s["shared.weight"] == (32128, 4096) and len(t5.encoder.block) == 24
    assert s["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"] == (10240, 4096)  # gated: wi_0 and wi_1
    assert s["encoder.block.0.layer.0.SelfAttention.q.weight"] == (4096, 4096)  # 64 heads x 64
    assert s["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] == (32, 64)
    c = t5.config
    assert (c.dense_act_fn, c.is_gated_act, c.relative_attention_max_distance) == ("gelu_new", True, 128)

    clip = build_component("text_encoder", "full", "meta")
    s = {k.removeprefix("text_model."): v for k, v in _shapes(clip).items()}  # transformers 5 drops the prefix
    assert s["embeddings.token_embedding.weight"] == (49408, 768)
    assert s["embeddings.position_embedding.weight"] == (77, 768)
    assert s["encoder.layers.0.mlp.fc1.weight"] == (3072, 768) and "encoder.layers.11.mlp.fc1.weight" in s
    assert (clip.config.hidden_act, clip.config.num_attention_heads, clip.config.projection_dim) == ("quick_gelu", 12, 768)

    vae = build_component("vae", "full", "meta")
    s = _shapes(vae)
    assert s["encoder.conv_out.weight"][0] == 32 and s["decoder.conv_in.weight"][1] == 16  # 16 latent channels
    assert "quant_conv.weight" not in s and "post_quant_conv.weight" not in s
    assert "encoder.mid_block.attentions.0.to_q.weight" in s
    c = vae.config
    assert (c.shift_factor, c.scaling_factor, tuple(c.block_out_channels)) == (0.1159, 0.3611, (128, 256, 512, 512))
    assert (c.layers_per_block, c.sample_size, c.force_upcast) == (2, 1024, True)

    sc = builder.build_scheduler("full").config
    assert (sc.shift, sc.use_dynamic_shifting, sc.base_shift, sc.max_shift) == (3.0, True, 0.5, 1.15)
    assert (sc.base_image_seq_len, sc.max_image_seq_len) == (256, 4096)


def test_full_tokenizers_and_clip_encode_prompts_as_the_pipeline_does():
    from diffusers import FluxKontextPipeline

    torch.manual_seed(0)
    clip = build_component("text_encoder", "full", "cpu")  # 123 M parameters in bf16: a second on the CPU
    tok, tok2 = builder.build_tokenizer("tokenizer", "full"), builder.build_tokenizer("tokenizer_2", "full")
    prompts = ["Make the sky PINK, café style", "x" * 900]
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ids2 = tok2(prompts, padding="max_length", max_length=512, truncation=True, return_tensors="pt").input_ids
    assert ids.shape == (2, 77) and ids2.shape == (2, 512)
    assert int(ids.max()) < 49408 and int(ids2.max()) < 32128
    assert ids[0, 0] == 49406 and (ids[0] == 49407).any() and (ids2[0] == 1).any() and ids2[0, -1] == 0
    assert (ids[0] == 49405).sum() == 0  # accents are folded, not unknown
    pipe = FluxKontextPipeline(scheduler=builder.build_scheduler("full"), vae=None, text_encoder=clip, tokenizer=tok,
                               text_encoder_2=None, tokenizer_2=tok2, transformer=None)
    with torch.no_grad():
        pooled = pipe._get_clip_prompt_embeds(prompts, device="cpu")
    assert pooled.shape == (2, 768) and pooled.dtype == torch.bfloat16 and torch.isfinite(pooled).all()


def test_tiny_variant_is_sharded_loads_and_trains(tmp_path, sample_manifest):
    from diffusers import FluxKontextPipeline

    model = make_random_model(tmp_path / "random-kontext", variant="tiny", seed=3, device="cpu", max_shard_size="50KB")
    assert check_layout(model) == [] and resolve_model_dir(str(model)) == model.resolve()
    for sub, stem in (("transformer", "diffusion_pytorch_model"), ("text_encoder_2", "model")):
        index = json.loads((model / sub / f"{stem}.safetensors.index.json").read_text())
        shards = sorted(p.name for p in (model / sub).glob("*.safetensors"))
        assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    with safe_open(model / "text_encoder" / "model-00001-of-00002.safetensors", "pt") as f:
        assert all(k.startswith("text_model.") for k in f.keys())  # the hub's names, loadable by any transformers
    readme = (model / "README.md").read_text()
    assert "RANDOM WEIGHTS" in readme and "NOT FLUX.1 Kontext" in readme
    assert "variant **tiny**" in readme and "seed **3**" in readme

    pipe = FluxKontextPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(image=torch.rand(1, 3, 32, 32), prompt="add a hat", height=32, width=32, max_area=32 * 32,
                 _auto_resize=False, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="pt").images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "kontext_trainer", "train", str(sample_manifest), "--model", str(model),
           "--output-dir", str(out), "--device", "cpu", "--precision", "fp32", "--max-train-steps", "2",
           "--lora-rank", "4", "--set", "report_to=none", "--set", "skip_final_validation=true", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with safe_open(out / "pytorch_lora_weights.safetensors", "pt") as f:
        keys = list(f.keys())
        assert keys and all(k.startswith("transformer.") for k in keys)
        assert all(torch.isfinite(f.get_tensor(k)).all() for k in keys)


def test_same_seed_same_bytes_and_real_models_are_never_overwritten(tmp_path):
    a = tmp_path / "a"
    result = CliRunner().invoke(app, ["make-random-model", str(a), "--seed", "5", "--device", "cpu",
                                      "--max-shard-size", "100KB"])
    assert result.exit_code == 0, result.output
    assert "NOT real weights" in result.output
    b = make_random_model(tmp_path / "b", variant="tiny", seed=5, device="cpu", max_shard_size="100KB")
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    weights = [f for f in files if f.suffix == ".safetensors"]
    assert len(weights) > 4
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)

    # another seed, written over the first: other weights, and no stale shard left behind
    make_random_model(b, variant="tiny", seed=6, device="cpu")
    assert not list((b / "transformer").glob("*-of-*.safetensors"))
    new = b / "transformer" / "diffusion_pytorch_model.safetensors"
    with safe_open(new, "pt") as f, safe_open(sorted((a / "transformer").glob("*.safetensors"))[0], "pt") as g:
        key = next(iter(g.keys()))
        assert not torch.equal(f.get_tensor(key), g.get_tensor(key))

    # a folder holding anything else (a real model, say) is refused, untouched
    real = tmp_path / "FLUX.1-Kontext-dev"
    (real / "transformer").mkdir(parents=True)
    (real / "model_index.json").write_text("{}")
    with pytest.raises(BuildError, match="not empty"):
        make_random_model(real, variant="tiny", device="cpu")
    assert (real / "model_index.json").read_text() == "{}" and (real / "transformer").is_dir()
