"""Finding, checking and loading a FLUX.1 Kontext model in diffusers layout, and building a tiny random one.

In: `--model` (a local directory or a hub id). Out: a checked local directory (`resolve_model_dir`), the model's
components loaded one at a time (text encoders, VAE, transformer: each can be freed before the next is loaded),
and a content fingerprint per component that the caches use as part of their keys.

`make_tiny_model(out)` writes a tiny random Kontext model with the real classes (FluxTransformer2DModel,
AutoencoderKL, CLIPTextModel, T5EncoderModel, tokenizers, FlowMatchEulerDiscreteScheduler) in the same layout,
so tests and the demo run the same loading code on the CPU in seconds; `kontext_trainer.builder` owns its
configurations and also writes the full-size random model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from kontext_data.problems import ProblemsError

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


class ModelError(ProblemsError):
    """The model cannot be found or is incomplete. `problems` lists every problem, one message each."""

    def __init__(self, problems: list[str]):
        super().__init__(problems, message="\n".join(f"  - {p}" for p in problems))


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
    """Whether the model directory has the sub-folder `sub` (e.g. `vae`)."""
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
    """CLIP's tokenizer and encoder, T5's tokenizer and encoder (`_2`), as `load_text_encoders` returns them."""

    tokenizer: Any
    text_encoder: Any
    tokenizer_2: Any
    text_encoder_2: Any


def load_text_encoders(model_dir: Path, dtype, device) -> TextEncoders:
    """Both tokenizers and both text encoders, frozen, in eval mode, with their weights read straight onto `device`
    in `dtype` (`device_map`: no float32 or CPU copy of T5-XXL's ~9.5 GB on the way)."""
    import torch
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    tok = AutoTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    tok2 = AutoTokenizer.from_pretrained(model_dir, subfolder="tokenizer_2")
    place = {"": torch.device(device)}  # one device: transformers loads each tensor there, adds no dispatch hooks
    te = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", dtype=dtype, device_map=place)
    te2 = T5EncoderModel.from_pretrained(model_dir, subfolder="text_encoder_2", dtype=dtype, device_map=place)
    te.requires_grad_(False).eval()
    te2.requires_grad_(False).eval()
    return TextEncoders(tok, te, tok2, te2)


def load_vae(model_dir: Path, dtype, device):
    """The VAE, frozen, in eval mode, its weights read straight onto `device` in `dtype` (`device_map`)."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", torch_dtype=dtype,
                                        device_map={"": torch.device(device)})
    # diffusers records the placement it was asked for; the recipe moves the VAE between the CPU and the device
    # later, so a recorded map would go stale
    vars(vae).pop("hf_device_map", None)
    vae.requires_grad_(False).eval()
    missing = [k for k in ("shift_factor", "scaling_factor") if vae.config.get(k) is None]
    if missing:
        raise ModelError([f"{Path(model_dir) / 'vae' / 'config.json'}: missing {', '.join(missing)} "
                          "(FLUX's VAE has shift_factor 0.1159 and scaling_factor 0.3611)"])
    return vae


TRANSFORMER_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMER_INDEX = "diffusion_pytorch_model.safetensors.index.json"


def transformer_weight_files(model_dir: Path) -> dict[str, Path]:
    """Which safetensors file holds each tensor of the transformer (name -> file): the shards that
    `transformer/diffusion_pytorch_model.safetensors.index.json` names (the index wins, as in diffusers), else the
    single `diffusion_pytorch_model.safetensors`. Reads the index and the files' headers only. ModelError naming
    the file and the fix when a shard is missing, the index and a shard disagree, or there is no safetensors
    checkpoint (a pickled `.bin` cannot be read tensor by tensor: the message says how to convert it)."""
    import json

    from safetensors import SafetensorError, safe_open

    folder = Path(model_dir) / "transformer"
    index = folder / TRANSFORMER_INDEX
    single = folder / TRANSFORMER_WEIGHTS
    again = "download the model again (`hf download <model> --local-dir DIR`)"

    def header_keys(path: Path) -> set[str]:
        try:
            with safe_open(str(path), framework="pt") as fh:
                return set(fh.keys())
        except (SafetensorError, OSError) as exc:
            raise ModelError([f"{path}: not a readable safetensors file ({exc}); {again}"]) from None

    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError([f"{index}: not a safetensors index with a weight_map ({exc}); {again}"]) from None
        shards = sorted(set(weight_map.values()))
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise ModelError([f"{index} names the shard {name}, which is not in {folder}; {again}"
                              for name in missing])
        located: dict[str, Path] = {}
        for name in shards:
            held = header_keys(folder / name)
            for key in sorted(k for k, v in weight_map.items() if v == name):
                if key not in held:
                    raise ModelError([f"{index} places {key} in {name}, which does not hold it; {again}"])
                located[key] = folder / name
        return located
    if single.is_file():
        return dict.fromkeys(sorted(header_keys(single)), single)
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    hint = ""
    if any(name.endswith(".bin") for name in present):
        hint = (" A pickled .bin checkpoint cannot be read tensor by tensor; convert it to safetensors once with "
                "`FluxTransformer2DModel.from_pretrained(DIR, subfolder='transformer')"
                ".save_pretrained('DIR/transformer')`.")
    raise ModelError([f"{folder}: neither {TRANSFORMER_WEIGHTS} nor {TRANSFORMER_INDEX} (found: "
                      f"{', '.join(present) or 'nothing'}).{hint}"])


def empty_transformer(model_dir: Path, dtype):
    """The FluxTransformer2DModel of `transformer/config.json` with its parameters on the meta device (no memory),
    built as diffusers' from_pretrained builds it: same config, default dtype, empty weights, eval mode."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    config = FluxTransformer2DModel.load_config(model_dir, subfolder="transformer")
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "unknown method")
        raise ModelError([f"{Path(model_dir) / 'transformer' / 'config.json'}: a pre-quantized transformer "
                          f"({method}); pass the bf16 FLUX.1 Kontext transformer and pick base_model_precision "
                          "(int8-quanto, fp8-quanto) to quantize it while it loads"])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # as from_pretrained: tensors made at construction get the compute dtype
    try:
        with init_empty_weights():  # parameters on meta; buffers stay real (the checkpoint may not hold them)
            model = FluxTransformer2DModel.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    model.register_to_config(_name_or_path=model_dir)
    model.eval()  # as from_pretrained, before quantization: the QLinear modules quanto makes stay in train mode
    return model


def transformer_blocks(transformer) -> list:
    """The repeated blocks of a FluxTransformer2DModel in the one order the memory levers use: the double-stream
    blocks first, then the single-stream ones. Checkpointing (memory.set_activation_checkpointing), block offload
    (offload) and the planner's size estimates (memory.estimate_block_bytes) all take "the first N blocks" from it."""
    double = list(getattr(transformer, "transformer_blocks", []))
    return double + list(getattr(transformer, "single_transformer_blocks", []))


def block_names(transformer) -> list[str]:
    """The units the transformer is loaded in, in module order: each element of a ModuleList child
    (`transformer_blocks.N`, `single_transformer_blocks.N`), each other child (`x_embedder`, `norm_out`,
    `proj_out`, ...), and "" first for tensors the root module holds itself (none in Flux)."""
    import torch

    own = list(transformer.named_parameters(recurse=False)) + list(transformer.named_buffers(recurse=False))
    names = [""] if own else []
    for child_name, child in transformer.named_children():
        if isinstance(child, torch.nn.ModuleList):
            names.extend(f"{child_name}.{i}" for i in range(len(child)))
        else:
            names.append(child_name)
    return names


def _block_of(key: str, blocks: set[str]) -> str:
    parts = key.split(".")
    if len(parts) > 2 and f"{parts[0]}.{parts[1]}" in blocks:
        return f"{parts[0]}.{parts[1]}"
    return parts[0] if len(parts) > 1 and parts[0] in blocks else ""


def _read_block(transformer, keys: list[str], files: dict[str, Path], dtype, device, fp32_modules) -> None:
    """Replace the meta tensors `keys` of `transformer` with the checkpoint's, tensor by tensor: read (memory-mapped),
    floating tensors cast to `dtype` on the CPU as from_pretrained casts them, copied to `device`. The files are
    opened for this block only: once no tensor on the CPU views them (the block is on a GPU), the pages of the
    blocks already read leave the process (they stay in the page cache, which the kernel can reclaim)."""
    import contextlib

    import torch
    from safetensors import safe_open

    with contextlib.ExitStack() as stack:
        handles: dict[Path, Any] = {}
        for key in keys:
            path = files[key]
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            module_name, _, leaf = key.rpartition(".")
            module = transformer.get_submodule(module_name)
            empty = getattr(module, leaf)
            tensor = handles[path].get_tensor(key)
            if tuple(tensor.shape) != tuple(empty.shape):
                raise ModelError([f"{path}: {key} has shape {tuple(tensor.shape)} but the model built from "
                                  f"{path.parent / 'config.json'} expects {tuple(empty.shape)}: the config and the "
                                  "weights belong to different models; download the model again"])
            if tensor.is_floating_point():
                keep_fp32 = any(m in key.split(".") for m in fp32_modules)
                tensor = tensor.to(torch.float32 if keep_fp32 else dtype)
            # a synchronous copy: the source may be a view of the memory-mapped file, closed right after
            tensor = tensor.to(device)
            if isinstance(empty, torch.nn.Parameter):
                setattr(module, leaf, torch.nn.Parameter(tensor, requires_grad=False))
            else:
                setattr(module, leaf, tensor)


def load_transformer(model_dir: Path, dtype, device, *, read_device=None, prepare=None, on_block=None,
                     host_blocks=(), skeleton=None):
    """The frozen FluxTransformer2DModel of `model_dir/transformer`, streamed: built on the meta device from
    config.json (no memory), then its weights read block by block (`block_names`: each double and single
    block, and each other top-level module) from the safetensors file or the shards of the index, tensor by tensor,
    cast to `dtype` (as from_pretrained) and copied to `device`; the tensors, config and eval mode are exactly
    from_pretrained's. While loading onto a GPU the device holds the blocks loaded so far plus the one being read,
    and the host about one block: its memory-mapped file pages (unmapped once the block is on the device) and, with
    `read_device` "cpu", its tensors there.

    `read_device` (default `device`): where a block's tensors land first. `prepare(name, transformer)` runs on
    each block once its tensors are there (quantize.load_transformer quantizes it), before the block moves to
    `device` and the next block is read. `on_block(name, done, total, transformer)` reports progress after each
    block. `host_blocks`: names of blocks that end in CPU memory instead (the blocks block offload will stream, so a
    card smaller than the whole base never holds it). ModelError (naming the file and the fix) when the checkpoint
    and config.json disagree. `skeleton`: the meta-device model of `empty_transformer(model_dir, dtype)` when the
    caller built it already (the memory plan reads its shapes), filled in place instead of built again."""
    import torch

    device = torch.device(device)
    read_device = device if read_device is None else torch.device(read_device)
    files = transformer_weight_files(model_dir)
    transformer = empty_transformer(model_dir, dtype) if skeleton is None else skeleton
    folder = Path(model_dir) / "transformer"
    expected = list(transformer.state_dict().keys())
    missing = [k for k in expected if k not in files]
    unexpected = sorted(set(files) - set(expected))
    problems = []
    if missing:
        problems.append(f"{folder}: the checkpoint lacks {len(missing)} tensor(s) that the model of its config.json "
                        f"has: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"{folder}: the checkpoint holds {len(unexpected)} tensor(s) that the model of its "
                        f"config.json lacks: {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    if problems:
        raise ModelError(problems + [f"{folder}: config.json and the weights do not belong together; download the "
                                     "model again"])
    blocks = block_names(transformer)
    block_set = set(blocks)
    keys_of: dict[str, list[str]] = {name: [] for name in blocks}
    for key in expected:
        keys_of[_block_of(key, block_set)].append(key)
    fp32_modules = list(type(transformer)._keep_in_fp32_modules or [])
    for done, name in enumerate(blocks, 1):
        _read_block(transformer, keys_of[name], files, dtype, read_device if name else device, fp32_modules)
        if prepare is not None:
            prepare(name, transformer)
        if name:
            # after quantizing on the CPU; also brings buffers the checkpoint does not hold
            transformer.get_submodule(name).to("cpu" if name in host_blocks else device)
        if on_block is not None:
            on_block(name, done, len(blocks), transformer)
    transformer.requires_grad_(False)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the freed bf16 blocks: give the cached memory back, as from_pretrained does
    return transformer


def load_scheduler(model_dir: Path):
    """The model's FlowMatchEulerDiscreteScheduler (`scheduler/`)."""
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
# The configurations and the writing code live in kontext_trainer.builder (one owner for the tiny and full variants).


def build_tiny_pipeline(seed: int = 0, device: str = "cpu"):
    """A FluxKontextPipeline of tiny random components with the real classes (see module docstring).

    Built on the CPU and then moved, so a seed gives the same weights on every device."""
    from kontext_trainer.builder import build_pipeline

    return build_pipeline("tiny", seed=seed, device="cpu").to(device)


def make_tiny_model(out_dir: Path | str, seed: int = 0) -> Path:
    """Write a tiny random FLUX.1 Kontext model in diffusers layout to `out_dir` (created; a random model written there
    before is replaced). Built on the CPU: a seed gives the same files on every machine with the same libraries."""
    from kontext_trainer.builder import make_random_model

    return make_random_model(out_dir, variant="tiny", seed=seed, device="cpu")
