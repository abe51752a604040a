"""kontext_data.check: the content check flags identical, unrelated (shuffled) and misaligned pairs.

The precision/recall test uses examples/make_sample.py (edits that change one object, the project's realistic
synthetic set) with a known 5 % of the references shuffled on disk before pairing, exactly how a user's mis-paired
files look. Helpers here (`sample_manifest`, `cli_app`) are shared with test_inspect.py and test_preview.py.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kontext_data.check import (CheckConfig, CheckTask, CheckWorker, check_manifest, check_records,
                                write_manifest_with_similarity)
from kontext_data.geometry import GeometryOptions
from kontext_data.manifest import read_manifest, view_image, write_manifest
from kontext_data.pairing import PairConfig, pair_folders

ROOT = Path(__file__).resolve().parents[2]


def make_sample_module():
    spec = importlib.util.spec_from_file_location("make_sample", ROOT / "examples" / "make_sample.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def pair_dir(root: Path, resolution: int = 128, out: str = "m.parquet", geometry: dict | None = None, **kw) -> Path:
    cfg = PairConfig(edited=root / "edited", references=(root / "reference",), out=root / out,
                     geometry=GeometryOptions(resolution=resolution, **(geometry or {})), workers=1, cache_dir=None,
                     **kw)
    res = pair_folders(cfg)
    assert res.manifest, [p.message for p in res.problems]
    return root / out


def sample_manifest(root: Path, n: int = 24, seed: int = 0, size: int = 128) -> Path:
    """examples/make_sample.py OUT + pairing at 128 px: the sample data of the docs."""
    make_sample_module().make_sample(root, n=n, size=size, seed=seed)
    return pair_dir(root)


def cli_app():
    """A local Typer app with the three commands, registered as kontext_data/cli.py registers them."""
    import typer

    from kontext_data import cli_inspect

    app = typer.Typer()
    cli_inspect.register(app)
    return app


def run_cli(*args):
    from typer.testing import CliRunner

    return CliRunner().invoke(cli_app(), [str(a) for a in args])


def shuffle_references(root: Path, ms, n: int, fraction: float, seed: int) -> set[str]:
    """Rotate the reference files of a random `fraction` of the square samples; return their sample ids."""
    rng = np.random.default_rng(seed)
    square = [i for i in range(n) if i % 8 not in (3, 6)]
    chosen = sorted(int(i) for i in rng.choice(square, size=max(2, round(fraction * n)), replace=False))
    paths = [root / "reference" / f"{ms._rel_stem(i, n)}.png" for i in chosen]
    data = [p.read_bytes() for p in paths]
    for j, p in enumerate(paths):
        p.write_bytes(data[(j + 1) % len(paths)])
    return {f"edited:{ms._rel_stem(i, n)}.png" for i in chosen}


def test_shuffled_pairs_are_flagged_unrelated_with_precision_and_recall_above_0_9(tmp_path):
    ms = make_sample_module()
    n = 200
    ms.make_sample(tmp_path, n=n, size=128, seed=11)
    shuffled = shuffle_references(tmp_path, ms, n, 0.05, seed=11)
    manifest = pair_dir(tmp_path)
    result = check_manifest(manifest, CheckConfig(workers=2))  # the spawn pool path (>= 48 samples)
    assert result.workers == 2 and len(result.samples) == n
    flagged = {s.sample_id for s in result.samples if "unrelated" in s.flags}
    tp = len(flagged & shuffled)
    precision = tp / max(1, len(flagged))
    recall = tp / len(shuffled)
    print(f"\nunrelated flag on {n} pairs with {len(shuffled)} shuffled: precision {precision:.3f}, recall "
          f"{recall:.3f}; {result.report()['ms_per_pair']} ms/pair ({result.workers} processes)")
    assert precision >= 0.9 and recall >= 0.9, (precision, recall, sorted(flagged ^ shuffled))
    # genuine edit pairs are not flagged for anything else either (at most 1 % of them)
    other = [s.sample_id for s in result.samples if s.flags and s.sample_id not in shuffled]
    assert len(other) <= 0.01 * (n - len(shuffled)), other
    # the scores separate: every shuffled pair scores below every genuine one's 5th percentile
    sims = {s.sample_id: s.similarity for s in result.samples}
    genuine = sorted(v for k, v in sims.items() if k not in shuffled)
    assert max(sims[k] for k in shuffled) < genuine[len(genuine) // 20]
    report = result.report()
    assert report["flag_counts"]["unrelated"] == len(flagged)
    assert {f["sample_id"] for f in report["flagged"]} >= flagged
    assert all("mis-paired" in r for s in result.samples if "unrelated" in s.flags for r in s.reasons)


def _texture(rng, h: int, w: int) -> np.ndarray:
    """A photo-like RGB texture: noise at three scales, smoothly upsampled, over a random base colour."""
    import cv2

    img = np.zeros((h, w, 3), np.float32)
    for scale in (4, 16, 64):
        small = rng.normal(0, 1, (max(2, h // scale), max(2, w // scale), 3)).astype(np.float32)
        img += cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC) * (scale / 64)
    img = (img - img.min()) / (img.max() - img.min() + 1e-6)
    base = rng.uniform(0.2, 0.8, 3).astype(np.float32)
    return np.clip((img * 0.7 + base * 0.3) * 255, 0, 255).astype(np.uint8)


def photo_like_pairs(root: Path, n: int, seed: int, global_fraction: float) -> set[str]:
    """JPEG pairs of textures; edits are local (an ellipse of other texture) or global (gamma + colour shift, half of
    them smoothed: every pixel changes, the edges stay). 5 % of the square references are then shuffled."""
    import cv2

    rng = np.random.default_rng(seed)
    (root / "edited").mkdir(parents=True)
    (root / "reference").mkdir()
    for i in range(n):
        h, w = (256, 256) if i % 4 else (192, 256)
        ref = _texture(rng, h, w)
        if rng.random() < global_fraction:
            ed = np.clip(255 * (ref / 255.0) ** rng.uniform(0.5, 1.8) + rng.uniform(-60, 60, 3), 0, 255).astype(np.uint8)
            if rng.random() < 0.5:
                ed = cv2.bilateralFilter(ed, 9, 75, 75)
        else:
            ed = ref.copy()
            mask = np.zeros((h, w), np.uint8)
            cv2.ellipse(mask, (int(rng.integers(40, w - 40)), int(rng.integers(40, h - 40))),
                        (int(rng.integers(15, 60)), int(rng.integers(15, 60))), float(rng.uniform(0, 180)), 0, 360, 255, -1)
            ed[mask > 0] = _texture(rng, h, w)[mask > 0]
        Image.fromarray(ref).save(root / "reference" / f"{i:04d}.jpg", quality=90)
        Image.fromarray(ed).save(root / "edited" / f"{i:04d}.jpg", quality=90)
    chosen = sorted(int(i) for i in rng.choice([i for i in range(n) if i % 4], size=round(0.05 * n), replace=False))
    paths = [root / "reference" / f"{i:04d}.jpg" for i in chosen]
    data = [p.read_bytes() for p in paths]
    for j, p in enumerate(paths):
        p.write_bytes(data[(j + 1) % len(paths)])
    return {f"edited:{i:04d}.jpg" for i in chosen}


def test_shuffled_photo_like_pairs_with_global_edits_are_flagged(tmp_path):
    """30 % of the edits change every pixel (colour grading, smoothing): they keep their edges and are not flagged."""
    shuffled = photo_like_pairs(tmp_path, 200, seed=2, global_fraction=0.3)
    result = check_manifest(pair_dir(tmp_path, resolution=256, captions="none"), CheckConfig(workers=2))
    flagged = {s.sample_id for s in result.samples if "unrelated" in s.flags}
    tp = len(flagged & shuffled)
    precision, recall = tp / max(1, len(flagged)), tp / len(shuffled)
    print(f"\nphoto-like, 30 % global edits: precision {precision:.3f}, recall {recall:.3f}")
    assert precision >= 0.9 and recall >= 0.9, (precision, recall, sorted(flagged ^ shuffled))
    assert not [s.sample_id for s in result.samples if s.flags and s.sample_id not in shuffled and
                "unrelated" not in s.flags]


def _shift(path: Path, dx: int, dy: int) -> None:
    a = np.asarray(Image.open(path).convert("RGB"))
    h, w = a.shape[:2]
    big = np.pad(a, ((20, 20), (20, 20), (0, 0)), mode="edge")
    Image.fromarray(np.ascontiguousarray(big[20 + dy:20 + dy + h, 20 + dx:20 + dx + w])).save(path)


def test_identical_misaligned_and_aspect_are_flagged_with_reasons(tmp_path):
    ms = make_sample_module()
    n = 24
    ms.make_sample(tmp_path, n=n, size=128, seed=3)
    ref = lambda i: tmp_path / "reference" / f"{ms._rel_stem(i, n)}.png"  # noqa: E731
    edit = lambda i: tmp_path / "edited" / f"{ms._rel_stem(i, n)}.png"  # noqa: E731
    shutil.copyfile(edit(0), ref(0))                                      # same bytes: no edit
    Image.open(edit(1)).save(ref(1), format="PNG", compress_level=1)      # same pixels, other bytes
    _shift(ref(2), 10, 0)                                                 # shifted by 10 px of 128
    _shift(ref(4), -6, 8)
    Image.open(ref(5)).resize((128, 100), Image.Resampling.LANCZOS).save(ref(5))  # aspect differs
    manifest = pair_dir(tmp_path)
    result = check_manifest(manifest)
    by_id = {s.sample_id: s for s in result.samples}
    sid = lambda i: f"edited:{ms._rel_stem(i, n)}.png"  # noqa: E731
    assert by_id[sid(0)].flags == ["identical"] and "same file bytes" in by_id[sid(0)].reasons[0]
    assert by_id[sid(1)].flags == ["identical"] and "pixel difference" in by_id[sid(1)].reasons[0]
    for i in (2, 4):
        assert by_id[sid(i)].flags == ["misaligned"], (i, by_id[sid(i)].reasons)
        assert "shifted by" in by_id[sid(i)].reasons[0]
    assert by_id[sid(2)].references[0].shift[0] < 0  # the reference's content sits left of the target's: match left
    assert by_id[sid(5)].flags == ["misaligned"] and "aspect" in by_id[sid(5)].reasons[0]
    flagged = {s.sample_id for s in result.flagged}
    assert flagged == {sid(i) for i in (0, 1, 2, 4, 5)}, flagged
    assert not result.ok

    # reference_loose: no shared crop, so a shift or an aspect difference is not "misaligned"
    loose = pair_dir(tmp_path, out="loose.parquet", conditioning="reference_loose")
    loose_flags = {s.sample_id: s.flags for s in check_manifest(loose).samples if s.flags}
    assert "misaligned" not in {f for flags in loose_flags.values() for f in flags}


def test_unreadable_files_come_back_as_flags_not_exceptions(tmp_path):
    manifest = sample_manifest(tmp_path, n=6)
    records = read_manifest(manifest).records()
    Path(records[1]["reference_paths"][0]).unlink()
    Path(records[2]["target_path"]).write_bytes(b"not an image")
    result = check_records(records, CheckConfig(), manifest)
    assert result.samples[1].flags == ["unreadable"] and "cannot read reference" in result.samples[1].reasons[0]
    assert records[1]["reference_paths"][0] in result.samples[1].reasons[0]
    assert result.samples[2].flags == ["unreadable"] and "cannot read target" in result.samples[2].reasons[0]
    # the worker itself, as the pool calls it: a list back, never an exception
    task = CheckTask(row=0, target=str(tmp_path / "missing.png"), geometry=(("intermediary_width", 8),),
                     references=((str(tmp_path / "gone.png"), (), None),))
    (row, scores), = CheckWorker()([task])
    assert row == 0 and scores[0].error and "missing.png" in scores[0].error


def test_on_demand_reference_is_synthesized_and_scored(tmp_path):
    from kontext_data import degradations as D

    manifest = sample_manifest(tmp_path, n=4)
    m = read_manifest(manifest)
    rows = m.records()
    chain = D.resolve_chain([("jpeg", {"quality": 20})])
    record = {"chain": [s.to_json() for s in chain], "seed": 5, "on_demand": True}
    # on demand: the "reference" is synthesized from the edited file itself (a JPEG-artifact removal pair)
    rows[0]["reference_paths"] = [rows[0]["target_path"]]
    rows[0]["reference_hashes"] = [rows[0]["target_hash"]]
    rows[0]["reference_degradations"] = [json.dumps(record)]
    write_manifest(rows, tmp_path / "od.parquet")
    view = view_image(rows[0]["target_path"], rows[0]["reference_geometry"][0], rows[0]["reference_degradations"][0],
                      (64, 64))
    plain = view_image(rows[0]["target_path"], rows[0], None, (64, 64))
    assert view.size == (64, 64) and np.abs(np.asarray(view, float) - np.asarray(plain, float)).mean() > 0.05
    result = check_manifest(tmp_path / "od.parquet")
    s0 = result.samples[0]
    # same bytes as the target but a recorded degradation: not "identical", and scored as a close pair
    assert s0.flags == [] and s0.similarity > 0.8, (s0.flags, s0.reasons, s0.similarity)


def test_pair_similarity_column_keeps_metadata_and_the_manifest_still_reads(tmp_path):
    manifest = sample_manifest(tmp_path, n=8)
    before = manifest.read_bytes()
    result = check_manifest(manifest)
    out = write_manifest_with_similarity(manifest, result, tmp_path / "checked.parquet")
    assert manifest.read_bytes() == before  # the original is untouched
    checked, orig = read_manifest(out), read_manifest(manifest)
    assert {**checked.metadata, "check": None} == orig.metadata  # every other key kept
    assert checked.check["flag_counts"]["unrelated"] == 0 and "thresholds" in checked.check
    assert checked.similarities() == pytest.approx([s.similarity for s in result.samples], abs=1e-4)
    assert orig.similarities() is None and orig.check is None
    assert len(checked) == 8 and checked.rows()[0]["target_path"] == orig.rows()[0]["target_path"]
    # in place, twice: the column is replaced, not duplicated
    write_manifest_with_similarity(manifest, result, manifest)
    write_manifest_with_similarity(manifest, result, manifest)
    assert read_manifest(manifest).table.column_names.count("pair_similarity") == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left
    # a manifest that changed since the check is refused
    rows = read_manifest(manifest).records()[:5]
    write_manifest(rows, tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="changed since it was checked"):
        write_manifest_with_similarity(tmp_path / "other.parquet", result, tmp_path / "x.parquet")


def test_check_command_exit_codes_report_and_in_place(tmp_path):
    manifest = sample_manifest(tmp_path, n=8)
    r = run_cli("check", manifest, "--report", tmp_path / "c.json", "-q")
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["samples"] == 8 and data["ok"] and len(data["results"]) == 8 and data["ms_per_pair"] > 0
    records = read_manifest(manifest).records()
    shutil.copyfile(records[0]["target_path"], records[0]["reference_paths"][0])  # now identical
    r = run_cli("check", manifest, "--in-place", "--json", "-q")
    assert r.exit_code == 1, r.output
    data = json.loads(r.output[r.output.index("{"):])
    assert data["flag_counts"]["identical"] == 1 and data["manifest_written"] == str(manifest)
    assert read_manifest(manifest).similarities()[0] is not None
    assert run_cli("check", tmp_path / "nope.parquet").exit_code == 2
    assert run_cli("check", manifest, "--in-place", "--write-manifest", tmp_path / "x.parquet").exit_code == 2
    assert run_cli("check", manifest, "--unrelated-ratio", "3").exit_code == 2
