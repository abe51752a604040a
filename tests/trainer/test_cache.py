"""Caches are keyed by content: shuffling, editing or resuming can never pair a caption with the wrong image; a
second run reuses everything; a changed image re-encodes only that entry."""

from __future__ import annotations

import random

import pyarrow.parquet as pq
import pytest
import torch

from kontext_data.manifest import load_image, read_manifest, write_manifest
from kontext_trainer.cache import ImageEntry, encode_images, latent_key, text_key
from kontext_trainer.config import TrainConfig
from kontext_trainer.data import choose_caption, load_batch
from kontext_trainer.recipe import KontextLoRARecipe


def _config(manifest, model, out, **kw):
    base = dict(manifest=str(manifest), model=str(model), output_dir=str(out), base_model_precision="fp32",
                max_train_steps=2, lora_rank=2, report_to="none", skip_final_validation=True, device="cpu",
                validation_num_inference_steps=2)
    base.update(kw)
    return TrainConfig(**base)


def _setup(cfg):
    events = []
    r = KontextLoRARecipe(cfg, on_event=lambda kind, data: events.append((kind, data)))
    r.setup()
    stats = [d for k, d in events if k == "cache"][-1]
    return r, stats


def test_keys_depend_on_content_only(tmp_path):
    img = tmp_path / "a.png"
    img.write_bytes(b"x")
    g = dict(intermediary_width=64, intermediary_height=64, crop_left=0, crop_top=0, bucket_width=64, bucket_height=64)
    e = ImageEntry.from_geometry(str(img), "h1", g)
    k = latent_key("vae1", e, "float32")
    assert k == latent_key("vae1", ImageEntry.from_geometry(str(img), "h1", dict(g)), "float32")
    assert k != latent_key("vae2", e, "float32")
    assert k != latent_key("vae1", ImageEntry.from_geometry(str(img), "h2", g), "float32")
    assert k != latent_key("vae1", ImageEntry.from_geometry(str(img), "h1", {**g, "crop_left": 8}), "float32")
    assert k != latent_key("vae1", e, "bfloat16")
    img.write_bytes(b"xy")  # the file changed without a new manifest: new key
    assert k != latent_key("vae1", e, "float32")
    assert text_key("te", "make it red", 512) != text_key("te", "make it blue", 512)
    assert text_key("te", "make it red", 512) != text_key("te2", "make it red", 512)


def test_shuffled_manifest_keeps_every_caption_with_its_image(tiny_model, tiny_pipeline, manifest_copy, tmp_path):
    """Reverse and shuffle the manifest's rows, reuse the cache of the first run, and check every batch: each
    sample's latents are its own image's encoding and its text embedding is its own caption's."""
    out = tmp_path / "out"
    r1, s1 = _setup(_config(manifest_copy, tiny_model, out, train_batch_size=3))
    assert s1["latent_encoded"] == s1["latent_total"] == 16 and s1["text_encoded"] == s1["text_total"]
    table = pq.read_table(manifest_copy)
    rows = table.to_pylist()
    random.Random(1).shuffle(rows)
    m = read_manifest(manifest_copy)
    shuffled = manifest_copy.with_name("shuffled.parquet")
    write_manifest(rows, shuffled, options=m.options)
    r2, s2 = _setup(_config(shuffled, tiny_model, out, train_batch_size=3, seed=7))
    assert s2.get("latent_encoded", 0) == 0 and s2.get("text_encoded", 0) == 0  # all reused
    pipe = tiny_pipeline
    seen = set()
    for epoch in range(2):
        for idx in r2.sampler.batches(epoch):
            samples = [r2.samples[i] for i in idx]
            captions = [choose_caption(s, 7, epoch, 0.0) for s in samples]
            batch = load_batch(samples, r2.cache, r2.keys, captions)
            for j, s in enumerate(samples):
                rec = s.record
                target = encode_images(pipe.vae, [load_image(rec["target_path"], rec)], "cpu")[0]
                ref = encode_images(pipe.vae, [load_image(rec["reference_paths"][0], rec["reference_geometry"][0])],
                                    "cpu")[0]
                assert torch.allclose(batch.target[j], target, atol=1e-5), s.sample_id
                assert torch.allclose(batch.references[0][j], ref, atol=1e-5), s.sample_id
                prompt, pooled, _ = pipe.encode_prompt(prompt=[rec["caption"]], prompt_2=None, device="cpu",
                                                       max_sequence_length=512)
                assert torch.allclose(batch.prompt_embeds[j], prompt[0], atol=1e-5), s.sample_id
                assert torch.allclose(batch.pooled[j], pooled[0], atol=1e-5), s.sample_id
                seen.add(s.sample_id)
    assert len(seen) == 8


def test_second_run_reuses_and_a_changed_image_reencodes_only_itself(tiny_model, manifest_copy, tmp_path):
    out = tmp_path / "out"
    _, s1 = _setup(_config(manifest_copy, tiny_model, out))
    assert s1["latent_encoded"] == 16
    _, s2 = _setup(_config(manifest_copy, tiny_model, out))
    assert s2.get("latent_encoded", 0) == 0 and s2.get("text_encoded", 0) == 0
    rec = read_manifest(manifest_copy).records()[0]
    from PIL import Image

    path = rec["target_path"]
    img = Image.open(path).convert("RGB")
    img.putpixel((0, 0), (255 - img.getpixel((0, 0))[0], 0, 0))
    img.save(path)
    _, s3 = _setup(_config(manifest_copy, tiny_model, out))
    assert s3.get("latent_encoded", 0) == 1 and s3.get("text_encoded", 0) == 0


def test_changed_caption_encodes_only_the_new_caption(tiny_model, manifest_copy, tmp_path):
    out = tmp_path / "out"
    _setup(_config(manifest_copy, tiny_model, out))
    rows = pq.read_table(manifest_copy).to_pylist()
    rows[0]["caption"] = "make everything purple"
    rows[0]["captions"] = ["make everything purple"]
    m = read_manifest(manifest_copy)
    write_manifest(rows, manifest_copy, options=m.options)
    _, s = _setup(_config(manifest_copy, tiny_model, out))
    assert s.get("text_encoded", 0) == 1 and s.get("latent_encoded", 0) == 0


def test_ranks_encode_disjoint_shares_that_make_the_whole(tiny_pipeline, sample_manifest, tmp_path):
    """Distributed caching: each rank encodes the missing entries of its own share of the keys; together they
    write every entry exactly once, with the same tensors one process writes."""
    from kontext_trainer.cache import FeatureCache
    from kontext_trainer.data import samples_from_records

    samples = samples_from_records(read_manifest(sample_manifest).records())
    entries = {e for s in samples for e in (s.target, *s.references)}
    keyed = {latent_key("vae", e, "float32"): e for e in entries}
    split, whole = FeatureCache(tmp_path / "split"), FeatureCache(tmp_path / "whole")
    counts = [split.encode_latents(tiny_pipeline.vae, keyed, "cpu", 4, rank=r, world_size=2) for r in (0, 1)]
    assert sum(counts) == len(keyed) == 16 and min(counts) > 0
    assert split.missing_latents(keyed) == {}
    assert whole.encode_latents(tiny_pipeline.vae, keyed, "cpu", 4) == 16
    for k in keyed:
        # the shares batch the entries differently, and on the CPU a batch of one runs another convolution path
        # than a batch of several (up to ~1e-5 apart at values ~3: float rounding, see test_batch_size_...)
        assert torch.allclose(split.load_latent(k), whole.load_latent(k), atol=2e-5)


# ------------------------------------------------------------------------------------------- fast encoding
# The pipelined encoders (threads decode ahead, a background thread writes) must write the very bytes the plain
# sequential loop wrote; these are that loop, as the cache ran it before.


def _sequential_latents(cache, vae, keyed, batch_size):
    from kontext_trainer.cache import save_entry, load_entry_image

    by_size = {}
    for key, entry in sorted(cache.missing_latents(keyed).items()):
        by_size.setdefault(entry.size, []).append((key, entry))
    for items in by_size.values():
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            latents = encode_images(vae, [load_entry_image(e) for _, e in chunk], "cpu")
            for j, (key, entry) in enumerate(chunk):
                save_entry({"latent": latents[j]}, cache.latent_path(key),
                             {"path": entry.path, "hash": entry.file_hash, "synth": entry.synth})


def _sequential_text(cache, pipe, keyed, batch_size):
    from kontext_trainer.cache import save_entry

    todo = sorted(cache.missing_text(keyed).items())
    with torch.no_grad():
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            prompt_embeds, pooled, _ = pipe.encode_prompt(prompt=[c for _, c in chunk], prompt_2=None,
                                                          device=torch.device("cpu"), max_sequence_length=512)
            for j, (key, caption) in enumerate(chunk):
                save_entry({"prompt_embeds": prompt_embeds[j], "pooled": pooled[j]}, cache.text_path(key),
                             {"caption": caption[:4000]})


def _entries(manifest):
    from kontext_trainer.data import samples_from_records

    samples = samples_from_records(read_manifest(manifest).records())
    entries = {e for s in samples for e in (s.target, *s.references)}
    return {latent_key("vae", e, "float32"): e for e in entries}


def _files(root):
    """Every file under root -> (its safetensors header, its tensor bytes). The header as parsed JSON: safetensors
    writes the metadata keys in hash-map order, which changes from one save to the next even in one process (the
    sequential loop never wrote the same bytes twice either); everything else is compared byte for byte."""
    import json

    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            raw = p.read_bytes()
            n = int.from_bytes(raw[:8], "little")
            out[p.relative_to(root)] = (json.loads(raw[8:8 + n]), raw[8 + n:])
    return out


def _temp_files(root):
    return [p for p in root.rglob("*") if ".tmp" in p.name]  # fileio's temp names: .NAME.XXXX.tmp.safetensors


def _encoders(pipe):
    from kontext_trainer.model import TextEncoders

    return TextEncoders(pipe.tokenizer, pipe.text_encoder, pipe.tokenizer_2, pipe.text_encoder_2)


def test_pipelined_latents_are_the_bytes_of_the_sequential_loop(tiny_pipeline, sample_manifest, tmp_path):
    from kontext_trainer.cache import FeatureCache

    keyed = _entries(sample_manifest)
    for batch_size in (1, 3, 4):  # 3: batches that do not divide the buckets
        old, new = FeatureCache(tmp_path / f"old{batch_size}"), FeatureCache(tmp_path / f"new{batch_size}")
        _sequential_latents(old, tiny_pipeline.vae, keyed, batch_size)
        assert new.encode_latents(tiny_pipeline.vae, keyed, "cpu", batch_size, workers=3) == len(keyed) == 16
        old_files, new_files = _files(old.root), _files(new.root)
        assert len(new_files) == 16 and old_files == new_files, batch_size


def test_pipelined_text_is_the_bytes_of_the_sequential_loop(tiny_pipeline, sample_manifest, tmp_path):
    from kontext_trainer.cache import FeatureCache

    captions = sorted({r["caption"] for r in read_manifest(sample_manifest).records()}
                      | {"", "a caption long enough to be truncated " * 30})
    keyed = {text_key("te", c, 512): c for c in captions}
    for batch_size in (1, 3):
        old, new = FeatureCache(tmp_path / f"old{batch_size}"), FeatureCache(tmp_path / f"new{batch_size}")
        _sequential_text(old, tiny_pipeline, keyed, batch_size)
        assert new.encode_text(_encoders(tiny_pipeline), keyed, "cpu", batch_size, 512) == len(keyed)
        assert _files(old.root) == _files(new.root), batch_size
    assert "compute_bias" not in vars(tiny_pipeline.text_encoder_2.encoder.block[0].layer[0].SelfAttention)


def test_loader_threads_build_the_batch_images_to_tensor_builds(sample_manifest):
    """The batch assembled row by row in loader threads equals images_to_tensor(images).to(dtype): same values,
    same dtype rounding and the same (channels-last) strides, so the VAE's convolutions see the same input."""
    from kontext_trainer.cache import load_entry_into, images_to_tensor, load_entry_image

    keyed = _entries(sample_manifest)
    chunk = [e for e in keyed.values() if e.size == (64, 64)][:3]
    for dtype in (torch.float32, torch.bfloat16):
        buf = torch.empty((len(chunk), 64, 64, 3), dtype=dtype)
        assert not any(load_entry_into(e, None, buf, j) for j, e in enumerate(chunk))
        expected = images_to_tensor([load_entry_image(e) for e in chunk]).to(dtype=dtype)
        x = buf.permute(0, 3, 1, 2)
        assert torch.equal(x, expected) and x.stride() == expected.stride() and x.dtype == expected.dtype
    odd = torch.empty((1, 48, 48, 3))  # not the image's size: the caller converts the whole batch itself
    assert load_entry_into(chunk[0], None, odd, 0) is True


def test_batch_size_changes_latents_only_by_float_rounding(tiny_pipeline, sample_manifest, tmp_path):
    """On the CPU a batch of one runs another convolution path than a batch of several: observed up to ~9e-6 apart
    (values up to ~3, float32), while batches of 2, 3, 4, 8 and 16 gave identical bytes. Hence the batch size is
    part of "same inputs" for byte-identical caches."""
    from kontext_trainer.cache import FeatureCache

    keyed = _entries(sample_manifest)
    one, four = FeatureCache(tmp_path / "one"), FeatureCache(tmp_path / "four")
    one.encode_latents(tiny_pipeline.vae, keyed, "cpu", 1)
    four.encode_latents(tiny_pipeline.vae, keyed, "cpu", 4)
    for k in keyed:
        a, b = one.load_latent(k), four.load_latent(k)
        assert torch.allclose(a, b, rtol=1e-5, atol=2e-5), (a - b).abs().max()


def test_a_corrupt_image_names_its_file_and_leaves_nothing_half_written(tiny_pipeline, manifest_copy, tmp_path):
    from kontext_trainer.cache import CacheError, FeatureCache
    from safetensors.torch import load_file

    keyed = _entries(manifest_copy)
    order = sorted(keyed)
    bad = keyed[order[len(order) // 2]]
    with open(bad.path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really a png")
    cache = FeatureCache(tmp_path / "cache")
    try:
        cache.encode_latents(tiny_pipeline.vae, keyed, "cpu", 2, workers=2)
        raise AssertionError("a corrupt image must raise")
    except CacheError as exc:
        assert exc.path == bad.path and bad.path in str(exc)
    assert _temp_files(cache.root) == []
    written = [p for p in cache.root.rglob("*.safetensors")]
    assert len(written) < len(keyed)
    for p in written:  # whatever was written is whole
        assert load_file(str(p))["latent"].shape[0] == 4
    assert not cache.latent_path(order[len(order) // 2]).exists()


def test_a_failed_write_names_the_cache_file(tiny_pipeline, sample_manifest, tmp_path, monkeypatch):
    import kontext_trainer.cache as cache_mod

    keyed = _entries(sample_manifest)
    cache = cache_mod.FeatureCache(tmp_path / "cache")
    victim = cache.latent_path(sorted(keyed)[5])
    real = cache_mod.save_entry

    def flaky(tensors, path, metadata=None):
        if path == victim:
            raise OSError(28, "No space left on device")
        return real(tensors, path, metadata)

    monkeypatch.setattr(cache_mod, "save_entry", flaky)
    try:
        cache.encode_latents(tiny_pipeline.vae, keyed, "cpu", 2)
        raise AssertionError("a failed write must raise")
    except cache_mod.CacheError as exc:
        assert exc.path == str(victim) and "No space left" in str(exc)
    assert _temp_files(cache.root) == [] and not victim.exists()


def test_progress_follows_the_files_written_in_the_callers_thread(tiny_pipeline, sample_manifest, tmp_path):
    import threading

    from kontext_trainer.cache import FeatureCache

    calls = []
    cache = FeatureCache(tmp_path / "cache")

    def progress(stage, done, total):
        calls.append((stage, done, total, threading.get_ident(), len(list(cache.root.rglob("*.safetensors")))))

    cache.encode_latents(tiny_pipeline.vae, _entries(sample_manifest), "cpu", 3, progress=progress)
    assert calls[0][:3] == ("latents", 0, 16) and calls[-1][:3] == ("latents", 16, 16)
    done = [c[1] for c in calls]
    assert done == sorted(done) and len(set(done)) == len(done)
    assert {c[3] for c in calls} == {threading.get_ident()}
    assert all(files >= d for _, d, _, _, files in calls)  # reported only once written


def _spy_sdpa(monkeypatch):
    """Record whether each attention mask reaching SDPA is contiguous."""
    import torch.nn.functional as F

    seen = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        mask = kwargs.get("attn_mask")
        if mask is not None:
            seen.append(mask.is_contiguous())
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return seen


def _t5_devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _t5_devices())
def test_t5_contiguous_bias_gives_the_same_outputs(tiny_pipeline, monkeypatch, device):
    """The patch only changes the layout of T5's position bias. transformers 5.17 (the GPU machines') hands the
    permuted bias to SDPA as is; newer versions copy it contiguous themselves: run both ways."""
    import copy

    from kontext_trainer.encode import check_t5_bias_patch, patch_t5_position_bias, unpatch_t5_position_bias

    t5 = copy.deepcopy(tiny_pipeline.text_encoder_2).to(device)
    tok = tiny_pipeline.tokenizer_2
    assert check_t5_bias_patch(t5, tok, device, force_math=True) == 0.0  # same kernel: to the last bit
    if device == "cpu":
        assert check_t5_bias_patch(t5, tok, device) == 0.0
    else:  # the fused kernel against the math one: float rounding only
        assert check_t5_bias_patch(t5, tok, device) < 1e-4
    import transformers.integrations.sdpa_attention as sdpa_mod

    if hasattr(sdpa_mod, "create_position_bias_mask"):
        monkeypatch.setattr(sdpa_mod, "create_position_bias_mask",
                            lambda position_bias, attention_mask, is_causal, query, key: position_bias)
        seen = _spy_sdpa(monkeypatch)
        if device == "cpu":
            assert check_t5_bias_patch(t5, tok, device) == 0.0
        seen.clear()
        check_t5_bias_patch(t5, tok, device, captions=["make it red"])
        assert seen == [False, False, True, True]  # 2 layers unpatched, then patched
    # the patch is per instance, idempotent and undone exactly
    assert patch_t5_position_bias(t5) == 1 and patch_t5_position_bias(t5) == 0
    assert "compute_bias" not in vars(tiny_pipeline.text_encoder_2.encoder.block[0].layer[0].SelfAttention)
    twin = copy.deepcopy(t5)  # a copy's patched method reads the copy's own weights
    with torch.no_grad():
        twin.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.add_(1.0)
        assert not torch.equal(twin.encoder.block[0].layer[0].SelfAttention.compute_bias(4, 4),
                               t5.encoder.block[0].layer[0].SelfAttention.compute_bias(4, 4))
    assert t5.encoder.block[0].layer[0].SelfAttention.compute_bias(5, 7).is_contiguous()
    assert unpatch_t5_position_bias(t5) == 1 and unpatch_t5_position_bias(t5) == 0


def test_auto_cache_batch_size():
    from kontext_trainer.cache import auto_cache_batch_size

    assert auto_cache_batch_size("cpu", "vae") == auto_cache_batch_size("cpu", "text") == 1
    assert auto_cache_batch_size(torch.device("cpu"), "latents") == 1
    with pytest.raises(ValueError):
        auto_cache_batch_size("cpu", "clip")
    if torch.cuda.is_available():
        assert auto_cache_batch_size("cuda", "text") == 16
        assert 1 <= auto_cache_batch_size("cuda", "vae") <= 8
        assert auto_cache_batch_size("cuda", "vae", pixels=512 * 512) >= auto_cache_batch_size("cuda", "vae")


def test_vae_speedups_are_opt_in_and_undone(tiny_pipeline, sample_manifest, tmp_path, monkeypatch):
    from kontext_trainer.cache import FeatureCache
    from kontext_trainer.encode import vae_speedups

    vae = tiny_pipeline.vae
    keyed = _entries(sample_manifest)
    plain, fast = FeatureCache(tmp_path / "plain"), FeatureCache(tmp_path / "fast")
    plain.encode_latents(vae, keyed, "cpu", 4)
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or fn)
    fast.encode_latents(vae, keyed, "cpu", 4, speedups=("channels_last", "compile"))
    assert len(compiled) == 1
    for k in keyed:
        assert torch.allclose(plain.load_latent(k), fast.load_latent(k), atol=2e-5)
    assert "forward" not in vars(vae.encoder)
    assert all(p.is_contiguous() for p in vae.parameters())
    with pytest.raises(ValueError):
        with vae_speedups(vae, ["fp8"]):
            pass


def test_compiled_vae_latents_are_cached_under_keys_of_their_own(sample_manifest, tiny_model, tmp_path, monkeypatch):
    """cache_compile_vae: the latent cache is encoded through a compiled VAE encoder, under keys that differ from
    the default path's (its latents differ in the last bits), while the default keys stay what they were."""
    from conftest import tiny_cpu_config
    from kontext_trainer.cache import latent_key
    from kontext_trainer.recipe import KontextLoRARecipe

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or fn)  # the wiring, not inductor
    keys = {}
    for on in (False, True):
        cfg = tiny_cpu_config(sample_manifest, tiny_model, tmp_path / f"run-{on}", cache_compile_vae=on,
                              cache_dir=str(tmp_path / "cache"))
        recipe = KontextLoRARecipe(cfg)
        recipe.setup()
        keys[on] = recipe.keys.latent
        assert len(compiled) == (1 if on else 0)  # the second run encoded everything again, compiled
    assert set(keys[False]) == set(keys[True]) and all(keys[False][e] != keys[True][e] for e in keys[False])
    entry = next(iter(keys[False]))
    assert latent_key("fp", entry, "float32") == latent_key("fp", entry, "float32", ())
