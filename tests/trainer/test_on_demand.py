"""On-demand references (`kontext-data degrade --on-demand`, then `pair`): no reference image on disk, the
trainer synthesizes it from the source with the record's seed; the result is exactly that of training on the
materialized files (same cached reference latents, same losses)."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from conftest import kontext_data_cli, load_make_sample
from kontext_data.manifest import read_manifest, write_manifest
from kontext_trainer.cache import ImageEntry, latent_key
from kontext_trainer.config import TrainConfig
from kontext_trainer.data import samples_from_records
from kontext_trainer.recipe import KontextLoRARecipe, TrainError


def _run(args):
    proc = subprocess.run(kontext_data_cli() + args, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def degraded(tmp_path_factory):
    """The same sample images degraded on disk and on demand, each paired into its own manifest."""
    root = tmp_path_factory.mktemp("ondemand")
    load_make_sample().make_sample(root / "data", n=6, size=64, seed=3)
    src = str(root / "data" / "edited")
    chain = ["-t", "blur", "--blur-radius", "1.5", "-t", "jpeg", "--quality", "40", "--workers", "1"]
    _run(["degrade", src, *chain, "--out", str(root / "refs_disk")])
    _run(["degrade", src, *chain, "--out", str(root / "refs_od"), "--on-demand"])
    # the JPEG chain turns x.png into x.jpg on disk: pair by stem
    _run(["pair", src, str(root / "refs_disk"), "--out", str(root / "disk.parquet"), "--resolution", "64",
          "--match", "stem"])
    _run(["pair", src, str(root / "refs_od"), "--out", str(root / "od.parquet"), "--resolution", "64"])
    return root


def _cfg(manifest, model, out, **kw):
    base = dict(manifest=str(manifest), model=str(model), output_dir=str(out), base_model_precision="fp32",
                max_train_steps=3, lora_rank=4, learning_rate=1e-3, report_to="none", skip_final_validation=True,
                device="cpu", train_batch_size=2)
    base.update(kw)
    return TrainConfig(**base)


def test_manifest_rows_point_at_the_source(degraded):
    rows = read_manifest(degraded / "od.parquet").records()
    assert not list((degraded / "refs_od").rglob("*.jpg"))  # nothing materialized
    for r in rows:
        rec = json.loads(r["reference_degradations"][0])
        assert rec["on_demand"] is True
        assert r["reference_paths"] == [r["target_path"]]
    s = samples_from_records(rows)[0]
    assert s.references[0].on_demand and not s.target.on_demand
    # the target and its on-demand reference share file, hash and geometry, never the cache entry
    assert s.references[0].path == s.target.path
    assert latent_key("vae", s.references[0], "float32") != latent_key("vae", s.target, "float32")


def test_on_demand_key_follows_the_record():
    g = dict(intermediary_width=64, intermediary_height=64, crop_left=0, crop_top=0, bucket_width=64,
             bucket_height=64)
    rec = {"on_demand": True, "params_hash": "aa", "seed": 1, "chain": []}

    def key(**change):
        return latent_key("vae", ImageEntry.from_geometry("/no/file.png", "h", g,
                                                          synth=json.dumps({**rec, **change})), "float32")

    assert key() == key(caption="other words")  # provenance details that do not change pixels
    assert key() != key(seed=2) and key() != key(params_hash="bb")


def test_training_on_demand_equals_training_on_files(tiny_model, degraded, tmp_path):
    runs = {}
    for name in ("disk", "od"):
        recipe = KontextLoRARecipe(_cfg(degraded / f"{name}.parquet", tiny_model, tmp_path / name))
        recipe.setup()
        refs = {s.sample_id: recipe.cache.load_latent(recipe.keys.latent[s.references[0]]) for s in recipe.samples}
        targets = {s.sample_id: recipe.cache.load_latent(recipe.keys.latent[s.target]) for s in recipe.samples}
        runs[name] = (refs, targets, recipe.cache_stats, recipe.train().losses)
    (ref_d, tgt_d, stats_d, loss_d), (ref_o, tgt_o, stats_o, loss_o) = runs["disk"], runs["od"]
    assert stats_o["latent_total"] == stats_d["latent_total"] == 12  # 6 targets + 6 synthesized references
    assert sorted(ref_d) == sorted(ref_o)
    for sid in ref_d:
        assert torch.equal(ref_d[sid], ref_o[sid]), sid  # bit-identical reference latents
        assert torch.equal(tgt_d[sid], tgt_o[sid]), sid
        assert not torch.equal(ref_o[sid], tgt_o[sid])  # the reference really is degraded
    assert loss_o == loss_d  # identical losses, step by step


def test_bad_on_demand_record_is_reported_before_the_model(degraded, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(degraded, folder)
    m = read_manifest(folder / "od.parquet")
    rows = m.rows()
    rec = json.loads(rows[0]["reference_degradations"][0])
    rec["chain"] = [{"type": "sharpen", "params": {}}]
    rows[0]["reference_degradations"] = [json.dumps(rec)]
    rows[1]["reference_degradations"] = ['{"on_demand": true}']
    write_manifest(rows, folder / "od.parquet", options=m.options)
    with pytest.raises(TrainError) as exc:
        KontextLoRARecipe(_cfg(folder / "od.parquet", tmp_path / "no-model", tmp_path / "out")).setup()
    assert len(exc.value.problems) == 2
    text = str(exc.value)
    assert "cannot be rebuilt" in text and "lacks chain, seed, params_hash" in text and "no-model" not in text
