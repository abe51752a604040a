"""Adapter files in other tools' formats: diffusers (peft) <-> ComfyUI (Kohya LoRA / LyCORIS LoKr).

In: an adapter file (`pytorch_lora_weights.safetensors` as the trainer saves it, or a Kohya/LyCORIS file). Out: the
same adapter in the other format, written atomically. `kontext-train export ADAPTER --format comfyui|diffusers`.

LoRA, ComfyUI/Kohya format: keys `lora_unet_<BFL module, "." -> "_">.lora_down.weight` / `.lora_up.weight` /
`.alpha` on the BFL (original Flux) module names, the names ComfyUI, Kohya's sd-scripts and diffusers'
`_convert_kohya_flux_lora_to_diffusers` use. diffusers splits projections that BFL fuses:

- double block: `attn.to_q/to_k/to_v` = `img_attn.qkv`; `attn.add_q_proj/add_k_proj/add_v_proj` = `txt_attn.qkv`;
- single block: `attn.to_q/to_k/to_v` + `proj_mlp` = `linear1` (rows q | k | v | mlp).

A fused LoRA is exact: `lora_down` = the parts' down weights stacked (rank n*r), `lora_up` = their up weights
block-diagonal (each scaled by its alpha/rank; alpha = n*r, so the stored scale is 1). A part the adapter does not
train (e.g. proj_mlp under the `attention` preset) gets a zero block. The final `norm_out.linear` swaps its two
halves (diffusers: scale, shift; BFL: shift, scale).

LoKr, ComfyUI format: a Kronecker product cannot be fused across q/k/v, so LoKr keeps diffusers module names with
the `lycoris_` prefix SimpleTuner writes (`lycoris_transformer_blocks_0_attn_to_q.lokr_w1`), which ComfyUI maps
onto slices of the fused BFL weights; `.alpha` is the peft alpha (ComfyUI and LyCORIS scale by alpha/rank only
when a factor is decomposed; a full-matrix adapter's scale is baked into lokr_w1).

The diffusers file the trainer writes also loads in ComfyUI as is (it maps `transformer.<module>` keys itself) when
alpha equals the rank (ComfyUI ignores diffusers' metadata alpha); the Kohya export stores alpha and suits tools that
only read BFL names.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from kontext_data.fileio import atomic_path
from kontext_data.problems import ProblemsError

FORMATS = ("diffusers", "comfyui")
LORA_FILE = "pytorch_lora_weights.safetensors"

DOUBLE_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
DOUBLE_SIMPLE = {
    "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
    "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
}
SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
SINGLE_SIMPLE = {"proj_out": "linear2", "norm.linear": "modulation.lin"}
TOP_SIMPLE = {
    "x_embedder": "img_in", "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "proj_out": "final_layer.linear", "norm_out.linear": "final_layer.adaLN_modulation.1",
}
SWAPPED = {"final_layer.adaLN_modulation.1"}  # halves swapped between diffusers and BFL
ALPHA_BAKED = {"final_layer.linear", "final_layer.adaLN_modulation.1"}  # diffusers' converter ignores their alpha
MLP_RATIO = 4  # Flux single blocks: proj_mlp has 4 x hidden outputs


class ExportError(ProblemsError):
    """The adapter cannot be converted. `problems` lists every problem."""

    def __init__(self, problems: list[str]):
        super().__init__(problems, message="\n".join(f"  - {p}" for p in problems))


@dataclass
class ExportResult:
    """What `export_adapter` wrote, and from what."""

    path: Path
    source_format: str
    target_format: str
    adapter: str  # lora | lokr
    modules_in: int
    keys_out: int
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ names


# (diffusers block prefix, BFL block prefix, fused modules, one-to-one modules) of the double and single blocks
_BLOCK_KINDS = (
    ("transformer_blocks", "double_blocks", DOUBLE_FUSED, DOUBLE_SIMPLE),
    ("single_transformer_blocks", "single_blocks", SINGLE_FUSED, SINGLE_SIMPLE),
)


def bfl_name(module: str) -> tuple[str, int | None, int]:
    """diffusers module name -> (BFL module name, part index in a fused module or None, number of parts).
    Raises KeyError for a module with no BFL counterpart."""
    for ours, prefix, fused_modules, simple in _BLOCK_KINDS:
        m = re.fullmatch(rf"{ours}\.(\d+)\.(.+)", module)
        if m:
            i, rest = m.groups()
            for fused, parts in fused_modules.items():
                if rest in parts:
                    return f"{prefix}.{i}.{fused}", parts.index(rest), len(parts)
            if rest in simple:
                return f"{prefix}.{i}.{simple[rest]}", None, 1
            raise KeyError(module)
    if module in TOP_SIMPLE:
        return TOP_SIMPLE[module], None, 1
    raise KeyError(module)


def diffusers_parts(bfl: str) -> list[str]:
    """BFL module name -> the diffusers module(s) it holds, in row order. Raises KeyError."""
    for ours, prefix, fused_modules, simple in _BLOCK_KINDS:
        m = re.fullmatch(rf"{prefix}\.(\d+)\.(.+)", bfl)
        if m:
            i, rest = m.groups()
            if rest in fused_modules:
                return [f"{ours}.{i}.{p}" for p in fused_modules[rest]]
            inv = {v: k for k, v in simple.items()}
            return [f"{ours}.{i}.{inv[rest]}"]
    inv = {v: k for k, v in TOP_SIMPLE.items()}
    return [inv[bfl]]


def _underscored_index() -> dict[str, str]:
    """Underscored names -> dotted, for every BFL module pattern (block indices replaced by {i})."""
    names = {}
    for fused in list(DOUBLE_FUSED) + list(DOUBLE_SIMPLE.values()):
        names[f"double_blocks_{{i}}_{fused.replace('.', '_')}"] = f"double_blocks.{{i}}.{fused}"
    for fused in list(SINGLE_FUSED) + list(SINGLE_SIMPLE.values()):
        names[f"single_blocks_{{i}}_{fused.replace('.', '_')}"] = f"single_blocks.{{i}}.{fused}"
    for bfl in TOP_SIMPLE.values():
        names[bfl.replace(".", "_")] = bfl
    return names


def _dotted(underscored: str, kind: str) -> str:
    """`double_blocks_3_img_attn_qkv` -> `double_blocks.3.img_attn.qkv` (kind bfl), or a diffusers name from
    `transformer_blocks_3_attn_to_q` (kind diffusers). Raises KeyError."""
    if kind == "bfl":
        table = _underscored_index()
    else:
        suffixes = (list(DOUBLE_SIMPLE) + [p for ps in DOUBLE_FUSED.values() for p in ps])
        single = list(SINGLE_SIMPLE) + [p for ps in SINGLE_FUSED.values() for p in ps]
        table = {f"transformer_blocks_{{i}}_{s.replace('.', '_')}": f"transformer_blocks.{{i}}.{s}" for s in suffixes}
        table.update({f"single_transformer_blocks_{{i}}_{s.replace('.', '_')}": f"single_transformer_blocks.{{i}}.{s}"
                      for s in single})
        table.update({k.replace(".", "_"): k for k in TOP_SIMPLE})
    m = re.fullmatch(r"((?:single_transformer_blocks|transformer_blocks|double_blocks|single_blocks)_)(\d+)_(.+)",
                     underscored)
    if m:
        key = f"{m.group(1)}{{i}}_{m.group(3)}"
        if key in table:
            return table[key].format(i=m.group(2))
        raise KeyError(underscored)
    if underscored in table:
        return table[underscored]
    raise KeyError(underscored)


# ------------------------------------------------------------------------------------------------ reading


def detect_format(state_dict: Mapping[str, torch.Tensor]) -> tuple[str, str]:
    """(format, adapter) of a state dict: ('diffusers'|'comfyui', 'lora'|'lokr'). Raises ExportError."""
    keys = list(state_dict)
    if keys and all(k.startswith("transformer.") for k in keys):
        if any(".lokr_" in k for k in keys):
            return "diffusers", "lokr"
        if any(".lora_A." in k for k in keys):
            return "diffusers", "lora"
    if keys and all(k.startswith("lora_unet_") for k in keys):
        return "comfyui", "lora"
    if keys and all(k.startswith("lycoris_") for k in keys):
        return "comfyui", "lokr"
    sample = ", ".join(keys[:3])
    raise ExportError([f"unrecognized adapter keys (e.g. {sample}): expected diffusers keys "
                       "`transformer.<module>.lora_A.weight` / `.lokr_w1`, Kohya `lora_unet_...lora_down.weight` or "
                       "LyCORIS `lycoris_...lokr_w1`"])


def _lora_scale(metadata: Mapping[str, str] | None, module: str, rank: int) -> float:
    """peft's scaling of one module (lora_alpha / r, with alpha_pattern / rank_pattern / use_rslora) from diffusers'
    `lora_adapter_metadata`; 1.0 without metadata (diffusers' own default: alpha = rank)."""
    if not metadata or "lora_adapter_metadata" not in metadata:
        return 1.0
    cfg = {k.split(".", 1)[1] if k.startswith("transformer.") else k: v
           for k, v in json.loads(metadata["lora_adapter_metadata"]).items()}

    def pick(pattern: dict | None, default):
        for pat, value in (pattern or {}).items():
            if re.match(rf"(.*\.)?({pat.lstrip('^')})$", module):
                return value
        return default

    r = float(pick(cfg.get("rank_pattern"), cfg.get("r", rank)))
    alpha = float(pick(cfg.get("alpha_pattern"), cfg.get("lora_alpha", r)))
    return alpha / (r ** 0.5 if cfg.get("use_rslora") else r)


# ------------------------------------------------------------------------------------------------ LoRA


def lora_to_comfyui(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
                    ) -> dict[str, torch.Tensor]:
    """diffusers LoRA (`transformer.<m>.lora_A/B.weight`) -> Kohya keys on BFL names (see the module docstring).
    Raises ExportError listing every module with no BFL counterpart."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    problems = []
    for key, value in state_dict.items():
        m = re.fullmatch(r"transformer\.(.+)\.lora_([AB])\.weight", key)
        if not m:
            problems.append(f"{key}: not a diffusers LoRA weight key")
            continue
        modules.setdefault(m.group(1), {})[m.group(2)] = value.float()
    groups: dict[str, dict[int | None, tuple[torch.Tensor, torch.Tensor, float]]] = {}
    nparts: dict[str, int] = {}
    for module, ab in sorted(modules.items()):
        if set(ab) != {"A", "B"}:
            problems.append(f"{module}: lora_A and lora_B must both be present")
            continue
        try:
            bfl, part, n = bfl_name(module)
        except KeyError:
            problems.append(f"{module}: no module of the BFL Flux model corresponds to it")
            continue
        rank = ab["A"].shape[0]
        groups.setdefault(bfl, {})[part] = (ab["A"], ab["B"], _lora_scale(metadata, module, rank))
        nparts[bfl] = n
    if problems:
        raise ExportError(problems)
    out: dict[str, torch.Tensor] = {}
    for bfl, parts in groups.items():
        name = "lora_unet_" + bfl.replace(".", "_")
        if nparts[bfl] == 1:
            a, b, scale = parts[None]
            alpha = scale * a.shape[0]
            if bfl in ALPHA_BAKED:  # bake the scale into lora_up (alpha = rank)
                b, alpha = b * scale, float(a.shape[0])
            if bfl in SWAPPED:
                b = torch.cat(b.chunk(2, dim=0)[::-1], dim=0)
            out[f"{name}.lora_down.weight"] = a.contiguous()
            out[f"{name}.lora_up.weight"] = b.contiguous()
            out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
            continue
        n = nparts[bfl]
        r = max(a.shape[0] for a, _, _ in parts.values())
        in_dim = next(iter(parts.values()))[0].shape[1]
        qkv_out = next((b.shape[0] for p, (_, b, _) in parts.items() if p is not None and p < 3), in_dim)
        downs, ups = [], []
        for p in range(n):
            out_dim = qkv_out if p < 3 else MLP_RATIO * in_dim
            if p in parts:
                a, b, scale = parts[p]
                a_pad = torch.zeros(r, in_dim)
                a_pad[: a.shape[0]] = a
                b_pad = torch.zeros(b.shape[0], r)
                b_pad[:, : b.shape[1]] = b * scale
                downs.append(a_pad)
                ups.append(b_pad)
            else:
                downs.append(torch.zeros(r, in_dim))
                ups.append(torch.zeros(out_dim, r))
        out[f"{name}.lora_down.weight"] = torch.cat(downs, dim=0).contiguous()
        out[f"{name}.lora_up.weight"] = torch.block_diag(*ups).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(n * r), dtype=torch.float32)
    return out


def comfyui_to_lora(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Kohya keys on BFL names -> diffusers LoRA keys, alpha/rank baked into lora_B (so it loads with scale 1).
    A fused module whose up weight is block-diagonal splits exactly into its parts' ranks; otherwise each part
    gets the whole down weight and its rows of the up weight. All-zero parts are dropped."""
    problems = []
    names = sorted({k.split(".", 1)[0] for k in state_dict})
    out: dict[str, torch.Tensor] = {}
    for name in names:
        down = state_dict.get(f"{name}.lora_down.weight")
        up = state_dict.get(f"{name}.lora_up.weight")
        if down is None or up is None:
            problems.append(f"{name}: lora_down and lora_up must both be present")
            continue
        try:
            bfl = _dotted(name[len("lora_unet_"):], "bfl")
            parts = diffusers_parts(bfl)
        except KeyError:
            problems.append(f"{name}: not a module of the BFL Flux transformer")
            continue
        down, up = down.float(), up.float()
        rank = down.shape[0]
        alpha = state_dict.get(f"{name}.alpha")
        scale = (float(alpha) if alpha is not None else rank) / rank
        if len(parts) == 1:
            if bfl in SWAPPED:
                up = torch.cat(up.chunk(2, dim=0)[::-1], dim=0)
            out[f"transformer.{parts[0]}.lora_A.weight"] = down.contiguous()
            out[f"transformer.{parts[0]}.lora_B.weight"] = (up * scale).contiguous()
            continue
        n = len(parts)
        in_dim = down.shape[1]
        dims = [in_dim] * 3 + [up.shape[0] - 3 * in_dim] if n == 4 else [up.shape[0] // n] * n
        if sum(dims) != up.shape[0] or min(dims) <= 0:
            problems.append(f"{name}: lora_up has {up.shape[0]} rows, which do not split into {n} parts")
            continue
        rows = torch.split(up, dims, dim=0)
        sparse = rank % n == 0 and all(
            not rows[j][:, k * (rank // n):(k + 1) * (rank // n)].any() for j in range(n) for k in range(n) if j != k)
        for j, module in enumerate(parts):
            if sparse:
                r = rank // n
                a, b = down[j * r:(j + 1) * r], rows[j][:, j * r:(j + 1) * r]
            else:
                a, b = down, rows[j]
            if not a.any() and not b.any():
                continue
            out[f"transformer.{module}.lora_A.weight"] = a.contiguous()
            out[f"transformer.{module}.lora_B.weight"] = (b * scale).contiguous()
    if problems:
        raise ExportError(problems)
    return out


# ------------------------------------------------------------------------------------------------ LoKr

LOKR_SUFFIXES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def _lokr_scale(metadata: Mapping[str, str] | None, rank: int) -> tuple[float, float]:
    """(peft alpha, peft r) of a LoKr file from its metadata."""
    cfg = {}
    if metadata and "lora_adapter_metadata" in metadata:
        cfg = {k.split(".", 1)[-1]: v for k, v in json.loads(metadata["lora_adapter_metadata"]).items()}
    alpha = cfg.get("alpha", metadata.get("kontext.alpha") if metadata else None)
    r = cfg.get("r", metadata.get("kontext.rank") if metadata else None)
    return float(alpha if alpha not in (None, "None") else rank), float(r if r not in (None, "None") else rank)


def lokr_to_comfyui(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
                    ) -> dict[str, torch.Tensor]:
    """diffusers/peft LoKr keys -> LyCORIS keys with SimpleTuner's `lycoris_` prefix, alpha as ComfyUI reads it."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        module, _, suffix = key[len("transformer."):].rpartition(".")
        if suffix not in LOKR_SUFFIXES:
            raise ExportError([f"{key}: not a LoKr weight key"])
        modules.setdefault(module, {})[suffix] = value.float()
    out = {}
    for module, parts in sorted(modules.items()):
        decomposed = [s for s in parts if s.endswith(("_a", "_b"))]
        rank = next((v.shape[1] for s, v in parts.items() if s in ("lokr_w1_a", "lokr_w2_a")), None)
        alpha, r = _lokr_scale(metadata, rank or 1)
        name = "lycoris_" + module.replace(".", "_")
        parts = dict(parts)
        if decomposed:
            # peft scales alpha/r, ComfyUI/LyCORIS alpha/dim with dim = the rank of the decomposition: the same
            out[f"{name}.alpha"] = torch.tensor(alpha * rank / r, dtype=torch.float32)
        else:
            if alpha / r != 1.0:
                parts["lokr_w1"] = parts["lokr_w1"] * (alpha / r)
            out[f"{name}.alpha"] = torch.tensor(1.0, dtype=torch.float32)
        for suffix, value in parts.items():
            out[f"{name}.{suffix}"] = value.contiguous()
    return out


def comfyui_to_lokr(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LyCORIS `lycoris_<diffusers name>` keys -> peft keys, alpha baked into the first factor (as diffusers does)."""
    problems, out = [], {}
    names = sorted({k.split(".", 1)[0] for k in state_dict})
    for name in names:
        try:
            module = _dotted(name[len("lycoris_"):], "diffusers")
        except KeyError:
            problems.append(f"{name}: not a module of the diffusers Flux transformer")
            continue
        parts = {k.split(".", 1)[1]: v.float() for k, v in state_dict.items() if k.split(".", 1)[0] == name}
        alpha = parts.pop("alpha", None)
        dim = parts["lokr_w2_b"].shape[0] if "lokr_w2_b" in parts else (
            parts["lokr_w1_b"].shape[0] if "lokr_w1_b" in parts else None)
        if alpha is not None and dim is not None:
            key = "lokr_w1" if "lokr_w1" in parts else "lokr_w1_a"
            parts[key] = parts[key] * (float(alpha) / dim)
        for suffix, value in parts.items():
            out[f"transformer.{module}.{suffix}"] = value.contiguous()
    if problems:
        raise ExportError(problems)
    return out


# ------------------------------------------------------------------------------------------------ files


def _adapter_file(path: Path) -> Path:
    if path.is_dir():
        f = path / LORA_FILE
        if not f.is_file():
            raise ExportError([f"{path}: no {LORA_FILE} in this folder (pass the .safetensors file itself)"])
        return f
    if not path.is_file():
        raise ExportError([f"{path}: no such file or folder"])
    return path


def default_output(source: Path, target_format: str) -> Path:
    """Where an export goes without --out: NAME_comfyui.safetensors beside the source, or diffusers/ beside it."""
    folder = source.parent
    if target_format == "comfyui":
        return folder / f"{source.stem}_comfyui.safetensors"
    return folder / "diffusers" / LORA_FILE


def export_adapter(adapter: Path | str, target_format: str, out: Path | str | None = None) -> ExportResult:
    """Convert the adapter at `adapter` (a folder with pytorch_lora_weights.safetensors, or a file) to
    `target_format` and write it to `out` (default: beside the source). Raises ExportError."""
    from safetensors import safe_open

    if target_format not in FORMATS:
        raise ExportError([f"--format {target_format!r} is not one of {', '.join(FORMATS)}"])
    source = _adapter_file(Path(adapter))
    with safe_open(str(source), "pt") as fh:
        sd = {k: fh.get_tensor(k) for k in fh.keys()}
        metadata = fh.metadata() or {}
    fmt, kind = detect_format(sd)
    notes = []
    if fmt == target_format:
        converted = {k: v.float().contiguous() for k, v in sd.items()}
        notes.append(f"{source.name} is already in {target_format} format: copied")
    elif target_format == "comfyui":
        converted = lora_to_comfyui(sd, metadata) if kind == "lora" else lokr_to_comfyui(sd, metadata)
    else:
        converted = comfyui_to_lora(sd) if kind == "lora" else comfyui_to_lokr(sd)
    meta = {"format": "pt", "kontext.exported_from": fmt, "kontext.adapter": kind}
    for key in ("kontext_training_config", "kontext.lokr_factors"):  # factors: load_adapter rebuilds a 2-factor LoKr
        if key in metadata:
            meta[key] = metadata[key]
    if fmt == target_format and "lora_adapter_metadata" in metadata:
        meta["lora_adapter_metadata"] = metadata["lora_adapter_metadata"]
    target = Path(out) if out else default_output(source, target_format)
    if target.resolve() == source.resolve():
        raise ExportError([f"{target}: the output would overwrite the input; pass another --out"])
    from safetensors.torch import save_file

    with atomic_path(target) as tmp:
        save_file(converted, str(tmp), metadata=meta)
    n_modules = len({re.sub(r"(\.lora_[AB]\.weight|\.lora_(down|up)\.weight|\.alpha|\.lokr_\w+)$", "", k) for k in sd})
    return ExportResult(path=target, source_format=fmt, target_format=target_format, adapter=kind,
                        modules_in=n_modules, keys_out=len(converted), notes=notes)
