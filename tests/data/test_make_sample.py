"""examples/make_sample.py: the embedded synthetic edit dataset used by the demo, tests and benchmarks."""

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ms():
    spec = importlib.util.spec_from_file_location("make_sample", ROOT / "examples" / "make_sample.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _images(folder: Path, ext: str) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob(f"*{ext}"))


def test_same_seed_gives_identical_bytes_and_other_seed_differs(ms, tmp_path):
    ms.make_sample(tmp_path / "a", n=24, seed=7)
    ms.make_sample(tmp_path / "b", n=24, seed=7)
    ms.make_sample(tmp_path / "c", n=24, seed=8)
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert len(a) == 24 * 3  # edited image + caption + reference image per pair
    assert a == b
    assert a.keys() == c.keys()
    assert sum(a[k] != c[k] for k in a) > len(a) // 2


def test_edited_and_reference_have_the_same_relative_names(ms, tmp_path):
    counts = ms.make_sample(tmp_path, n=32, size=128, seed=0)
    edited = _images(tmp_path / "edited", ".png")
    reference = _images(tmp_path / "reference", ".png")
    assert edited == reference
    assert len(edited) == counts["pairs"] == 32
    # a few live in a subfolder (recursion), some are non-square (bucketing)
    assert sum("/" in r for r in edited) == counts["subfolder"] >= 1
    sizes = {Image.open(tmp_path / "edited" / r).size for r in edited}
    assert {(128, 128), (128, 96), (96, 128)} <= sizes
    # no leftovers from the atomic writes, nothing but images and captions
    assert {p.suffix for p in tmp_path.rglob("*") if p.is_file()} == {".png", ".txt"}


def test_every_edited_image_has_a_non_empty_instruction_caption(ms, tmp_path):
    ms.make_sample(tmp_path, n=32, seed=3)
    edited = tmp_path / "edited"
    for rel in _images(edited, ".png"):
        caption = (edited / rel).with_suffix(".txt")
        assert caption.is_file(), rel
        text = caption.read_text(encoding="utf-8").strip()
        assert re.fullmatch(r"(make the \w+ \w+ \w+|move the \w+ \w+ (to the left|to the right|up|down)|remove the \w+ \w+)", text), text
    assert not list((tmp_path / "reference").rglob("*.txt"))


def _color_pixels(img: Image.Image, rgb) -> np.ndarray:
    return np.all(np.asarray(img.convert("RGB")) == np.asarray(rgb, dtype=np.uint8), axis=-1)


def test_reference_differs_from_edited_as_the_instruction_says(ms, tmp_path):
    ms.make_sample(tmp_path, n=32, seed=0)
    kinds = set()
    for rel in _images(tmp_path / "edited", ".png"):
        ref = Image.open(tmp_path / "reference" / rel)
        edit = Image.open(tmp_path / "edited" / rel)
        assert ref.size == edit.size, rel
        assert not np.array_equal(np.asarray(ref), np.asarray(edit)), rel
        words = (tmp_path / "edited" / rel).with_suffix(".txt").read_text().split()
        kinds.add(words[0])
        before = _color_pixels(ref, ms.COLORS[words[2]])
        after = _color_pixels(edit, ms.COLORS[words[2]])
        assert before.sum() > 0, rel  # the named object is in the reference
        if words[0] in ("make", "remove"):  # the named colour loses the object's pixels
            assert after.sum() < before.sum(), rel
        if words[0] == "make":
            new = ms.COLORS[words[4]]
            assert _color_pixels(edit, new).sum() > _color_pixels(ref, new).sum(), rel
        if words[0] == "move":  # same object, other place
            assert after.sum() == before.sum() and not np.array_equal(before, after), rel
            ys, xs = np.nonzero(after & ~before)
            ys0, xs0 = np.nonzero(before & ~after)
            dx, dy = xs.mean() - xs0.mean(), ys.mean() - ys0.mean()
            direction = " ".join(words[4:])
            expected = {"to the left": dx < 0, "to the right": dx > 0, "up": dy < 0, "down": dy > 0}
            assert expected[direction], (rel, direction, dx, dy)
    assert kinds == {"make", "move", "remove"}


def test_jpeg_option_writes_deterministic_jpegs(ms, tmp_path):
    ms.make_sample(tmp_path / "a", n=8, jpeg=True)
    ms.make_sample(tmp_path / "b", n=8, jpeg=True)
    a = _files(tmp_path / "a")
    assert a == _files(tmp_path / "b")
    jpgs = [k for k in a if k.endswith(".jpg")]
    assert len(jpgs) == 16 and not any(k.endswith(".png") for k in a)
    for k in jpgs:
        assert a[k][:2] == b"\xff\xd8" and a[k][-2:] == b"\xff\xd9"
        assert Image.open(tmp_path / "a" / k).format == "JPEG"


def test_cli_writes_the_dataset_and_rejects_bad_arguments(ms, tmp_path, capsys):
    assert ms.main([str(tmp_path / "out"), "--n", "5", "--size", "64", "--seed", "1"]) == 0
    assert "wrote 5 pairs" in capsys.readouterr().out
    assert len(_images(tmp_path / "out" / "edited", ".png")) == 5
    for bad in (["--n", "0"], ["--size", "8"], ["--seed", "-1"]):
        with pytest.raises(SystemExit) as exc:
            ms.main([str(tmp_path / "bad"), *bad])
        assert exc.value.code == 2
        assert bad[0] in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="size"):
        ms.make_sample(tmp_path / "bad", size=10)


def test_aspects_fill_as_many_buckets_of_about_the_same_area(ms, tmp_path):
    """--aspects N: Kontext's preferred resolutions in turn (the whole-run benchmark's multi-bucket dataset), and
    `kontext-data pair` puts them in N buckets."""
    import subprocess
    import sys

    import pyarrow.parquet as pq

    counts = ms.make_sample(tmp_path / "d", n=12, size=256, aspects=6)
    assert counts["pairs"] == 12
    sizes = {Image.open(p).size for p in (tmp_path / "d" / "edited").rglob("*.png")}
    assert len(sizes) == 6 and all(abs(w * h / 256 ** 2 - 1) < 0.1 for w, h in sizes)
    assert ms.make_sample(tmp_path / "e", n=12, size=256, aspects=6) and \
        _files(tmp_path / "d") == _files(tmp_path / "e")
    out = tmp_path / "m.parquet"
    proc = subprocess.run([sys.executable, "-c", "from kontext_data.cli import main; main()", "pair",
                           str(tmp_path / "d" / "edited"), str(tmp_path / "d" / "reference"), "--out", str(out),
                           "--resolution", "256"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = pq.read_table(out, columns=["bucket_width", "bucket_height"]).to_pylist()
    assert len({(r["bucket_width"], r["bucket_height"]) for r in rows}) == 6
    with pytest.raises(ValueError, match="aspects"):
        ms.make_sample(tmp_path / "bad", aspects=18)
