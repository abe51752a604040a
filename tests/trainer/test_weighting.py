"""Dataset weights and repeats: which entries apply to which samples (dataset id or manifest; weights multiply,
repeats r count r + 1, the config's repeats replace imported ones), problems listed, the start-up line, and a
weighted run that resumes exactly."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from kontext_data.manifest import read_manifest, write_manifest
from kontext_trainer.data import read_manifests
from kontext_trainer.recipe import KontextLoRARecipe, TrainError, train
from kontext_trainer.weighting import dataset_weighting
from conftest import tiny_cpu_config


def _two_datasets(manifest, folder, repeats=None):
    """The sample manifest with its rows split into datasets `faces` (first 4) and `scenes` (the rest)."""
    m = read_manifest(manifest)
    rows = sorted(m.table.to_pylist(), key=lambda r: r["sample_id"])
    for i, r in enumerate(rows):
        r["dataset_id"] = "faces" if i < 4 else "scenes"
        r["sample_id"] = f"{r['dataset_id']}:{r['sample_id'].split(':', 1)[1]}"
    options = dict(m.options, **({"dataset_repeats": repeats} if repeats else {}))
    return write_manifest(rows, folder / "two.parquet", options=options)


def _weighting(paths, weights=(), repeats=()):
    records, options, problems = read_manifests(paths)
    assert not problems
    train_records = [r for r in records if r["split"] == "train"]
    return dataset_weighting(train_records, records, paths, options, weights, repeats), train_records


def test_entries_name_datasets_or_manifests_and_multiply(manifest_copy):
    two = _two_datasets(manifest_copy, manifest_copy.parent, repeats={"scenes": 3})
    w, recs = _weighting([str(two)], weights=(("faces", 2.0), (str(two), 0.5)))
    by = {r["sample_id"]: w.by_sample[r["sample_id"]][0] for r in recs}
    # faces: 2 (its id) x 0.5 (its manifest); scenes: 0.5 x (3 imported repeats + 1)
    assert sorted(set(by.values())) == [1.0, 2.0]
    assert all(v == (1.0 if sid.startswith("faces") else 2.0) for sid, v in by.items())
    assert w.describe(list(by)) == ("datasets per epoch: faces 4, scenes 8 (x2: weight 0.5, repeats 3); 12 samples "
                                    "per epoch")
    # the config's repeats for a dataset id replace the imported ones (same setting), not multiply with them
    w2, _ = _weighting([str(two)], repeats=(("scenes", 1),))
    assert w2.describe(list(by)) == "datasets per epoch: faces 4, scenes 8 (x2: repeats 1); 12 samples per epoch"
    w3, _ = _weighting([str(two)], weights=(("faces", 2.0),))
    assert w3.describe(list(by)) == "datasets per epoch: faces 8 (x2), scenes 16 (x4: repeats 3); 24 samples per epoch"


def test_keys_that_name_nothing_and_bad_imported_values_are_listed(manifest_copy):
    two = _two_datasets(manifest_copy, manifest_copy.parent, repeats={"scenes": -1})
    w, _ = _weighting([str(two)], weights=(("facez", 2.0),), repeats=(("nowhere.parquet", 1),))
    text = " | ".join(w.problems)
    assert len(w.problems) == 3, w.problems
    assert "dataset_weights: 'facez' names no dataset id or manifest" in text and "faces, scenes" in text
    assert "dataset_repeats: 'nowhere.parquet'" in text
    assert "options.dataset_repeats 'scenes': -1" in text


def _cfg(manifest, model, out, **kw):
    return tiny_cpu_config(manifest, model, out, **{"max_train_steps": 8, "caption_dropout_probability": 0.3,
                                                    **kw})


def test_weighted_run_says_its_datasets_and_resumes_exactly(manifest_copy, tiny_model, tmp_path):
    """faces at weight 0.5 (a seeded half each epoch), scenes with SimpleTuner repeats 1 (twice): 10 samples an
    epoch; the run crosses an epoch and a resumed run gives the uninterrupted run's losses."""
    two = _two_datasets(manifest_copy, manifest_copy.parent)
    kw = dict(dataset_weights=(("faces", 0.5),), dataset_repeats=(("scenes", 1),))
    events = []
    recipe = KontextLoRARecipe(_cfg(two, tiny_model, tmp_path / "full", **kw), on_event=lambda k, d: events.append(d))
    recipe.setup()
    assert ("datasets per epoch: faces 2 (x0.5), scenes 8 (x2: repeats 1); 10 samples per epoch"
            in [d.get("message") for d in events])
    counts = Counter(recipe.samples[i].sample_id.split(":")[0] for b in recipe.sampler.batches(0) for i in b)
    assert counts == {"faces": 2, "scenes": 8}
    full = recipe.train()
    lines = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    epochs = [d["epoch"] for d in lines if "epoch" in d]
    assert epochs[0] == 0 and epochs[-1] >= 1
    train(_cfg(two, tiny_model, tmp_path / "split", max_train_steps=3, checkpointing_steps=3, **kw))
    rest = train(_cfg(two, tiny_model, tmp_path / "split", resume_from_checkpoint="latest", **kw))
    assert [s for s, _ in rest.losses] == [4, 5, 6, 7, 8]
    assert [l for _, l in rest.losses] == [l for _, l in full.losses[3:]]


def test_unknown_keys_stop_the_run_before_the_model(sample_manifest, tmp_path):
    cfg = _cfg(sample_manifest, tmp_path / "no-such-model", tmp_path / "out", dataset_weights=(("ghost", 2.0),))
    with pytest.raises(TrainError) as exc:
        KontextLoRARecipe(cfg).setup()
    assert "'ghost' names no dataset id or manifest" in str(exc.value) and "no-such-model" not in str(exc.value)
