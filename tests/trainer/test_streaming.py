"""Streaming loading of the base on the tiny model, with real diffusers/safetensors/optimum-quanto/peft: the transformer
read block by block (single file and shards) gives exactly what from_pretrained (+ quantize_transformer for quanto)
gives, holds no bf16 copy of a quantized block while the next one is read, takes a LoRA, and names the broken file
when a checkpoint cannot be loaded; text encoders and the VAE load onto the device with unchanged outputs."""

from __future__ import annotations

import gc
import json
import shutil

import pytest
import torch

from kontext_trainer.model import ModelError, block_names, load_text_encoders, load_vae
from kontext_trainer.quantize import QUANTO_EXCLUDE, load_transformer, quantize_transformer


@pytest.fixture(scope="module")
def sharded_model(tiny_model, tmp_path_factory):
    """A copy of the tiny model whose transformer is split into many shards (blocks straddle shard boundaries)."""
    from diffusers import FluxTransformer2DModel

    out = tmp_path_factory.mktemp("sharded") / "tiny-kontext"
    shutil.copytree(tiny_model, out)
    shutil.rmtree(out / "transformer")
    FluxTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer").save_pretrained(
        out / "transformer", max_shard_size="50KB")
    assert len(list((out / "transformer").glob("*.safetensors"))) > 3
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    return out


def _whole(model_dir, precision):
    """Today's reference: the whole model from from_pretrained, then quantize_transformer on all of it."""
    from diffusers import FluxTransformer2DModel

    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    tr = FluxTransformer2DModel.from_pretrained(model_dir, subfolder="transformer", torch_dtype=dtype)
    tr.requires_grad_(False)
    report = quantize_transformer(tr, precision) if precision.endswith("-quanto") else None
    return tr, report


def _tensors(model) -> dict:
    """Every parameter and buffer by full name; a quanto weight as its int8/fp8 `_data` and its `_scale`."""
    out = {}
    for mod_name, module in model.named_modules():
        for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            key = f"{mod_name}.{name}"
            if getattr(t, "_data", None) is not None:
                out[key + "._data"], out[key + "._scale"] = t._data, t._scale
            else:
                out[key] = t
    return out


def _tree(model) -> list:
    return [(n, type(m), m.training, getattr(m, "name", None)) for n, m in model.named_modules()]


@pytest.mark.parametrize("precision,quantize_on", [("bf16", "gpu"), ("fp32", "gpu"), ("int8-quanto", "gpu"),
                                                   ("int8-quanto", "cpu"), ("fp8-quanto", "gpu")])
@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_streamed_base_is_identical_to_the_whole_load(tiny_model, sharded_model, precision, quantize_on, layout):
    model_dir = tiny_model if layout == "single" else sharded_model
    ref, ref_report = _whole(model_dir, precision)
    tr, report = load_transformer(model_dir, precision, "cpu", quantize_on=quantize_on)
    a, b = _tensors(ref), _tensors(tr)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].device == b[key].device, key
        assert torch.equal(a[key], b[key]), key
    assert _tree(tr) == _tree(ref)  # names, classes, train/eval mode, quanto's recorded module names
    assert dict(tr.config) == dict(ref.config)
    assert not any(p.requires_grad for p in tr.parameters())
    assert report == ref_report  # same quantized/kept lists and byte counts (None for bf16/fp32)
    if report is not None:
        assert "proj_out" in report.kept and "single_transformer_blocks.0.proj_out" in report.quantized
        assert b["single_transformer_blocks.0.proj_out.weight._data"].dtype in (torch.int8, torch.float8_e4m3fn)


def test_a_lora_on_the_streamed_int8_base_computes_what_it_does_on_the_whole_load(sharded_model):
    from kontext_trainer.adapters import attach_lora
    from kontext_trainer.flow import kontext_ids
    from kontext_trainer.quantize import DequantLinear, to_dequant_linears

    g = torch.Generator().manual_seed(0)
    args = dict(hidden_states=torch.randn(1, 32, 16, generator=g).bfloat16(), timestep=torch.tensor([0.5]),
                guidance=torch.tensor([1.0]), pooled_projections=torch.randn(1, 32, generator=g).bfloat16(),
                encoder_hidden_states=torch.randn(1, 12, 32, generator=g).bfloat16(), txt_ids=torch.zeros(12, 3),
                img_ids=kontext_ids((8, 8), [(8, 8)]), return_dict=False)
    outputs = []
    for tr in (_whole(sharded_model, "int8-quanto")[0], load_transformer(sharded_model, "int8-quanto", "cpu")[0]):
        attach_lora(tr, rank=4, alpha=4, dropout=0.0, targets="attention+ffs", init_seed=1)
        for name, p in tr.named_parameters():  # a non-zero adapter, so the LoRA path shows in the output
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1, generator=g.manual_seed(len(name)))
        assert all("lora_" in n for n, p in tr.named_parameters() if p.requires_grad)
        assert to_dequant_linears(tr) > 10
        assert isinstance(tr.get_submodule("transformer_blocks.0.attn.to_q.base_layer"), DequantLinear)
        out = tr(**args)[0]
        out.float().square().mean().backward()
        grads = [p.grad for p in tr.parameters() if p.requires_grad]
        assert grads and all(gr is not None and torch.isfinite(gr).all() for gr in grads)
        outputs.append(out.detach())
    assert torch.equal(outputs[0], outputs[1])


def _live_bf16(shapes: set, skip: set) -> int:
    """Real bf16 tensors with a Linear weight's shape that Python can reach, other than those in `skip` (by id).
    Plain tensors and Parameters only: tensor subclasses left by earlier tests (torch.compile's fake tensors, with
    symbolic shapes) hold no memory."""
    return sum(1 for o in gc.get_objects()
               if type(o) in (torch.Tensor, torch.nn.Parameter) and o.dtype == torch.bfloat16 and not o.is_meta
               and tuple(o.shape) in shapes and id(o) not in skip)


def test_int8_loading_reads_and_quantizes_one_block_at_a_time(tiny_model):
    """Between blocks: every block read so far is in place with its Linear weights already int8 (the guide's
    exclusions apart), every later block is still on the meta device (not read), and no bf16 copy of a quantized
    weight is alive anywhere in the process: at most one block is ever in bf16."""
    from optimum.quanto import QLinear, QTensor

    ref, report = _whole(tiny_model, "int8-quanto")
    shapes = {tuple(ref.get_submodule(n).weight._data.shape) for n in report.quantized}
    del ref
    gc.collect()
    baseline = _live_bf16(shapes, set())  # what earlier tests left alive; a streamed load must add none
    seen = []

    def on_block(name, done, total, tr):
        blocks = block_names(tr)
        assert blocks[done - 1] == name and len(blocks) == total
        for i, block in enumerate(blocks):
            tensors = [*tr.get_submodule(block).parameters(), *tr.get_submodule(block).buffers()]
            if i < done:
                assert not any(t.is_meta for t in tensors), block
                for mod_name, m in tr.get_submodule(block).named_modules():
                    full = f"{block}.{mod_name}".rstrip(".")
                    if full in report.quantized:
                        assert isinstance(m, QLinear) and isinstance(m.weight, QTensor), full  # frozen int8
            else:
                assert all(t.is_meta for t in tensors), f"{block} was read before {name} was done"
        own = {id(t) for t in tr.parameters()} | {id(getattr(t, "_scale", None)) for t in tr.parameters()}
        seen.append((name, _live_bf16(shapes, own)))

    tr, streamed_report = load_transformer(tiny_model, "int8-quanto", "cpu", on_block=on_block)
    assert [n for n, _ in seen] == block_names(tr)
    assert [n for n, _ in seen][:2] == ["pos_embed", "time_text_embed"] and "transformer_blocks.0" in dict(seen)
    assert all(count <= baseline for _, count in seen), (baseline, seen)
    assert streamed_report == report


def test_a_bf16_load_reports_each_block_in_order(sharded_model):
    names = []

    def on_block(name, done, total, tr):
        later = block_names(tr)[done:]
        assert all(p.is_meta for b in later for p in tr.get_submodule(b).parameters())
        names.append(name)

    tr, report = load_transformer(sharded_model, "bf16", "cpu", on_block=on_block)
    assert report is None and names == block_names(tr)
    assert {p.dtype for p in tr.parameters()} == {torch.bfloat16} and not any(p.is_meta for p in tr.parameters())


def test_broken_checkpoints_name_the_file_and_the_fix(tiny_model, sharded_model, tmp_path):
    # a shard the index names is missing
    broken = tmp_path / "shard"
    shutil.copytree(sharded_model, broken)
    index = json.loads((broken / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[1]
    (broken / "transformer" / gone).unlink()
    with pytest.raises(ModelError, match=f"names the shard {gone}.*download the model again"):
        load_transformer(broken, "int8-quanto", "cpu")
    # a pickled .bin only: cannot be streamed, the message says how to convert it
    pickled = tmp_path / "bin"
    shutil.copytree(tiny_model, pickled)
    (pickled / "transformer" / "diffusion_pytorch_model.safetensors").rename(
        pickled / "transformer" / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelError, match=r"\.bin checkpoint cannot be read tensor by tensor.*save_pretrained"):
        load_transformer(pickled, "bf16", "cpu")
    # config.json and the weights disagree (one more block in the config)
    other = tmp_path / "config"
    shutil.copytree(tiny_model, other)
    cfg_path = other / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_layers"] = 2
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"lacks \d+ tensor\(s\).*transformer_blocks\.1\."):
        load_transformer(other, "bf16", "cpu")


def test_text_encoders_and_vae_load_on_the_device_with_unchanged_outputs(tiny_model):
    """Against the former way (from_pretrained in the dtype on the CPU, then .to(device)): same weights, same prompt
    embeddings through the pipeline's encode_prompt, same latents."""
    from diffusers import AutoencoderKL, FluxKontextPipeline
    from transformers import CLIPTextModel, T5EncoderModel

    from kontext_trainer.cache import encode_images

    dtype = torch.bfloat16
    enc = load_text_encoders(tiny_model, dtype, "cpu")
    old_te = CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder", dtype=dtype).to("cpu")
    old_te2 = T5EncoderModel.from_pretrained(tiny_model, subfolder="text_encoder_2", dtype=dtype).to("cpu")
    for new, old in ((enc.text_encoder, old_te), (enc.text_encoder_2, old_te2)):
        assert not new.training and not any(p.requires_grad for p in new.parameters())
        sn, so = new.state_dict(), old.state_dict()
        assert sn.keys() == so.keys() and all(sn[k].dtype == so[k].dtype and torch.equal(sn[k], so[k]) for k in sn)
    assert enc.text_encoder_2.shared.weight is enc.text_encoder_2.encoder.embed_tokens.weight  # still tied
    prompts = ["make it blue", "add a hat to the cat"]
    embeds = []
    for te, te2 in ((enc.text_encoder, enc.text_encoder_2), (old_te.eval(), old_te2.eval())):
        pipe = FluxKontextPipeline(scheduler=None, vae=None, text_encoder=te, tokenizer=enc.tokenizer,
                                   text_encoder_2=te2, tokenizer_2=enc.tokenizer_2, transformer=None)
        with torch.no_grad():
            embeds.append(pipe.encode_prompt(prompt=prompts, prompt_2=None, device=torch.device("cpu"),
                                             max_sequence_length=32)[:2])
    assert all(torch.equal(x, y) for x, y in zip(*embeds))

    from PIL import Image

    vae = load_vae(tiny_model, dtype, "cpu")
    old_vae = AutoencoderKL.from_pretrained(tiny_model, subfolder="vae", torch_dtype=dtype).to("cpu").eval()
    assert vae.dtype == dtype and not vae.training and not any(p.requires_grad for p in vae.parameters())
    assert not hasattr(vae, "hf_device_map")
    images = [Image.new("RGB", (64, 48), (120, 30, 200)), Image.new("RGB", (64, 48), (10, 200, 90))]
    assert torch.equal(encode_images(vae, images, "cpu"), encode_images(old_vae, images, "cpu"))
