"""The degrade stage and its CLI: determinism, shards, resume, kill-and-resume, corrupt sources, captions,
extension rule, on-demand equivalence, provenance contract."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from kontext_data import degradations as D
from kontext_data.cli_degrade import degrade as degrade_cmd
from kontext_data.degrade import (SIDECAR_DIR, DegradeConfig, DegradeError, build_chain, load_params_file,
                                  per_image_seed, pick_caption, read_provenance, run_degrade, synthesize_reference)

REPO = Path(__file__).resolve().parents[2]


def _img(seed: int, h=48, w=64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = cv2.resize(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_CUBIC)
    return cv2.add(img, rng.integers(0, 30, img.shape, dtype=np.uint8))


def make_src(root: Path, n=8, size=(48, 64)) -> Path:
    """n images, mixed .png / .jpg, in two sub-folders, plus a non-image and a hidden file (ignored)."""
    src = root / "src"
    for i in range(n):
        ext = ".jpg" if i % 2 else ".png"
        p = src / ("a" if i % 3 else "b/c") / f"img{i:02d}{ext}"
        p.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(p), cv2.cvtColor(_img(i, *size), cv2.COLOR_RGB2BGR))
    (src / "a" / "notes.txt").write_text("not an image")
    (src / ".hidden.png").write_bytes(b"x")
    return src


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "/tmp/" not in p.relative_to(root).as_posix()}


def cfg(src, out, types=("blur",), opts=None, **kw) -> DegradeConfig:
    return DegradeConfig(src=src, out=out, chain=tuple(build_chain(list(types), opts or {})), **kw)


def app() -> typer.Typer:
    a = typer.Typer()
    a.command("degrade")(degrade_cmd)

    @a.command("version")
    def _v() -> None:  # a second command so that "degrade" stays a sub-command, as in kontext-data
        pass

    return a


def visible_images(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*") if p.is_file() and SIDECAR_DIR not in p.parts and p.suffix != ".txt")


# ------------------------------------------------------------------------------------------ tests


def test_same_bytes_for_any_worker_count_and_records_carry_provenance(tmp_path):
    src = make_src(tmp_path)
    opts = {"blur_radius": 1.5}
    r1 = run_degrade(cfg(src, tmp_path / "w1", opts=opts, workers=1, captions=("deblur", "sharpen")))
    r2 = run_degrade(cfg(src, tmp_path / "w2", opts=opts, workers=2, captions=("deblur", "sharpen")))
    assert r1.written == r2.written == 8 and r1.ok and r2.ok and r2.workers == 2
    assert tree(tmp_path / "w1") == tree(tmp_path / "w2")
    prov = read_provenance(tmp_path / "w1")
    assert len(prov) == 8
    rec = prov["a/img01.png"]  # blurred a/img01.jpg -> a/img01.png (lossless)
    assert rec["source"] == "a/img01.jpg" and rec["on_demand"] is False
    assert rec["chain"] == [s.to_json() for s in build_chain(["blur"], opts)]
    assert rec["params_hash"] == r1.params_hash and rec["seed"] == per_image_seed(0, "a/img01.jpg")
    assert rec["caption"] in ("deblur", "sharpen")
    json.dumps(prov)  # JSON-serializable for the manifest
    assert read_provenance(tmp_path / "nothing-here") == {}


def test_shards_union_is_byte_identical_to_one_run(tmp_path):
    src = make_src(tmp_path, n=10)
    run_degrade(cfg(src, tmp_path / "one", types=("jpeg",), workers=1, captions=("fix jpeg",)))
    selected = 0
    for k in range(3):
        r = run_degrade(cfg(src, tmp_path / "sharded", types=("jpeg",), workers=1, shard=(k, 3),
                            captions=("fix jpeg",)))
        assert r.sources == 10
        selected += r.selected
    assert selected == 10
    assert tree(tmp_path / "one") == tree(tmp_path / "sharded")  # --shard K/N itself: tests/data/test_workers.py


def test_resume_skips_matching_outputs_and_regenerates_changed_parameters(tmp_path):
    src = make_src(tmp_path)
    out = tmp_path / "out"
    run_degrade(cfg(src, out, opts={"blur_radius": 1.0}, workers=1))
    stamps = {p: p.stat().st_mtime_ns for p in visible_images(out)}
    before = tree(out)
    again = run_degrade(cfg(src, out, opts={"blur_radius": 1.0}, workers=1))
    assert (again.written, again.skipped) == (0, 8)
    assert {p: p.stat().st_mtime_ns for p in visible_images(out)} == stamps
    changed = run_degrade(cfg(src, out, opts={"blur_radius": 2.0}, workers=1))
    assert (changed.written, changed.skipped) == (8, 0)
    after = tree(out)
    for name in before:
        if not name.startswith(SIDECAR_DIR):
            assert after[name] != before[name], name  # never silently reused
    assert {r["params_hash"] for r in read_provenance(out).values()} == {changed.params_hash}
    # a damaged output (hash mismatch) is regenerated too
    victim = visible_images(out)[0]
    victim.write_bytes(victim.read_bytes()[:100])
    fixed = run_degrade(cfg(src, out, opts={"blur_radius": 2.0}, workers=1))
    assert (fixed.written, fixed.skipped) == (1, 7) and tree(out) == after
    # a source removed from SRC: what degrade wrote for it goes too (pair would find a reference without target)
    gone = src / "a" / "img01.jpg"
    gone.unlink()
    pruned = run_degrade(cfg(src, out, opts={"blur_radius": 2.0}, workers=1))
    assert pruned.removed == 1 and pruned.skipped == 7
    assert not (out / "a" / "img01.png").exists() and "a/img01.png" not in read_provenance(out)
    # other seed -> other noise
    reseeded = run_degrade(cfg(src, out, opts={"blur_radius": 2.0}, workers=1, seed=5))
    assert reseeded.written == 7


def test_kill_mid_run_leaves_no_partial_file_and_rerun_completes(tmp_path):
    src = make_src(tmp_path, n=40, size=(384, 512))
    runner = tmp_path / "cli.py"
    runner.write_text(textwrap.dedent(f"""
        import sys, typer
        sys.path.insert(0, {str(REPO)!r})
        from kontext_data.cli_degrade import degrade
        app = typer.Typer()
        app.command("degrade")(degrade)
        app.command("noop")(lambda: None)
        if __name__ == "__main__":
            app()
    """))
    out = tmp_path / "out"
    cmd = [sys.executable, str(runner), "degrade", str(src), "--out", str(out), "-t", "blur", "-t", "jpeg",
           "--quality", "30", "--workers", "2", "-c", "deblur"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (out.exists() and len(visible_images(out)) >= 5):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = visible_images(out)
    assert 0 < len(done) < 40, "kill happened too late to test anything"
    prov = read_provenance(out)
    for p in done:  # every visible file is complete and recorded
        rel = p.relative_to(out).as_posix()
        assert D.load_rgb(p).shape == (384, 512, 3)
        assert prov[rel]["output"] == rel
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert len(visible_images(out)) == 40
    clean = tmp_path / "clean"
    subprocess.run(cmd[:5] + [str(clean)] + cmd[6:], capture_output=True, timeout=120, check=True)
    assert tree(out) == tree(clean)


def test_corrupt_sources_are_reported_by_name_and_the_rest_produced(tmp_path):
    src = make_src(tmp_path)
    good = (src / "a" / "img01.jpg").read_bytes()
    (src / "a" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (src / "a" / "fake.png").write_text("hello")
    result = CliRunner().invoke(app(), ["degrade", str(src), "--out", str(tmp_path / "out"), "-t", "noise",
                                        "--workers", "1", "--json"])
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert summary["failed"] == 2 and summary["written"] == 8
    assert sorted(Path(f["path"]).name for f in summary["failures"]) == ["fake.png", "truncated.jpg"]
    assert all("corrupt" in f["message"] for f in summary["failures"])
    assert not (tmp_path / "out" / "a" / "truncated.png").exists()


def test_captions_are_deterministic_per_image_and_do_not_change_pixels(tmp_path):
    src = make_src(tmp_path, n=12)
    caps = ("deblur", "sharpen image", "enhance sharpness", "increase clarity")
    run_degrade(cfg(src, tmp_path / "c1", workers=1, captions=caps))
    run_degrade(cfg(src, tmp_path / "nocap", workers=1))
    txts = sorted((tmp_path / "c1").rglob("*.txt"))
    assert len(txts) == 12
    chosen = {t.relative_to(tmp_path / "c1").as_posix(): t.read_text() for t in txts}
    assert set(chosen.values()) <= set(caps) and len(set(chosen.values())) > 1
    prov = read_provenance(tmp_path / "c1")
    for rel, rec in prov.items():
        assert chosen[str(Path(rel).with_suffix(".txt"))] == rec["caption"] == pick_caption(caps, rec["seed"])
    for p in visible_images(tmp_path / "c1"):
        assert p.read_bytes() == (tmp_path / "nocap" / p.relative_to(tmp_path / "c1")).read_bytes()
    # captions dropped: the .txt files we wrote go away
    r = run_degrade(cfg(src, tmp_path / "c1", workers=1))
    assert r.written == 12 and not list((tmp_path / "c1").rglob("*.txt"))


def test_extension_rule_no_extra_lossy_pass_and_collisions(tmp_path):
    src = make_src(tmp_path, n=4)  # img00.png img01.jpg img02.png img03.jpg
    (src / "a" / "img05.jpeg").write_bytes((src / "a" / "img01.jpg").read_bytes())
    out = tmp_path / "jpeg"
    res = run_degrade(cfg(src, out, types=("jpeg",), opts={"quality": 20, "compression_rounds": 2}, workers=1))
    names = sorted(p.relative_to(out).as_posix() for p in visible_images(out))
    assert names == ["a/img01.jpg", "a/img02.jpg", "a/img05.jpeg", "b/c/img00.jpg", "b/c/img03.jpg"]
    assert res.codec == "jpeg"
    prov = read_provenance(out)
    for rel, rec in prov.items():  # the file is exactly the last round's bytes
        img = D.load_rgb(src / rec["source"])
        _, data = D.apply_chain(img, D.chain_from_json(rec["chain"]), np.random.default_rng(rec["seed"]),
                                encode_last=True)
        assert (out / rel).read_bytes() == data
    # lossless chain: PNG for every source; the blurred .jpg sources become .png
    run_degrade(cfg(src, tmp_path / "png", types=("noise",), workers=1))
    for p in visible_images(tmp_path / "png"):
        assert p.suffix == ".png" and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        rec = read_provenance(tmp_path / "png")[p.relative_to(tmp_path / "png").as_posix()]
        assert np.array_equal(D.load_rgb(p), synthesize_reference(src / rec["source"], rec))
    # x.png and x.jpg would both write x.png: both reported, nothing written for them
    cv2.imwrite(str(src / "a" / "img01.png"), _img(99))
    res = run_degrade(cfg(src, tmp_path / "coll", types=("noise",), workers=1))
    assert sorted(Path(f.path).name for f in res.failures) == ["img01.jpg", "img01.png"]
    assert "would write a/img01.png" in res.failures[0].message
    assert not (tmp_path / "coll" / "a" / "img01.png").exists()


def test_codec_change_removes_our_old_output_and_foreign_files_are_kept(tmp_path):
    src = make_src(tmp_path, n=2)  # b/c/img00.png, a/img01.jpg
    out = tmp_path / "out"
    run_degrade(cfg(src, out, types=("noise",), workers=1))
    assert (out / "a" / "img01.png").exists()
    run_degrade(cfg(src, out, types=("jpeg",), workers=1))
    assert (out / "a" / "img01.jpg").exists() and not (out / "a" / "img01.png").exists()
    assert set(read_provenance(out)) == {"a/img01.jpg", "b/c/img00.jpg"}
    # switching to on-demand removes the files we wrote; records are then keyed by the source names
    run_degrade(cfg(src, out, types=("jpeg",), workers=1, on_demand=True))
    assert visible_images(out) == [] and set(read_provenance(out)) == {"a/img01.jpg", "b/c/img00.png"}
    run_degrade(cfg(src, out, types=("jpeg",), workers=1))
    assert len(visible_images(out)) == 2 and set(read_provenance(out)) == {"a/img01.jpg", "b/c/img00.jpg"}
    # a file degrade did not write is never replaced silently
    other = tmp_path / "other"
    (other / "a").mkdir(parents=True)
    (other / "a" / "img01.png").write_bytes(b"hand-made reference")
    res = run_degrade(cfg(src, other, types=("noise",), workers=1))
    assert res.failed == 1 and "--overwrite" in res.failures[0].message
    assert (other / "a" / "img01.png").read_bytes() == b"hand-made reference"
    res = run_degrade(cfg(src, other, types=("noise",), workers=1, overwrite=True))
    assert res.ok and (other / "a" / "img01.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("types,opts", [(("jpeg",), {"quality_mode": "range", "quality_range": [10, 30],
                                                     "compression_rounds": 2}),
                                        (("blur",), {"blur_radius": 3.0}),
                                        (("downscale", "blur"), {"blur_type": "motion", "jpeg_quality": 40})])
def test_on_demand_synthesizes_exactly_the_on_disk_pixels(tmp_path, types, opts):
    src = make_src(tmp_path, n=6)
    disk = tmp_path / "disk"
    spec = tmp_path / "spec"
    run_degrade(cfg(src, disk, types=types, opts=opts, workers=1, captions=("restore",)))
    res = run_degrade(cfg(src, spec, types=types, opts=opts, workers=1, captions=("restore",), on_demand=True))
    assert res.recorded == 6 and res.written == 0
    assert visible_images(spec) == []  # no pixels written
    assert len(list(spec.rglob("*.txt"))) == 6
    disk_prov = {r["source"]: (rel, r) for rel, r in read_provenance(disk).items()}
    spec_prov = read_provenance(spec)
    assert set(spec_prov) == set(disk_prov)  # on-demand records are keyed by the source's own name
    for key, rec in spec_prov.items():
        rel, disk_rec = disk_prov[key]
        assert rec["on_demand"] is True and rec["source"] == key and rec["seed"] == disk_rec["seed"]
        synth = synthesize_reference(src / rec["source"], rec)
        assert synth.dtype == np.uint8 and synth.shape[2] == 3
        assert np.array_equal(synth, D.load_rgb(disk / rel))
        assert np.array_equal(synth, np.asarray(Image.open(disk / rel).convert("RGB")))  # PIL loaders too
    again = run_degrade(cfg(src, spec, types=types, opts=opts, workers=1, captions=("restore",), on_demand=True))
    assert again.skipped == 6


def test_cli_usage_errors_params_file_and_summary(tmp_path):
    src = make_src(tmp_path, n=3)
    runner = CliRunner()
    bad = runner.invoke(app(), ["degrade", str(src), "--out", str(tmp_path / "o"), "-t", "blur", "-t", "sharpen",
                                "--quality", "20", "-p", "blur.radius=3", "--shard", "5/2"])
    assert bad.exit_code == 2
    for needle in ("unknown degradation type 'sharpen'", "'quality' belongs to jpeg", "unknown parameter 'radius'",
                   "--shard '5/2'"):
        assert needle in bad.output.replace("\n", " ") or needle in bad.stderr.replace("\n", " ")
    same = runner.invoke(app(), ["degrade", str(src), "--out", str(src), "-t", "blur"])
    assert same.exit_code == 2 and "overwrite the sources" in (same.stderr or same.output).replace("\n", " ")
    # the guide's deblur block, verbatim (jsonc without comments)
    guide = [{"id": "high-quality-images", "type": "local", "instance_data_dir": "/path/to/sharp-images",
              "resolution": 1024, "caption_strategy": "textfile",
              "conditioning": [{"type": "superresolution", "blur_radius": 3.0, "blur_type": "gaussian",
                                "add_noise": True, "noise_level": 0.02,
                                "captions": ["enhance sharpness", "deblur", "increase clarity", "sharpen image"]}]},
             {"id": "text-embeds", "dataset_type": "text_embeds", "default": True, "type": "local",
              "cache_dir": "cache/text/kontext"}]
    pf = tmp_path / "guide.json"
    pf.write_text(json.dumps(guide))
    ok = runner.invoke(app(), ["degrade", str(src), "--params", str(pf), "--out", str(tmp_path / "o"),
                               "--workers", "1", "--json"])
    assert ok.exit_code == 0, ok.output
    summary = json.loads(ok.stdout)
    assert summary["written"] == 3 and summary["chain"][0]["type"] == "blur"
    assert summary["chain"][0]["params"]["blur_radius"] == 3.0
    assert {p.read_text() for p in (tmp_path / "o").rglob("*.txt")} <= set(guide[0]["conditioning"][0]["captions"])
    two = json.loads(json.dumps(guide))
    two[0]["conditioning"].append({"type": "jpeg_artifacts"})
    pf.write_text(json.dumps(two))
    with pytest.raises(DegradeError, match="separate reference"):
        load_params_file(pf)
    chain_file = tmp_path / "chain.json"
    chain_file.write_text(json.dumps({"chain": [{"type": "blur", "params": {"blur_radius": 1}},
                                                {"type": "jpeg", "params": {"quality": 15}}], "seed": 3}))
    steps, caps, seed = load_params_file(chain_file)
    assert [n for n, _ in steps] == ["blur", "jpeg"] and caps == [] and seed == 3
    human = runner.invoke(app(), ["degrade", str(src), "--params", str(chain_file), "--out", str(tmp_path / "h"),
                                  "--workers", "1", "--quality", "40"])
    assert human.exit_code == 0
    assert "written 3" in (human.stderr or human.output)
    assert {r["chain"][1]["params"]["quality"] for r in read_provenance(tmp_path / "h").values()} == {40}
