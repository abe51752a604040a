"""The FLUX.1 Kontext flow-matching training step: packing, position ids, sigma sampling, the loss.

In: normalized VAE latents of the target and its references, T5 sequence + CLIP pooled embeddings, a
transformer (with or without an adapter). Out: the loss on the target tokens only.

The sequence is `[noisy target tokens | reference tokens]`; target position ids are `(0, row, col)`, a reference's
`(1, row, col)` (the same grid as FluxKontextPipeline builds); extra references are placed beside or below the
ones before, as ComfyUI's default "offset" method does (`comfy/ldm/flux/model.py`), so they do not overlap. One timestep per
sample for all tokens, guidance embedding 1.0, the prediction sliced back to the target tokens before the loss.
With loss masks (`kontext-data pair --masks`) each target token's squared error is weighted by its mask
(`masked_loss`); without, the loss is the plain mean.

`kontext_step` is the one function the trainer and benchmarks/gpu_smoke.py call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kontext_trainer.attention import attention_context

# ------------------------------------------------------------------------------------------ packing


def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, 4C) tokens of 2x2 patches (FluxKontextPipeline._pack_latents)."""
    b, c, h, w = z.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height/width must be even to pack 2x2 patches, got {h}x{w}")
    z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return z.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
    """Inverse of pack_latents: (B, H/2 * W/2, 4C) -> (B, C, H, W), H/W in latent pixels."""
    b, n, d = tokens.shape
    h2, w2 = latent_height // 2, latent_width // 2
    if n != h2 * w2:
        raise ValueError(f"{n} tokens do not make a {latent_height}x{latent_width} latent")
    z = tokens.view(b, h2, w2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return z.reshape(b, d // 4, latent_height, latent_width)


def image_ids(latent_height: int, latent_width: int, index: int = 0, row_offset: int = 0, col_offset: int = 0,
              device=None, dtype=torch.float32) -> torch.Tensor:
    """Position ids (N, 3) of one packed image: (index, row + row_offset, col + col_offset) per 2x2 token."""
    h2, w2 = latent_height // 2, latent_width // 2
    ids = torch.zeros(h2, w2, 3, device=device, dtype=dtype)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(h2, device=device, dtype=dtype)[:, None] + row_offset
    ids[..., 2] = torch.arange(w2, device=device, dtype=dtype)[None, :] + col_offset
    return ids.reshape(h2 * w2, 3)


def reference_offsets(reference_hws: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(row, col) offsets, in packed tokens, of each reference: ComfyUI's default "offset" placement of several
    reference latents. With (h, w) the extent covered so far (latent pixels, starting at 0, 0), a reference taller
    than wide relative to it (`ref_h + h > ref_w + w`) goes to the right (column offset w), otherwise below (row
    offset h); the extent then grows to cover it. The first reference is never shifted (FluxKontextPipeline's
    single reference); latent offsets become token offsets as `(offset + 1) // 2` (patch size 2)."""
    h = w = 0
    out = []
    for rh, rw in reference_hws:
        h_off = w_off = 0
        if rh + h > rw + w:
            w_off = w
        else:
            h_off = h
        h = max(h, rh + h_off)
        w = max(w, rw + w_off)
        out.append(((h_off + 1) // 2, (w_off + 1) // 2))
    return out


def kontext_ids(target_hw: tuple[int, int], reference_hws: list[tuple[int, int]], device=None,
                dtype=torch.float32) -> torch.Tensor:
    """Position ids of `[target | ref 1 | ref 2 ...]` for latent sizes (H, W). Refs: channel 0 = 1, placed by
    `reference_offsets` (ComfyUI's convention; the first one unshifted, exactly as FluxKontextPipeline places its
    single reference). No references: the target's ids only (a plain Flux text-to-image step)."""
    parts = [image_ids(*target_hw, index=0, device=device, dtype=dtype)]
    for (h, w), (row, col) in zip(reference_hws, reference_offsets(reference_hws)):
        parts.append(image_ids(h, w, index=1, row_offset=row, col_offset=col, device=device, dtype=dtype))
    return torch.cat(parts, dim=0)


# ------------------------------------------------------------------------------------------ sigmas


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """`s*sigma / (1 + (s-1)*sigma)`: shift > 1 moves samples towards more noise (SimpleTuner default 3.0)."""
    if shift == 1.0:
        return sigmas
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sample_sigmas(batch_size: int, generator: torch.Generator, scheme: str = "logit_normal", shift: float = 3.0,
                  logit_mean: float = 0.0, logit_std: float = 1.0) -> torch.Tensor:
    """One sigma in (0, 1) per sample: logit-normal (default) or uniform, then shifted. On the CPU, float32."""
    if scheme == "logit_normal":
        u = torch.sigmoid(torch.randn(batch_size, generator=generator) * logit_std + logit_mean)
    elif scheme == "uniform":
        u = torch.rand(batch_size, generator=generator)
    else:
        raise ValueError(f"unknown sigma sampling {scheme!r}; valid: logit_normal, uniform")
    u = u.clamp(1e-5, 1 - 1e-5)
    return shift_sigmas(u, shift)


# ------------------------------------------------------------------------------------------ the step


@dataclass
class KontextBatch:
    """One bucketed batch: every sample has the same target size and the same number/sizes of references.

    target: (B, C, H, W) normalized latents; references: list of (B, C, h, w); prompt_embeds (B, L, D) T5;
    pooled (B, P) CLIP; mask: (B, H, W) loss masks at latent resolution in [0, 1] (1 = the edited region), None when
    no sample of the batch has one (a sample without a mask has an all-ones mask in a batch with others)."""

    target: torch.Tensor
    references: list[torch.Tensor]
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    sample_ids: list[str] | None = None
    mask: torch.Tensor | None = None

    def to(self, device, dtype) -> "KontextBatch":
        """The batch on `device`, its tensors in `dtype` (the mask in float32)."""
        return KontextBatch(
            target=self.target.to(device=device, dtype=dtype),
            references=[r.to(device=device, dtype=dtype) for r in self.references],
            prompt_embeds=self.prompt_embeds.to(device=device, dtype=dtype),
            pooled=self.pooled.to(device=device, dtype=dtype),
            sample_ids=self.sample_ids,
            # float32 whatever the model's dtype: the loss is computed in float32, and 1.0 stays exactly 1.0
            mask=None if self.mask is None else self.mask.to(device=device, dtype=torch.float32),
        )


@dataclass
class StepOutput:
    """What `kontext_forward` returns: the loss on the target tokens and the whole prediction."""

    loss: torch.Tensor
    prediction: torch.Tensor  # full model output over [target | references] tokens, (B, N_all, 4C)
    num_target_tokens: int


MASK_LOSS_WEIGHT = 0.1
"""Default weight of the squared error outside a loss mask (TrainConfig.mask_loss_weight; docs/train.md says why)."""


def token_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, H, W) latent-resolution masks -> (B, H/2 * W/2, 1): each token's mask is the mean over its 2x2 latent
    patch, packed exactly as `pack_latents` packs the latents, so token i's weight covers token i's pixels."""
    return pack_latents(mask.unsqueeze(1)).mean(dim=-1, keepdim=True)


def masked_loss(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                mask_loss_weight: float = MASK_LOSS_WEIGHT) -> torch.Tensor:
    """The weighted mean squared error of packed target tokens: with m the token's mask (`token_mask`) and
    weight = m + mask_loss_weight * (1 - m) (1 inside the mask, mask_loss_weight outside),

        loss = sum(weight * (prediction - target)^2) / sum(weight)        over every element (B, tokens, channels).

    Dividing by the sum of the weights, not by the element count, keeps the loss a weighted MEAN: its scale does not
    depend on how much of the image a mask covers, so a sample with a small edited region is not trained with a
    smaller effective learning rate than one with a large region, and loss curves with and without masks read the
    same. It also makes an all-ones mask (and a batch's unmasked samples) give exactly the plain mean.

    Computed as mse(prediction * sqrt(w), target * sqrt(w)) * (N / sum(w)) with N the element count: the same value,
    and with an all-ones mask every factor is exactly 1, so the result is bit for bit `F.mse_loss(prediction, target)`
    on every device (the plain loss's own kernel runs). `prediction` and `target`: (B, T, D) float32; `mask`:
    (B, H, W) with H/2 * W/2 = T. A batch whose weights are all 0 (mask_loss_weight 0 and empty masks) gives 0."""
    m = token_mask(mask.to(device=prediction.device, dtype=torch.float32))
    w = m + mask_loss_weight * (1.0 - m)  # (B, T, 1), broadcast over the channels
    root = w.sqrt()
    # tensor / tensor: IEEE division, so N / N is exactly 1 (`int / tensor` would multiply by a rounded reciprocal)
    scale = w.new_tensor(float(w.numel())) / w.sum().clamp_min(torch.finfo(torch.float32).tiny)
    return F.mse_loss(prediction * root, target * root, reduction="mean") * scale


def kontext_forward(transformer, batch: KontextBatch, sigmas: torch.Tensor, noise: torch.Tensor,
                    guidance: float = 1.0, mask_loss_weight: float = MASK_LOSS_WEIGHT) -> StepOutput:
    """Forward of one Kontext training step; returns the loss on the target tokens and the full prediction.

    sigmas: (B,) in (0, 1); noise: like batch.target. Reference tokens are clean latents (no gradient into them).
    With `batch.mask` the loss is `masked_loss` (errors outside the mask weigh `mask_loss_weight`); without, the
    plain mean squared error.
    """
    z = batch.target
    b, c, h, w = z.shape
    dtype = z.dtype
    s = sigmas.to(device=z.device, dtype=torch.float32).view(b, 1, 1, 1)
    noisy = ((1 - s) * z.float() + s * noise.float()).to(dtype)
    flow_target = (noise.float() - z.float())  # velocity the model predicts
    target_tokens = pack_latents(noisy)
    n_target = target_tokens.shape[1]
    ref_tokens = [pack_latents(r.detach()) for r in batch.references]
    hidden = torch.cat([target_tokens] + ref_tokens, dim=1)
    ids = kontext_ids((h, w), [tuple(r.shape[-2:]) for r in batch.references], device=z.device, dtype=dtype)
    txt_ids = torch.zeros(batch.prompt_embeds.shape[1], 3, device=z.device, dtype=dtype)
    guidance_vec = torch.full((b,), float(guidance), device=z.device, dtype=torch.float32)
    prediction = transformer(
        hidden_states=hidden,
        timestep=sigmas.to(device=z.device, dtype=dtype),  # the pipeline passes t/1000 = sigma
        guidance=guidance_vec,
        pooled_projections=batch.pooled,
        encoder_hidden_states=batch.prompt_embeds,
        txt_ids=txt_ids,
        img_ids=ids,
        return_dict=False,
    )[0]
    pred_target = prediction[:, :n_target]
    if batch.mask is None:
        loss = F.mse_loss(pred_target.float(), pack_latents(flow_target), reduction="mean")
    else:
        loss = masked_loss(pred_target.float(), pack_latents(flow_target), batch.mask, mask_loss_weight)
    return StepOutput(loss=loss, prediction=prediction, num_target_tokens=n_target)


def kontext_step(transformer, batch: KontextBatch, generator: torch.Generator, *, scheme: str = "logit_normal",
                 shift: float = 3.0, logit_mean: float = 0.0, logit_std: float = 1.0, guidance: float = 1.0,
                 attention_backend: str = "auto", loss_scale: float = 1.0, backward: bool = True,
                 sigmas: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                 mask_loss_weight: float = MASK_LOSS_WEIGHT) -> float:
    """One micro-step: sample sigmas and noise (from `generator`, on the CPU, so runs are reproducible on any
    device), forward, and backward of `loss * loss_scale` under the attention kernels `attention_backend` selects
    (kontext_trainer.attention). Returns the (unscaled) loss as a float. This is the function the trainer and the
    GPU benchmark call. `sigmas` / `noise` given (the trainer draws them per sample, so a batch split over
    processes sees the same ones) replace the draws from `generator`. `mask_loss_weight`: the weight outside a
    loss mask (batches with `mask` only)."""
    b = batch.target.shape[0]
    if sigmas is None:
        sigmas = sample_sigmas(b, generator, scheme, shift, logit_mean, logit_std)
    if noise is None:
        noise = torch.randn(batch.target.shape, generator=generator, dtype=torch.float32)
    noise = noise.to(device=batch.target.device, dtype=batch.target.dtype)
    with attention_context(attention_backend, batch.target.device):
        out = kontext_forward(transformer, batch, sigmas, noise, guidance, mask_loss_weight)
        if backward:
            (out.loss * loss_scale).backward()
    value = float(out.loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"non-finite loss {value} (sigmas {sigmas.tolist()})")
    return value
