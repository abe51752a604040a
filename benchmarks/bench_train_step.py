#!/usr/bin/env python
"""Benchmark of the Kontext LoRA training step: the project's step with its speed levers vs a plain eager baseline.

The model is the full-size FLUX.1 Kontext transformer (19 double + 38 single blocks, 3072 wide) with RANDOM bf16
weights built directly on the GPU (no download). Each row times optimizer steps (batch 1, one reference, 512 T5
tokens) and reports the median s/step of the timed steps after warm-up, the peak GPU memory, and the achieved
TFLOP/s (FLOPs counted once per resolution with torch's FlopCounterMode).

- baseline: a plain eager step in the style of the diffusers example, written here on purpose (not the project's
  code): peft LoRA rank 16 on to_q/to_k/to_v/to_out.0, SDPA forced to flash, gradient checkpointing, AdamW.
- ours: `kontext_trainer.flow.kontext_step` (what `kontext-train` runs), LoRA rank 16 on the `attention` preset
  (q/k/v/out + the text stream's add_*/to_add_out), with the levers of kontext_trainer/attention.py, memory.py and
  compile.py: attention backend (flash, or cuDNN with the contiguous-gradient fix), the fraction of blocks
  checkpointed, regional torch.compile, fused q/k/v (kontext_trainer/fuse.py), the compiled blocks' activation
  memory budget (the rows the trainer's memory plan chooses from), and fp8-matmul / int8-quanto bases (int8 as
  kontext-train runs it: quanto's data in DequantLinear modules, compiled).
- check: before timing cuDNN, one step with cuDNN and one with flash on the same batch, noise and sigma: the losses
  and the LoRA gradients must agree within bf16 tolerance; the same for kontext-train's attention (`--attention`,
  default auto: FlashAttention 4 for long sequences where flash-attn-4 is installed) against cuDNN, compiled.
- the compiled rows (and the fp8, int8 and LoKr groups) run kontext-train's attention; one compiled cuDNN row at
  budget 1 gives the comparison in the same run.

Results go to benchmarks/results/bench_train_step-<gpu>-<date>.json (and --out), the summary to stdout.

GPU:  python benchmarks/bench_train_step.py --deadline 300
CPU:  python benchmarks/bench_train_step.py --tiny --device cpu --resolutions 64 --steps 2 --warmup 1   (what CI runs)
"""

from __future__ import annotations

import argparse
import gc
import datetime
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_smoke import FULL, TINY, build_transformer, machine_info, make_batch, no_cuda, sync  # noqa: E402
from machine import results_file  # noqa: E402
from kontext_trainer import adapters, fp8, memory, quantize  # noqa: E402
from kontext_trainer.compile import compile_blocks  # noqa: E402
from kontext_trainer.config import TrainConfig  # noqa: E402
from kontext_trainer.fuse import fuse_qkv  # noqa: E402
from kontext_trainer.optim import build_optimizer  # noqa: E402
from kontext_trainer.quantize import QUANTO_EXCLUDE  # noqa: E402
from kontext_trainer.flow import kontext_step, pack_latents  # noqa: E402

memory.use_expandable_segments()  # kontext-train's allocator setting, before the first CUDA allocation


# ---------------------------------------------------------------------------------------------- baseline


def baseline_step(model, batch, gen) -> torch.Tensor:
    """Diffusers-example style: pack, concatenate, forward, MSE on the target tokens, backward (flash SDPA)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    z = batch.target
    b, c, h, w = z.shape
    sigma = torch.rand(b, generator=gen).to(z.device)
    noise = torch.randn(z.shape, generator=gen).to(z.device, z.dtype)
    s = sigma.view(b, 1, 1, 1).to(z.dtype)
    noisy = (1 - s) * z + s * noise
    tokens = torch.cat([pack_latents(noisy), pack_latents(batch.references[0])], dim=1)
    ids = []
    for index, (hh, ww) in enumerate([(h, w), tuple(batch.references[0].shape[-2:])]):
        grid = torch.zeros(hh // 2, ww // 2, 3, device=z.device)
        grid[..., 0] = index
        grid[..., 1] = torch.arange(hh // 2, device=z.device)[:, None]
        grid[..., 2] = torch.arange(ww // 2, device=z.device)[None, :]
        ids.append(grid.reshape(-1, 3))
    img_ids = torch.cat(ids).to(z.dtype)
    txt_ids = torch.zeros(batch.prompt_embeds.shape[1], 3, device=z.device, dtype=z.dtype)
    kernels = [SDPBackend.FLASH_ATTENTION] if z.device.type == "cuda" else [SDPBackend.MATH]
    with sdpa_kernel(kernels):
        pred = model(hidden_states=tokens, timestep=sigma.to(z.dtype), guidance=torch.ones(b, device=z.device),
                     pooled_projections=batch.pooled, encoder_hidden_states=batch.prompt_embeds, txt_ids=txt_ids,
                     img_ids=img_ids, return_dict=False)[0]
        n = h * w // 4
        loss = torch.nn.functional.mse_loss(pred[:, :n].float(), pack_latents(noise - z).float())
        loss.backward()
    return loss.detach()


# ---------------------------------------------------------------------------------------------- runner


GROUPS_ALL = ("baseline", "bf16", "compile", "fp8", "int8", "lokr")
# "default": only the step kontext-train runs on a big card (fused q/k/v, compiled at budget 1, its attention), the
# row benchmarks/full_run.py's steady state is compared with in the same call; not part of a full run of this script
GROUPS = (*GROUPS_ALL, "default")
BASELINE_TARGETS = "to_q,to_k,to_v,to_out.0"


class Bench:
    def __init__(self, args, device, arch, groups=GROUPS_ALL):
        self.args, self.device, self.arch, self.groups = args, device, arch, list(groups)
        self.t0 = time.perf_counter()
        self.rows: list[dict] = []
        self.flops: dict[int, float] = {}
        self.checks: list[dict] = []
        self.info = machine_info(device)
        self.model = build_transformer(arch, device, torch.bfloat16)
        self.adapter = None

    STEP_S = {1024: 2.0, 512: 0.8}  # a generous s/step per resolution, for the deadline

    def need(self, res: int, factor: float = 1.0) -> float:
        """Seconds a row at `res` may take (warm-up and timed steps, x factor for slower rows), plus a margin."""
        return (self.args.warmup + self.args.steps) * self.STEP_S.get(res, 0.05) * factor + 5

    def left(self) -> float:
        return self.args.deadline - (time.perf_counter() - self.t0)

    def use_adapter(self, targets: str) -> list:
        if self.adapter != targets:
            if self.adapter is not None:
                self.model.unload_lora()
            adapters.attach_lora(self.model, rank=16, alpha=None, dropout=0.0, targets=targets)
            if targets == BASELINE_TARGETS:  # the diffusers example: peft's own (float32) LoRA forward
                adapters.use_activation_dtype_lora(self.model, enable=False)
            self.adapter = targets
        return adapters.trainable_parameters(self.model)

    def count_flops(self, res: int, batch) -> float:
        if res not in self.flops:
            from torch.utils.flop_counter import FlopCounterMode

            memory.set_activation_checkpointing(self.model, 0.0)
            with FlopCounterMode(display=False) as counter:
                kontext_step(self.model, batch, torch.Generator().manual_seed(0), attention_backend="math"
                             if self.device.type == "cpu" else "flash")
            self.model.zero_grad(set_to_none=True)
            self.flops[res] = float(counter.get_total_flops())
        return self.flops[res]

    def run(self, name: str, res: int, fn, params, need_s: float) -> dict | None:
        """Time fn() (one micro-step incl. backward) + the optimizer step; skip when the deadline is near. The
        baseline rows step a plain torch AdamW, ours the optimizer kontext-train builds (its default AdamW)."""
        if self.left() < need_s:
            print(f"  skip {name} {res}px: {self.left():.0f} s left", flush=True)
            self.rows.append({"name": name, "resolution": res, "skipped": "deadline"})
            return None
        opt = (torch.optim.AdamW(params, lr=1e-5) if name.startswith("baseline")
               else build_optimizer(TrainConfig(learning_rate=1e-5), params))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        times, losses = [], []
        try:
            for i in range(self.args.warmup + self.args.steps):
                sync(self.device)
                t = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                losses.append(float(fn(i)))
                opt.step()
                sync(self.device)
                times.append(time.perf_counter() - t)
        except Exception as exc:  # an OOM or a kernel failure is a result too
            row = {"name": name, "resolution": res, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(f"  {name} {res}px: ERROR {row['error']}", flush=True)
            self.rows.append(row)
            opt.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return row
        timed = times[self.args.warmup:]
        s = statistics.median(timed)
        row = {"name": name, "resolution": res, "s_per_step": round(s, 4), "first_step_s": round(times[0], 2),
               "losses": [round(v, 5) for v in losses], "finite": all(math.isfinite(v) for v in losses)}
        if res in self.flops:
            row["tflops"] = round(self.flops[res] / s / 1e12, 1)
        if self.device.type == "cuda":
            row["peak_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        print(f"  {name:<44} {res:>5}px {s:7.3f} s/step  peak {row.get('peak_gib', '-')} GiB  "
              f"{row.get('tflops', '-')} TFLOP/s", flush=True)
        self.rows.append(row)
        self.save()
        return row

    def check_backends(self, batch, a: str = "flash", b: str = "cudnn") -> dict:
        """Same batch, noise, sigma: loss and LoRA gradients with attention backend a vs b (cudnn: with the
        contiguous gradient; auto: what kontext-train picks)."""
        out = {"check": f"{b} vs {a}"}
        grads = {}
        for backend in (a, b):
            self.model.zero_grad(set_to_none=True)
            loss = kontext_step(self.model, batch, torch.Generator().manual_seed(7), attention_backend=backend)
            sync(self.device)
            grads[backend] = torch.cat([p.grad.float().flatten() for p in adapters.trainable_parameters(self.model)
                                        if p.grad is not None])
            out[f"loss_{backend}"] = loss
        self.model.zero_grad(set_to_none=True)
        ga, gb = grads[a], grads[b]
        out["grad_cosine"] = float(torch.nn.functional.cosine_similarity(ga, gb, dim=0))
        out["grad_rel_diff"] = float((ga - gb).norm() / ga.norm().clamp_min(1e-12))
        out["loss_rel_diff"] = abs(out[f"loss_{a}"] - out[f"loss_{b}"]) / max(abs(out[f"loss_{a}"]), 1e-12)
        out["ok"] = out["grad_cosine"] > 0.99 and out["loss_rel_diff"] < 2e-2
        self.checks.append(out)
        print(f"  check {b} vs {a}: loss {out[f'loss_{a}']:.5f} vs {out[f'loss_{b}']:.5f}, grad cosine "
              f"{out['grad_cosine']:.5f} -> {'ok' if out['ok'] else 'MISMATCH'}", flush=True)
        self.save()
        return out

    def _loss_and_grads(self, batch, backend: str) -> tuple[float, torch.Tensor]:
        self.model.zero_grad(set_to_none=True)
        loss = kontext_step(self.model, batch, torch.Generator().manual_seed(7), attention_backend=backend)
        sync(self.device)
        grads = torch.cat([p.grad.float().flatten() for p in adapters.trainable_parameters(self.model)
                           if p.grad is not None])
        self.model.zero_grad(set_to_none=True)
        return loss, grads

    def check_same(self, what: str, batch, backend: str, change, min_cosine: float = 0.99,
                   max_loss_rel: float = 2e-2) -> dict:
        """Loss and adapter gradients before and after change() (e.g. compiling), same weights and batch."""
        memory.set_activation_checkpointing(self.model, 1.0)
        loss_a, g_a = self._loss_and_grads(batch, backend)
        change()
        loss_b, g_b = self._loss_and_grads(batch, backend)
        out = {"check": what, "loss_before": loss_a, "loss_after": loss_b,
               "loss_rel_diff": abs(loss_a - loss_b) / max(abs(loss_a), 1e-12),
               "grad_cosine": float(torch.nn.functional.cosine_similarity(g_a, g_b, dim=0)),
               "grad_rel_diff": float((g_a - g_b).norm() / g_a.norm().clamp_min(1e-12))}
        out["ok"] = out["grad_cosine"] > min_cosine and out["loss_rel_diff"] < max_loss_rel
        self.checks.append(out)
        print(f"  check {what}: loss {loss_a:.5f} vs {loss_b:.5f}, grad cosine {out['grad_cosine']:.5f}, grad rel "
              f"diff {out['grad_rel_diff']:.4f} -> {'ok' if out['ok'] else 'MISMATCH'}", flush=True)
        self.save()
        return out

    def check_fp8(self, batch, backend: str) -> dict:
        """Same LoRA, batch, noise and sigma: loss and LoRA gradients on the bf16 base, then after converting the
        base in place to fp8-matmul (which this leaves done). fp8 rounds the base's inputs: a looser bound than
        cuDNN-vs-flash, but the direction of the update must hold."""
        def convert():
            t = time.perf_counter()
            report = fp8.convert_base_linears(self.model, exclude=QUANTO_EXCLUDE)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.rows.append({"name": "fp8 convert", "seconds": round(time.perf_counter() - t, 1),
                              "converted": len(report.converted), "kept": report.kept,
                              "gib_before": round(report.bytes_before / 2**30, 2),
                              "gib_after": round(report.bytes_after / 2**30, 2)})

        return self.check_same("fp8-matmul vs bf16", batch, backend, convert, min_cosine=0.95, max_loss_rel=3e-2)

    def compiled_rows(self, label, res, other_res, budgets, params, ours, backend, compile_kwargs) -> None:
        """Compiled rows without block checkpointing, one per activation memory budget (each recompiles), then every
        block checkpointed; `other_res` once at budget 1. The trainer's memory plan picks among these."""
        for budget in budgets:
            if self.left() < self.need(res) + 90:
                self.rows.append({"name": f"{label} budget {budget:g}", "resolution": res, "skipped": "deadline"})
                continue
            torch._dynamo.reset()
            compile_blocks(self.model, memory_budget=budget, **compile_kwargs)
            memory.set_activation_checkpointing(self.model, 0.0)
            self.run(f"{label} ({backend}, compiled, budget {budget:g})", res, ours(res, backend), params,
                     self.need(res) + 60)
            if budget == 1.0:
                for r in other_res:
                    self.run(f"{label} ({backend}, compiled, budget 1)", r, ours(r, backend), params,
                             self.need(r) + 60)
        torch._dynamo.reset()
        compile_blocks(self.model, memory_budget=1.0, **compile_kwargs)
        memory.set_activation_checkpointing(self.model, 1.0)
        self.run(f"{label} ({backend}, compiled, ckpt 100%)", res, ours(res, backend), params, self.need(res) + 60)

    def save(self) -> None:
        result = {"machine": self.info, "arch": "tiny" if self.args.tiny else "FLUX.1 Kontext full (random bf16)",
                  "date": datetime.date.today().isoformat(), "groups": self.groups, "steps": self.args.steps,
                  "warmup": self.args.warmup,
                  "flops_per_step": self.flops, "checks": self.checks, "rows": self.rows}
        for path in self.outputs():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=2) + "\n")

    def outputs(self) -> list[Path]:
        part = "" if set(self.groups) >= set(GROUPS_ALL) else "-" + "+".join(self.groups)
        out = [results_file("bench_train_step", self.info, part)]
        if self.args.out:
            out.append(self.args.out)
        return out if not self.args.tiny else out[1:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny architecture (CPU run that keeps this script working)")
    ap.add_argument("--resolutions", type=int, nargs="+", default=[1024, 512])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--deadline", type=float, default=1e9, help="seconds; later rows are skipped, not started")
    ap.add_argument("--groups", nargs="+", choices=GROUPS, default=list(GROUPS_ALL),
                    help="which rows: baseline, bf16 (backends, checkpointing), compile (regional torch.compile), "
                         "fp8 (fp8-matmul base), int8 (int8-quanto base), lokr (LoKr adapters, bf16 and int8); "
                         "default alone: the one step kontext-train runs on a big card (not in the default list)")
    ap.add_argument("--no-compile", action="store_true", help="skip every compiled row (fp8's too)")
    ap.add_argument("--compile-mode", default=None, choices=["default", "max-autotune-no-cudagraphs"],
                    help="torch.compile mode of the compiled rows (default: torch's default)")
    ap.add_argument("--no-int8", action="store_true", help="drop the int8 rows (the int8 group, LoKr on int8)")
    ap.add_argument("--extra", nargs="*", default=[], choices=["lokr-peft", "lora-peft"],
                    help="reference rows: lokr-peft (peft's own LoKr forward, ~11 s/step at 1024 px on H100), "
                         "lora-peft (peft's float32 LoRA forward, compiled)")
    ap.add_argument("--attention", default="auto", choices=["auto", "cudnn", "fa4"],
                    help="attention backend of the compiled rows and of the fp8/int8/LoKr groups (default: auto, what "
                         "kontext-train runs: FlashAttention 4 for long sequences where flash-attn-4 is installed, "
                         "else cuDNN); the eager bf16 rows compare flash and cudnn")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    groups = [g for g in GROUPS if g in args.groups and not (g == "int8" and args.no_int8)
              and not (g == "compile" and args.no_compile)]
    device = torch.device(args.device)
    if no_cuda(device, "use --tiny --device cpu"):
        return 2
    arch = TINY if args.tiny else FULL
    compile_kwargs = {"mode": args.compile_mode} if args.compile_mode else {}
    bench = Bench(args, device, arch, groups)
    print(json.dumps(bench.info), flush=True)
    full = not args.tiny
    cudnn = "cudnn" if device.type == "cuda" else "math"
    flash = "flash" if device.type == "cuda" else "math"
    kt = args.attention if device.type == "cuda" else "math"  # the compiled rows: kontext-train's attention
    fa4_runs = False  # whether kt differs from cuDNN here (auto without flash-attn-4 is cuDNN)
    if device.type == "cuda":
        from kontext_trainer import attention, fa4

        problem = fa4.usable(device)
        fa4_runs = kt != cudnn and problem is None
        bench.info["fa4"] = problem or f"in use by auto from {attention.AUTO_MIN_TOKENS} tokens"
        print(f"FlashAttention 4: {bench.info['fa4']}", flush=True)
    batches = {res: make_batch(arch, res, device, torch.bfloat16) for res in args.resolutions}
    first = args.resolutions[0]

    need = bench.need

    def ours(res, backend):
        gen = torch.Generator().manual_seed(0)
        return lambda i: kontext_step(bench.model, batches[res], gen, attention_backend=backend)

    def fresh_model(quantized: bool = False):
        bench.model = None
        bench.adapter = None
        torch._dynamo.reset()  # compiled blocks hold the old model: without this its weights stay allocated
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        bench.model = build_transformer(arch, device, torch.bfloat16)
        if quantized:
            t = time.perf_counter()
            quantize.quantize_transformer(bench.model, "int8-quanto")
            bench.rows.append({"name": "int8 quantize+freeze", "seconds": round(time.perf_counter() - t, 1)})

    # 1. baseline rows
    if "baseline" in groups:
        params = bench.use_adapter(BASELINE_TARGETS)
        for res in args.resolutions:
            bench.model.enable_gradient_checkpointing()
            gen = torch.Generator().manual_seed(0)
            bench.run("baseline (eager, flash, ckpt, LoRA qkvo)", res,
                      lambda i: baseline_step(bench.model, batches[res], gen), params, need(res))
    params = bench.use_adapter("attention")
    for res in args.resolutions:
        bench.count_flops(res, batches[res])
    if "default" in groups:  # kontext-train's step on a big card, nothing else
        fuse_qkv(bench.model)
        memory.set_activation_checkpointing(bench.model, 0.0)
        torch._dynamo.reset()
        compile_blocks(bench.model, memory_budget=1.0, **compile_kwargs)
        for res in args.resolutions:
            bench.run(f"kontext-train default (fused, {kt}, compiled, budget 1)", res, ours(res, kt), params,
                      need(res) + 120)
        torch._dynamo.reset()
    # 2. ours, bf16: attention backends and checkpointed fractions
    if "bf16" in groups:
        if full and device.type == "cuda":
            bench.check_backends(batches[first], flash, cudnn)
        adapters.use_activation_dtype_lora(bench.model, enable=False)
        bench.check_same("LoRA in bf16 vs peft's float32", batches[first], cudnn,
                         lambda: adapters.use_activation_dtype_lora(bench.model))
        plan = [(1.0, flash), (1.0, cudnn), (0.0, cudnn), (0.5, cudnn)]
        for res in args.resolutions:
            for fraction, backend in plan if res == first else [(0.0, cudnn), (1.0, cudnn)]:
                memory.set_activation_checkpointing(bench.model, fraction)
                bench.run(f"ours ({backend}, ckpt {fraction:.0%})", res, ours(res, backend), params, need(res))
    # 3. regional compile (dynamic=False: one compile per shape, no recompiles within a bucket)
    if "compile" in groups and bench.left() > need(first) + 120:
        t = time.perf_counter()
        bench.check_same("compiled vs eager", batches[first], cudnn,
                         lambda: compile_blocks(bench.model, **compile_kwargs))
        for res, fraction in [(first, 0.0), (first, 1.0)]:
            memory.set_activation_checkpointing(bench.model, fraction)
            bench.run(f"ours ({cudnn}, ckpt {fraction:.0%}, compiled)", res, ours(res, cudnn), params,
                      need(res) + 60)
        if "lora-peft" in args.extra:  # the same, with peft's float32 LoRA forward
            adapters.use_activation_dtype_lora(bench.model, enable=False)
            for fraction in (0.0, 1.0):
                memory.set_activation_checkpointing(bench.model, fraction)
                bench.run(f"peft-fp32 LoRA ({cudnn}, ckpt {fraction:.0%}, compiled)", first, ours(first, cudnn),
                          params, need(first) + 60)
            adapters.use_activation_dtype_lora(bench.model)
        # what kontext-train runs by default: fused q/k/v, and the activation memory budgets its memory plan picks
        memory.set_activation_checkpointing(bench.model, 0.0)
        bench.check_same("fused q/k/v vs separate (compiled)", batches[first], cudnn,
                         lambda: (fuse_qkv(bench.model), torch._dynamo.reset()))
        if fa4_runs:  # the same compiled step with cuDNN attention alone, and the two against each other
            torch._dynamo.reset()
            compile_blocks(bench.model, memory_budget=1.0, **compile_kwargs)
            memory.set_activation_checkpointing(bench.model, 0.0)  # check_same left every block checkpointed
            bench.run(f"ours fused ({cudnn}, compiled, budget 1)", first, ours(first, cudnn), params, need(first) + 60)
            bench.check_backends(batches[first], cudnn, kt)
        bench.compiled_rows("ours fused", first, args.resolutions[1:], [1.0, 0.5, 0.3, 0.2, 0.05], params,
                            ours, kt, compile_kwargs)
        bench.rows.append({"name": "compile (incl. first steps)", "seconds": round(time.perf_counter() - t, 1)})
    # 4. fp8-matmul base: the same model and LoRA, the base Linear modules converted in place
    if "fp8" in groups:
        if "compile" in groups:
            fresh_model()
            params = bench.use_adapter("attention")
        try:
            bench.check_fp8(batches[first], cudnn)
        except Exception as exc:  # no fp8 kernels here: a result too
            bench.rows.append({"name": "fp8 check", "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            print(f"  fp8: ERROR {bench.rows[-1]['error']}", flush=True)
        params = adapters.trainable_parameters(bench.model)
        memory.set_activation_checkpointing(bench.model, 0.0)
        bench.run(f"ours fp8-matmul ({cudnn}, ckpt 0%)", first, ours(first, cudnn), params, need(first))
        if not args.no_compile and bench.left() > need(first) + 120:
            t = time.perf_counter()
            fuse_qkv(bench.model)
            bench.compiled_rows("ours fp8-matmul fused", first, args.resolutions[1:], [1.0, 0.5, 0.2, 0.05], params,
                                ours, kt, compile_kwargs)
            bench.rows.append({"name": "fp8 compile (incl. first steps)", "seconds": round(time.perf_counter() - t, 1)})
    # 5. int8-quanto base: quanto quantizes, DequantLinear holds its data as plain tensors (what kontext-train runs)
    if "int8" in groups and bench.left() > need(first) + 60:
        fresh_model(quantized=True)
        params = bench.use_adapter("attention")
        memory.set_activation_checkpointing(bench.model, 1.0)
        bench.run(f"ours int8 quanto modules ({cudnn}, ckpt 100%)", first, ours(first, cudnn), params, need(first, 1.3))
        bench.check_same("int8 DequantLinear vs quanto's modules", batches[first], cudnn,
                         lambda: quantize.to_dequant_linears(bench.model), min_cosine=0.999, max_loss_rel=1e-3)
        for fraction in (1.0, 0.5):
            memory.set_activation_checkpointing(bench.model, fraction)
            bench.run(f"ours int8 ({cudnn}, ckpt {fraction:.0%})", first, ours(first, cudnn), params, need(first, 1.3))
        if not args.no_compile and bench.left() > need(first) + 120:
            t = time.perf_counter()
            fuse_qkv(bench.model)
            bench.compiled_rows("ours int8 fused", first, args.resolutions[1:], [1.0, 0.3, 0.2, 0.05], params,
                                ours, kt, compile_kwargs)
            bench.rows.append({"name": "int8 compile (incl. first steps)",
                               "seconds": round(time.perf_counter() - t, 1)})
    # 6. LoKr (the guide's lycoris config: factor 16 on attention, 8 on feed-forward, full matrix), bf16 and int8
    if "lokr" in groups:
        for quantized in (False, True) if not args.no_int8 else (False,):
            if bench.left() < need(first, 1.3) + 60:
                break
            fresh_model(quantized=quantized)
            adapters.attach_lokr(bench.model, "attention+ffs", factor=16, factor_ff=8, full_matrix=True)
            if quantized:
                quantize.to_dequant_linears(bench.model)
            bench.adapter = "lokr"
            params = adapters.trainable_parameters(bench.model)
            if not quantized:  # our Kronecker matmul against peft's full-delta path, then peft's speed once
                adapters.use_kron_matmul(bench.model, enable=False)
                bench.check_same("LoKr kron matmul vs peft", batches[first], cudnn,
                                 lambda: adapters.use_kron_matmul(bench.model, enable=True))
                if "lokr-peft" in args.extra:
                    adapters.use_kron_matmul(bench.model, enable=False)
                    memory.set_activation_checkpointing(bench.model, 1.0)
                    bench.run(f"peft LoKr bf16 ({cudnn}, ckpt 100%)", first, ours(first, cudnn), params,
                              need(first, 6))
                    adapters.use_kron_matmul(bench.model, enable=True)
            kind = "int8" if quantized else "bf16"
            plan = [(first, 1.0), (first, 0.5)] if not quantized else [(first, 1.0)]  # no checkpointing: > 80 GB
            for res, fraction in plan + [(r, 1.0) for r in args.resolutions[1:]]:
                memory.set_activation_checkpointing(bench.model, fraction)
                bench.run(f"ours LoKr {kind} ({cudnn}, ckpt {fraction:.0%})", res, ours(res, cudnn), params,
                          need(res, 1.3))
            if not args.no_compile and bench.left() > need(first) + 120:
                if not quantized:
                    bench.check_same("LoKr compiled vs eager", batches[first], cudnn,
                                     lambda: compile_blocks(bench.model, **compile_kwargs))
                    memory.set_activation_checkpointing(bench.model, 0.5)
                    bench.run(f"ours LoKr bf16 ({cudnn}, ckpt 50%, compiled)", first, ours(first, cudnn), params,
                              need(first) + 60)
                # budget 1 (nothing recomputed) does not fit 80 GB with LoKr on attention+ffs
                bench.compiled_rows(f"ours LoKr {kind}", first, [], [0.5, 0.2, 0.05] if not quantized else [0.2, 0.05],
                                    params, ours, kt, compile_kwargs)
    bench.save()
    base = {r["resolution"]: r["s_per_step"] for r in bench.rows if r.get("name", "").startswith("baseline")
            and "s_per_step" in r}
    print("\nsummary (median s/step; ratio = baseline / row):")
    for r in bench.rows:
        if "s_per_step" in r:
            b = base.get(r["resolution"])
            ratio = f"x{b / r['s_per_step']:4.2f}" if b else "  -  "
            print(f"  {r['name']:<50} {r['resolution']:>5}px {r['s_per_step']:7.3f} s  {ratio}  "
                  f"peak {r.get('peak_gib', '-')} GiB  {r.get('tflops', '-')} TFLOP/s")
        elif "error" in r:
            print(f"  {r['name']:<50} {r['resolution']:>5}px ERROR {r['error'][:120]}")
    ok = all(r.get("finite", True) for r in bench.rows) and all(c["ok"] for c in bench.checks)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
