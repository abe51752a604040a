"""Finding, checking and loading a FLUX.1 Kontext model in diffusers layout, and building a tiny random one.

In: `--model` (a local directory or a hub id). Out: a checked local directory (`resolve_model_dir`), the model's
components loaded one at a time (text encoders, VAE, transformer: each can be freed before the next is loaded),
and a content fingerprint per component that the caches use as part of their keys.

`make_tiny_model(out)` writes a random Kontext model with the real classes (FluxTransformer2DModel,
AutoencoderKL, CLIPTextModel, T5EncoderModel, tokenizers, FlowMatchEulerDiscreteScheduler) in the same layout,
so tests and the demo run the same loading code on the CPU in seconds.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "black-forest-labs/FLUX.1-Kontext-dev"

# sub-folder -> files of which at least one group must exist (config + weights)
_LAYOUT: dict[str, tuple[str, ...]] = {
    "transformer": ("config.json", "*.safetensors"),
    "vae": ("config.json", "*.safetensors"),
    "text_encoder": ("config.json", "*.safetensors"),
    "text_encoder_2": ("config.json", "*.safetensors"),
    "tokenizer": ("tokenizer_config.json",),
    "tokenizer_2": ("tokenizer_config.json",),
    "scheduler": ("scheduler_config.json",),
}


class ModelError(Exception):
    """The model cannot be found or is incomplete. `problems` lists every problem, one message each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(f"  - {p}" for p in self.problems))


def check_layout(model_dir: Path) -> list[str]:
    """Every missing file or sub-folder of a diffusers Kontext layout, by name (empty list: complete)."""
    model_dir = Path(model_dir)
    problems: list[str] = []
    if not (model_dir / "model_index.json").is_file():
        problems.append(f"{model_dir}: missing model_index.json")
    for sub, patterns in _LAYOUT.items():
        folder = model_dir / sub
        if not folder.is_dir():
            problems.append(f"{model_dir}: missing sub-folder {sub}/")
            continue
        for pattern in patterns:
            if "*" in pattern:
                if not any(folder.glob(pattern)):
                    problems.append(f"{folder}: no weights ({pattern}) found")
            elif not (folder / pattern).is_file():
                problems.append(f"{folder}: missing {pattern}")
    if sub_ok(model_dir, "tokenizer") and not _has_tokenizer_files(model_dir / "tokenizer"):
        problems.append(f"{model_dir / 'tokenizer'}: no tokenizer.json or vocab.json/merges.txt")
    if sub_ok(model_dir, "tokenizer_2") and not _has_tokenizer_files(model_dir / "tokenizer_2"):
        problems.append(f"{model_dir / 'tokenizer_2'}: no tokenizer.json or spiece.model")
    return problems


def sub_ok(model_dir: Path, sub: str) -> bool:
    return (Path(model_dir) / sub).is_dir()


def _has_tokenizer_files(folder: Path) -> bool:
    names = {p.name for p in folder.iterdir()}
    return "tokenizer.json" in names or {"vocab.json", "merges.txt"} <= names or "spiece.model" in names


def resolve_model_dir(model: str, allow_download: bool = False) -> Path:
    """A local, complete model directory for `model` (a path or a hub id), or ModelError saying what to do.

    A hub id is looked up in the local Hugging Face cache only (no network) unless `allow_download` is set.
    """
    as_path = Path(model).expanduser()
    looks_like_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", model) is not None and not model.startswith(".")
    if as_path.exists() or not looks_like_hub_id:
        if not as_path.is_dir():
            raise ModelError([f"--model {model}: no such directory. Pass a FLUX.1 Kontext [dev] folder in diffusers "
                              f"layout or a hub id such as {DEFAULT_MODEL}."])
        problems = check_layout(as_path)
        if problems:
            raise ModelError(problems + [f"{as_path} is not a complete FLUX.1 Kontext model in diffusers layout "
                                         f"(download one with `hf download {DEFAULT_MODEL} --local-dir DIR`)."])
        return as_path.resolve()
    # a hub id
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        local = Path(snapshot_download(model, local_files_only=not allow_download))
    except LocalEntryNotFoundError:
        from huggingface_hub.constants import HF_HUB_CACHE

        raise ModelError([
            f"model {model} is not in the local Hugging Face cache ({HF_HUB_CACHE}) and downloading is off.",
            f"download it once (about 34 GB; accept the licence at https://huggingface.co/{model} first):"
            f" `hf auth login && hf download {model}` (into that cache), or"
            f" `hf download {model} --local-dir DIR` and pass --model DIR;"
            " or pass --download to let kontext-train fetch it.",
        ]) from None
    except Exception as exc:  # network / auth / not found
        raise ModelError([f"model {model}: could not be fetched ({type(exc).__name__}: {exc}). "
                          f"Download it with `hf download {model} --local-dir DIR` and pass --model DIR."]) from None
    problems = check_layout(local)
    if problems:
        raise ModelError(problems + [f"the cached copy of {model} is incomplete: run `hf download {model}` again."])
    return local


def fingerprint(model_dir: Path, sub: str) -> str:
    """A content fingerprint of one component: its config and, per weight file, name, size and sampled bytes.

    Cheap (a few MB read per component) yet changes when the weights or the config change. Used in cache keys.
    """
    import xxhash

    folder = Path(model_dir) / sub
    h = xxhash.xxh3_128()
    h.update(sub.encode())
    for p in sorted(folder.iterdir()):
        if not p.is_file():
            continue
        if p.suffix == ".json" or p.suffix in (".txt", ".model"):
            h.update(p.name.encode())
            h.update(p.read_bytes())
        elif p.suffix in (".safetensors", ".bin"):
            size = p.stat().st_size
            h.update(f"{p.name}:{size}".encode())
            with open(p, "rb") as f:
                h.update(f.read(1 << 20))
                if size > 2 << 20:
                    f.seek(size - (1 << 20))
                    h.update(f.read(1 << 20))
    return h.hexdigest()


@dataclass
class TextEncoders:
    tokenizer: Any
    text_encoder: Any
    tokenizer_2: Any
    text_encoder_2: Any


def load_text_encoders(model_dir: Path, dtype, device) -> TextEncoders:
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    tok = AutoTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    tok2 = AutoTokenizer.from_pretrained(model_dir, subfolder="tokenizer_2")
    te = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", torch_dtype=dtype).to(device)
    te2 = T5EncoderModel.from_pretrained(model_dir, subfolder="text_encoder_2", torch_dtype=dtype).to(device)
    te.requires_grad_(False).eval()
    te2.requires_grad_(False).eval()
    return TextEncoders(tok, te, tok2, te2)


def load_vae(model_dir: Path, dtype, device):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", torch_dtype=dtype).to(device)
    vae.requires_grad_(False).eval()
    missing = [k for k in ("shift_factor", "scaling_factor") if vae.config.get(k) is None]
    if missing:
        raise ModelError([f"{Path(model_dir) / 'vae' / 'config.json'}: missing {', '.join(missing)} "
                          "(FLUX's VAE has shift_factor 0.1159 and scaling_factor 0.3611)"])
    return vae


def load_transformer(model_dir: Path, dtype, device):
    from diffusers import FluxTransformer2DModel

    tr = FluxTransformer2DModel.from_pretrained(model_dir, subfolder="transformer", torch_dtype=dtype).to(device)
    tr.requires_grad_(False)
    return tr


def load_scheduler(model_dir: Path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_pretrained(model_dir, subfolder="scheduler")


def free(*modules) -> None:
    """Drop modules and give their memory back (CUDA cache included)."""
    import gc

    import torch

    for m in modules:
        if m is not None and hasattr(m, "to"):
            try:
                m.to("meta")
            except Exception:
                pass
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------- tiny model

_TINY_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,;:!?'\"-_/()+&%#"


def _tiny_tokenizer(max_length: int):
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for c in _TINY_CHARS:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length), len(vocab)


def build_tiny_pipeline(seed: int = 0, device: str = "cpu"):
    """A FluxKontextPipeline of tiny random components with the real classes (see module docstring)."""
    import torch
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline,
                           FluxTransformer2DModel)
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tok, vocab_size = _tiny_tokenizer(77)
    tok2, _ = _tiny_tokenizer(512)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, out_channels=None, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
            guidance_embeds=True, axes_dims_rope=(4, 6, 6),
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
            latent_channels=4, norm_num_groups=4, sample_size=64, shift_factor=0.0609, scaling_factor=1.5035,
            use_quant_conv=False, use_post_quant_conv=False,
        )
        clip = CLIPTextModel(CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, projection_dim=32, pad_token_id=0, bos_token_id=1, eos_token_id=1,
        ))
        t5 = T5EncoderModel(T5Config(
            vocab_size=vocab_size, d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2,
            relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        ))
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    pipe = FluxKontextPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tok,
                               text_encoder_2=t5, tokenizer_2=tok2, transformer=transformer)
    return pipe.to(device)


def make_tiny_model(out_dir: Path | str, seed: int = 0) -> Path:
    """Write a tiny random FLUX.1 Kontext model in diffusers layout to `out_dir` (created; files replaced)."""
    import logging

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = build_tiny_pipeline(seed=seed)
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity(logging.ERROR)
    try:
        pipe.save_pretrained(out_dir)
    finally:
        dlog.set_verbosity(level)
    info = {"kind": "kontext-toolkit tiny random model", "seed": seed,
            "note": "random weights for tests and the demo; its outputs are noise until a LoRA is trained"}
    (out_dir / "TINY_MODEL.json").write_text(json.dumps(info, indent=2) + "\n")
    return out_dir
