"""Random-weight FLUX.1 Kontext [dev] models in the diffusers layout, for benchmarks and tests.

In: a variant (`full`: FLUX.1 Kontext [dev]'s real architecture, 11.9 B transformer + 4.76 B T5-XXL parameters,
~34 GB on disk; `tiny`: a few hundred thousand parameters, for tests and the demo), a seed, a device and a shard
size. Out (`make_random_model`): a folder in the layout of black-forest-labs/FLUX.1-Kontext-dev that
`diffusers.FluxKontextPipeline.from_pretrained`, `kontext_trainer.model.check_layout` and `kontext-train --model`
accept: `model_index.json`; `transformer/`, `vae/`, `text_encoder/`, `text_encoder_2/` (config.json, safetensors
shards and their `*.index.json` where a component is larger than the shard size); `tokenizer/`, `tokenizer_2/`
(character-level tokenizers that work offline); `scheduler/`; and a README.md saying loudly that the weights are
random. Nobody can download the real weights on our machines: this lets `kontext-train` be measured end to end at
full size (loading 24 GB of transformer from disk, T5-XXL, ...). It measures speed and memory, never quality.

The components are the libraries' own classes with the configurations below (FULL, TINY), initialised by the
libraries' own init code from one seeded random stream, built directly on the device in the dtype they are stored
in (bf16 for the full variant, as on the hub), written shard by shard and freed before the next one is built.
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from kontext_data.fileio import write_text_atomic
from kontext_data.problems import ProblemsError

VARIANTS = ("full", "tiny")
COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")  # built in this order from one random stream

# Tokenizers: one token per character (the `tokenizers` library, no files to download). Token ids stay below the
# encoders' vocab sizes; special tokens sit where the real tokenizers put theirs (CLIP's start/end at 49406/49407,
# T5's pad/eos/unk at 0/1/2), so padding and CLIP's pooling (the position of the end token) behave as on the hub.
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,;:!?'\"-_/()+&%#"
_T5_SPECIALS = {"<pad>": 0, "</s>": 1, "<unk>": 2}
_TINY_VOCAB = len(_T5_SPECIALS) + len(_CHARS)

# FLUX.1 Kontext [dev] (diffusers layout). Checked against diffusers 0.42.1 / transformers 5.23 defaults (the Flux
# transformer's defaults are FLUX.1's except guidance_embeds, True for [dev]) and against the public hub configs.
FULL: dict[str, Any] = {
    "transformer": dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                        attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                        pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
    "vae": dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024, shift_factor=0.1159,
                scaling_factor=0.3611, use_quant_conv=False, use_post_quant_conv=False, force_upcast=True,
                mid_block_add_attention=True),
    # CLIP ViT-L/14's text tower as FLUX ships it: its config keeps the old token ids (bos 0, eos 2, pad 1), with
    # which transformers pools at the highest token id, i.e. the first end token of the real tokenizer (and ours)
    "text_encoder": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
                         layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2, pad_token_id=1),
    # T5-v1.1-XXL's encoder; "gated-gelu" makes transformers set dense_act_fn "gelu_new" and is_gated_act True
    "text_encoder_2": dict(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_layers=24, num_heads=64,
                           relative_attention_num_buckets=32, relative_attention_max_distance=128,
                           feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, tie_word_embeddings=False,
                           pad_token_id=0, eos_token_id=1),
    "scheduler": dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096),
    "tokenizer": dict(max_length=77, specials={"<|startoftext|>": 49406, "<|endoftext|>": 49407, "<|unk|>": 49405},
                      bos="<|startoftext|>", eos="<|endoftext|>", pad="<|endoftext|>", unk="<|unk|>", first_id=0,
                      fold_accents=True),
    "tokenizer_2": dict(max_length=512, specials=_T5_SPECIALS, bos=None, eos="</s>", pad="<pad>", unk="<unk>",
                        first_id=3, fold_accents=True),
    "dtype": "bfloat16",  # the hub's files are bf16 (transformer 23.8 GB, T5 9.5 GB, CLIP 246 MB, VAE 168 MB)
    "max_shard_size": {"transformer": "10GB", "text_encoder_2": "5GB"},  # the hub's: 3 and 2 shards
}

# The tiny model of the tests and the demo (see docs/architecture.md): same classes, a few hundred thousand parameters.
TINY: dict[str, Any] = {
    "transformer": dict(patch_size=1, in_channels=16, out_channels=None, num_layers=1, num_single_layers=1,
                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                        guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
    "vae": dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                latent_channels=4, norm_num_groups=4, sample_size=64, shift_factor=0.0609, scaling_factor=1.5035,
                use_quant_conv=False, use_post_quant_conv=False),
    "text_encoder": dict(vocab_size=_TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=32, pad_token_id=0,
                         bos_token_id=1, eos_token_id=1),
    "text_encoder_2": dict(vocab_size=_TINY_VOCAB, d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2,
                           relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
    "scheduler": FULL["scheduler"],
    "tokenizer": dict(FULL["tokenizer_2"], max_length=77, fold_accents=False),
    "tokenizer_2": dict(FULL["tokenizer_2"], fold_accents=False),
    "dtype": "float32",
    "max_shard_size": {},
}

_DEFAULT_SHARD = "10GB"  # diffusers' default; transformers' (50GB) would write T5-XXL as one 9.5 GB file
_MARKER = "made by `kontext-train make-random-model`"
_LEGACY_MARKER = "TINY_MODEL.json"  # what make_tiny_model wrote into its folders before this module


class BuildError(ProblemsError):
    """The random model cannot be built or written where asked; the message names the problem and the fix."""


def variant_spec(variant: str) -> dict[str, Any]:
    """The configurations of a variant (`full` or `tiny`): one entry per component, plus dtype and shard sizes."""
    if variant not in VARIANTS:
        raise BuildError(f"variant {variant!r} is not one of {', '.join(VARIANTS)}")
    return FULL if variant == "full" else TINY


def resolve_device(device: str) -> str:
    """`auto` -> `cuda` when a GPU is visible, else `cpu`; `cpu`, `cuda`, `cuda:N` and `meta` are checked."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device in ("cpu", "meta"):
        return device
    if device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit()):
        if not torch.cuda.is_available():
            raise BuildError(f"device {device!r}: no CUDA GPU is visible to PyTorch; pass --device cpu (slow for the "
                             "full variant) or run on a GPU machine")
        if device != "cuda" and int(device[5:]) >= torch.cuda.device_count():
            raise BuildError(f"device {device!r}: this machine has {torch.cuda.device_count()} GPU(s), numbered from 0")
        return device
    raise BuildError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N")


@contextmanager
def _default_dtype(dtype):
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_component(name: str, variant: str = "full", device: str = "meta", dtype=None):
    """One model component of a variant, built on `device` (`meta`: shapes only, no memory) in `dtype` (default: the
    variant's stored dtype), initialised by its library from the current random state."""
    import torch

    spec = variant_spec(variant)
    if name not in COMPONENTS:
        raise BuildError(f"component {name!r} is not one of {', '.join(COMPONENTS)}")
    dtype = dtype or getattr(torch, spec["dtype"])
    cfg = spec[name]
    # building in the stored dtype on the device itself: no float32 copy of the 12 B model anywhere
    with _default_dtype(dtype), torch.device(device):
        if name == "transformer":
            from diffusers import FluxTransformer2DModel

            model = FluxTransformer2DModel(**cfg)
        elif name == "vae":
            from diffusers import AutoencoderKL

            model = AutoencoderKL(**cfg)
        elif name == "text_encoder":
            from transformers import CLIPTextConfig, CLIPTextModel

            model = CLIPTextModel(CLIPTextConfig(**cfg))
        else:
            from transformers import T5Config, T5EncoderModel

            model = T5EncoderModel(T5Config(**cfg))
    return model.eval()


def build_tokenizer(name: str, variant: str = "full"):
    """`tokenizer` (CLIP's place) or `tokenizer_2` (T5's): a PreTrainedTokenizerFast of one token per character."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    t = variant_spec(variant)[name]
    vocab = dict(t["specials"])
    for i, c in enumerate(_CHARS):
        vocab.setdefault(c, t["first_id"] + i)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=t["unk"]))
    if t["fold_accents"]:  # accented letters become their base letter rather than the unknown token
        tok.normalizer = normalizers.Sequence([normalizers.NFKD(), normalizers.StripAccents(), normalizers.Lowercase()])
    else:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    ends = [t["bos"]] if t["bos"] else []
    template = " ".join(ends + ["$A", t["eos"]])
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(s, vocab[s]) for s in dict.fromkeys(ends + [t["eos"]])])
    extra = {"bos_token": t["bos"]} if t["bos"] else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=t["pad"], eos_token=t["eos"], unk_token=t["unk"],
                                   model_max_length=t["max_length"], **extra)


def build_scheduler(variant: str = "full"):
    """FLUX.1 Kontext's FlowMatchEulerDiscreteScheduler, configured as the variant's."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**variant_spec(variant)["scheduler"])


@contextmanager
def _seeded(seed: int, device: str):
    """A seeded random stream for the builds, leaving the caller's random state as it was."""
    import torch

    devices = []
    if device.startswith("cuda"):
        devices = [torch.device(device).index if torch.device(device).index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def build_pipeline(variant: str = "tiny", seed: int = 0, device: str = "cpu"):
    """A FluxKontextPipeline of random components in memory (same weights as `make_random_model` on the same device
    type). Meant for the tiny variant: the full one needs ~34 GB on `device`."""
    from diffusers import FluxKontextPipeline

    device = resolve_device(device)
    with _seeded(seed, device):
        models = {name: build_component(name, variant, device) for name in COMPONENTS}
    return FluxKontextPipeline(scheduler=build_scheduler(variant), tokenizer=build_tokenizer("tokenizer", variant),
                               tokenizer_2=build_tokenizer("tokenizer_2", variant), **models)


def parameter_counts(variant: str = "full") -> dict[str, int]:
    """Parameters per model component, counted on the meta device (no memory)."""
    return {name: sum(p.numel() for p in build_component(name, variant, "meta").parameters()) for name in COMPONENTS}


@contextmanager
def _quiet_saving():
    """The libraries' shard-writing progress bars and info lines are off while writing (library code never prints)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    levels = dlog.get_verbosity(), tlog.get_verbosity()
    bars = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(levels[0])
        tlog.set_verbosity(levels[1])
        (dlog.enable_progress_bar if bars[0] else dlog.disable_progress_bar)()
        (tlog.enable_progress_bar if bars[1] else tlog.disable_progress_bar)()


def _prepare_folder(out_dir: Path) -> None:
    """Create `out_dir`, or clear a random model written there before; never touch a folder of anything else."""
    if out_dir.exists() and not out_dir.is_dir():
        raise BuildError(f"{out_dir} is a file; pass a folder to write the model to")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        readme = out_dir / "README.md"
        ours = (readme.is_file() and _MARKER in readme.read_text(errors="replace")) or (out_dir / _LEGACY_MARKER).is_file()
        if not ours:
            raise BuildError(f"{out_dir} is not empty and holds no random model made by kontext-train (README.md "
                             "with its marker): pass a new or empty folder, so that no real model is overwritten")
        for sub in (*COMPONENTS, "tokenizer", "tokenizer_2", "scheduler"):
            shutil.rmtree(out_dir / sub, ignore_errors=True)
        for name in ("model_index.json", _LEGACY_MARKER):
            (out_dir / name).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def _check_room(out_dir: Path, variant: str, device: str, counts: dict[str, int], itemsize: int) -> None:
    """Stop before writing when the disk or the GPU is too small for the variant, saying how much is needed."""
    import torch

    total = sum(counts.values()) * itemsize
    free = shutil.disk_usage(out_dir).free
    if free < total * 1.02:
        raise BuildError(f"{out_dir}: {free / 1e9:.1f} GB free on this disk, the {variant} model needs "
                         f"{total / 1e9:.1f} GB: free some space or pass a folder on a larger disk")
    if device.startswith("cuda"):
        largest = max(counts.values()) * itemsize
        free_gpu, _ = torch.cuda.mem_get_info(torch.device(device))
        if free_gpu < largest * 1.02:
            raise BuildError(f"{device}: {free_gpu / 2**30:.1f} GiB free on the GPU, the largest component needs "
                             f"{largest / 2**30:.1f} GiB: use a larger GPU or pass --device cpu (slow)")


def _readme(variant: str, seed: int, device: str, counts: dict[str, int], dtype: str) -> str:
    import diffusers
    import torch
    import transformers

    rows = "\n".join(f"| `{name}/` | {n:,} | {dtype} |" for name, n in counts.items())
    kind = "FLUX.1 Kontext [dev]'s full architecture" if variant == "full" else "a tiny Kontext-shaped model"
    return f"""# RANDOM WEIGHTS: this is NOT FLUX.1 Kontext [dev]

**Every weight in this folder is random noise.** Its images are noise, and a LoRA trained on it is useless.
It was {_MARKER} (`kontext_trainer.builder`), variant **{variant}**, seed **{seed}**, built on a {device.split(':')[0]}
device (torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}).

It has {kind} with the real classes in the diffusers layout of black-forest-labs/FLUX.1-Kontext-dev, so loading,
memory and speed are those of the real model: use it for benchmarks and tests only, never for results. The
tokenizers are character-level stand-ins (token ids below each encoder's vocab size), not CLIP's and T5's.

| component | parameters | dtype |
|---|---|---|
{rows}

Same variant, seed, device type and library versions: the same files. Delete this folder when done; it is never a
substitute for the real weights (`hf download black-forest-labs/FLUX.1-Kontext-dev`, after accepting the licence).
"""


def make_random_model(out_dir: Path | str, variant: str = "full", seed: int = 0, device: str = "auto",
                      max_shard_size: int | str | None = None,
                      on_progress: Callable[[str], None] | None = None) -> Path:
    """Write a random-weight FLUX.1 Kontext [dev] model (`variant` full or tiny) to `out_dir` and return it.

    `out_dir` must be new, empty, or a random model written here before (replaced). `device` auto: CUDA when
    available, else the CPU. On one GPU the full variant takes minutes, mostly writing ~34 GB; it needs ~23 GB of
    free GPU memory and host RAM of about one shard. On the CPU it also works but is slow (many minutes) and needs
    ~30 GB of RAM. `max_shard_size` (e.g. "5GB", or bytes) applies to every component; default: the hub's
    (transformer 10GB -> 3 files, T5 5GB -> 2 files). Weights are deterministic for a seed on one device type
    (CPU, or one GPU model) with the same library versions. `on_progress` receives one line per stage.
    """
    import torch

    spec = variant_spec(variant)
    device = resolve_device(device)
    if device == "meta":
        raise BuildError("device 'meta' has no weights to write; pass auto, cpu or cuda")
    out_dir = Path(out_dir).expanduser()
    say = on_progress or (lambda _msg: None)
    dtype = getattr(torch, spec["dtype"])
    counts = parameter_counts(variant)
    _prepare_folder(out_dir)
    _check_room(out_dir, variant, device, counts, torch.empty((), dtype=dtype).element_size())
    # the README goes first: a build stopped half-way is recognisable as ours (and replaceable), and model_index.json
    # goes last, so check_layout calls a half-written folder incomplete
    write_text_atomic(out_dir / "README.md", _readme(variant, seed, device, counts, spec["dtype"]))
    index: dict[str, Any] = {}
    with _quiet_saving(), _seeded(seed, device):
        for name in COMPONENTS:
            t0 = time.perf_counter()
            model = build_component(name, variant, device, dtype)
            built = time.perf_counter() - t0
            shard = max_shard_size or spec["max_shard_size"].get(name, _DEFAULT_SHARD)
            _hub_key_names(model)
            model.save_pretrained(out_dir / name, max_shard_size=shard)
            index[name] = [type(model).__module__.split(".")[0], type(model).__name__]
            del model
            if counts[name] >= 10_000_000:  # a full collection costs ~0.2 s: only worth it for real-sized parts
                _release()
            files = sorted((out_dir / name).glob("*.safetensors"))
            size = sum(p.stat().st_size for p in files)
            say(f"{name}: {_count(counts[name])} parameters built on {device} in {built:.1f} s; "
                f"{size / 1e6:,.1f} MB in {len(files)} file(s) written in {time.perf_counter() - t0 - built:.1f} s")
        for name in ("tokenizer", "tokenizer_2"):
            tok = build_tokenizer(name, variant)
            tok.save_pretrained(out_dir / name)
            index[name] = [type(tok).__module__.split(".")[0], type(tok).__name__]
        scheduler = build_scheduler(variant)
        scheduler.save_pretrained(out_dir / "scheduler")
        index["scheduler"] = [type(scheduler).__module__.split(".")[0], type(scheduler).__name__]
    _write_model_index(out_dir, index)
    return out_dir


def _hub_key_names(model) -> None:
    """Make transformers write the hub's tensor names. transformers 5 names CLIPTextModel's tensors without the
    `text_model.` prefix of the hub's files (and of transformers 4) and adds it back when saving only for models it
    loaded; a model built from scratch is marked with the library's own mapping, so its files carry the hub's names
    and load in any transformers version."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:  # a transformers without renaming on load: its names are the hub's already
        return
    if model.__class__.__module__.startswith("transformers") and getattr(model, "_weight_conversions", None) is None:
        model._weight_conversions = get_model_conversion_mapping(model, add_legacy=False)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n:,}"


def _release() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _write_model_index(out_dir: Path, components: dict[str, list[str]]) -> None:
    """model_index.json as FluxKontextPipeline.save_pretrained writes it (its optional components left empty)."""
    import diffusers
    from diffusers import FluxKontextPipeline

    config: dict[str, Any] = {"_class_name": FluxKontextPipeline.__name__, "_diffusers_version": diffusers.__version__}
    config.update({name: [None, None] for name in FluxKontextPipeline._optional_components})
    config.update(components)
    write_text_atomic(out_dir / "model_index.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
