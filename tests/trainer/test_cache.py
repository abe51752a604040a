"""Caches are keyed by content: shuffling, editing or resuming can never pair a caption with the wrong image; a
second run reuses everything; a changed image re-encodes only that entry."""

from __future__ import annotations

import random

import pyarrow.parquet as pq
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
        assert torch.allclose(split.load_latent(k), whole.load_latent(k), atol=1e-6)
