"""Validation images: FluxKontextPipeline with the live adapter, one strip per sample.

In: the training transformer (adapter attached), the VAE and scheduler, samples with cached prompt embeddings.
Out: strips reference(s) | output | target with the caption below (`ValidationResult`, images in memory), which
`save_strips` writes as `validation/step_NNNNNN/<sample>.png`. Rendering and writing are apart so that several
processes can each render a share and one writes them all.

The pipeline encodes the reference itself (VAE mode, minus shift_factor, times scaling_factor), which is the
normalization the caches use for training: validation sees what training saw. The pipeline takes one reference;
a sample with several is validated with its first (all are shown in the strip).

`run_prompt_validation` renders the `validation_prompts` file's edits with the same pipeline and settings: strips
reference(s) | output, `validation/step_NNNNNN/prompt-NN-<words>.png`.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from kontext_data.fileio import atomic_path
from kontext_trainer.data import Sample


@dataclass
class ValidationResult:
    """One rendered validation strip."""

    sample_id: str
    caption: str
    file_name: str
    """The strip's file name in the step's validation folder."""
    strip: object  # PIL.Image


def save_strips(results: list[ValidationResult], out_dir: Path) -> list[Path]:
    """Write each strip to `out_dir/<file_name>` (atomically); returns the paths, in order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for r in results:
        path = out_dir / r.file_name
        with atomic_path(path) as tmp:  # the temp name keeps .png: PIL picks the format by it
            r.strip.save(tmp)
        paths.append(path)
    return paths


def _safe_name(text: str) -> str:
    text = re.sub(r"\.(png|jpe?g|webp|bmp|tiff?|gif)$", "", text, flags=re.I)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "sample"


def make_strip(images: list, caption: str, labels: list[str]):
    """Images side by side at one height, labels above each, the caption below (wrapped)."""
    from PIL import Image, ImageDraw, ImageFont

    height = max(im.height for im in images)
    scaled = [im if im.height == height else im.resize((max(1, round(im.width * height / im.height)), height))
              for im in images]
    font = ImageFont.load_default()
    pad = 4
    label_h = 14
    width = sum(im.width for im in scaled) + pad * (len(scaled) + 1)
    chars_per_line = max(8, width // 7)
    words, lines, line = caption.split(), [], ""
    for w in words:
        if len(line) + len(w) + 1 > chars_per_line and line:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    lines.append(line)
    text_h = 14 * len(lines) + pad
    canvas = Image.new("RGB", (width, label_h + height + text_h + pad * 2), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = pad
    for im, label in zip(scaled, labels):
        draw.text((x, 1), label, fill=(0, 0, 0), font=font)
        canvas.paste(im, (x, label_h + pad))
        x += im.width + pad
    y = label_h + pad + height + pad
    for ln in lines:
        draw.text((pad, y), ln, fill=(0, 0, 0), font=font)
        y += 14
    return canvas


def parse_resolution(text: str) -> tuple[int, int] | None:
    """validation_resolution as (width, height): "WxH" or "N" (NxN); None when empty."""
    if not text:
        return None
    w, _, h = text.partition("x")
    return int(w), int(h or w)


@contextlib.contextmanager
def _edit_pipeline(transformer, vae, scheduler):
    """A FluxKontextPipeline over the live transformer (no text encoders: embeddings come from the cache), the
    transformer in eval mode meanwhile."""
    from diffusers import FluxKontextPipeline

    was_training = transformer.training
    transformer.eval()
    pipe = FluxKontextPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                               tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    try:
        yield pipe
    finally:
        if was_training:
            transformer.train()


def _edit(pipe, refs, embedding, width: int, height: int, seed: int, *, guidance: float, num_inference_steps: int,
          device, dtype, attention_context=None):
    """One edit of `refs` (the first reference, as FluxKontextPipeline takes one) with cached prompt embeddings."""
    prompt_embeds, pooled = embedding
    generator = torch.Generator(device="cpu").manual_seed(seed)
    ctx = attention_context() if attention_context else contextlib.nullcontext()
    with ctx, torch.no_grad():
        return pipe(
            image=refs[0] if refs else None,
            prompt_embeds=prompt_embeds[None].to(device=device, dtype=dtype),
            pooled_prompt_embeds=pooled[None].to(device=device, dtype=dtype),
            height=height, width=width, max_area=height * width, _auto_resize=False,
            guidance_scale=guidance, num_inference_steps=num_inference_steps, generator=generator,
            output_type="pil",
        ).images[0]


def run_validation(transformer, vae, scheduler, samples: list[Sample], captions: list[str],
                   embeddings: list[tuple[torch.Tensor, torch.Tensor]], *, load_image,
                   guidance: float, num_inference_steps: int, resolution: str, seed: int, device, dtype,
                   attention_context=None) -> list[ValidationResult]:
    """Generate one edit per sample with the pipeline; its strip, named `<sample id>.png`."""
    fixed = parse_resolution(resolution)
    results = []
    with _edit_pipeline(transformer, vae, scheduler) as pipe:
        for sample, caption, embedding in zip(samples, captions, embeddings):
            target_img = load_image(sample.target.path, sample.target.geometry_dict)
            refs = [load_image(r.path, r.geometry_dict) for r in sample.references]
            width, height = fixed or sample.target.size
            out = _edit(pipe, refs, embedding, width, height, seed, guidance=guidance,
                        num_inference_steps=num_inference_steps, device=device, dtype=dtype,
                        attention_context=attention_context)
            labels = [f"reference {i + 1}" for i in range(len(refs))] + ["output", "target"]
            strip = make_strip(refs + [out, target_img], caption or "(blank caption)", labels)
            results.append(ValidationResult(sample.sample_id, caption, f"{_safe_name(sample.sample_id)}.png", strip))
    return results


def run_prompt_validation(transformer, vae, scheduler, prompts: list,
                          embeddings: list[tuple[torch.Tensor, torch.Tensor]], *, area: int,
                          guidance: float, num_inference_steps: int, resolution: str, seed: int, device, dtype,
                          attention_context=None) -> list[ValidationResult]:
    """The `validation_prompts` edits (kontext_trainer.prompts.ValidationPrompt), with the pipeline and settings of
    `run_validation`: one strip reference(s) | output per prompt, named `<prompt.name>.png`.

    Each reference is sized as `kontext-data pair` sizes training images: its own aspect at about `area` pixels
    (the largest training bucket's), sides multiples of 16. The output is the prompt's size, else `resolution`,
    else the first reference's size. The seed is the prompt's, else `seed`."""
    from kontext_data.geometry import apply_geometry
    from kontext_data.imageio import open_rgb
    from kontext_trainer.prompts import reference_geometry

    fixed = parse_resolution(resolution)
    results = []
    with _edit_pipeline(transformer, vae, scheduler) as pipe:
        for prompt, embedding in zip(prompts, embeddings):
            refs = []
            for path in prompt.images:
                img = open_rgb(path)
                refs.append(apply_geometry(img, reference_geometry(img.size, area)))
            width, height = prompt.size or fixed or refs[0].size
            out = _edit(pipe, refs, embedding, width, height, seed if prompt.seed is None else prompt.seed,
                        guidance=guidance, num_inference_steps=num_inference_steps, device=device, dtype=dtype,
                        attention_context=attention_context)
            labels = [f"reference {i + 1}" for i in range(len(refs))] + ["output"]
            strip = make_strip(refs + [out], prompt.prompt, labels)
            results.append(ValidationResult(prompt.name, prompt.prompt, f"{prompt.name}.png", strip))
    return results
