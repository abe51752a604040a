"""kontext_data.preview and `kontext-data preview`: PNG contact sheets and the static HTML pages, the latter loaded in
a real headless Chromium (/usr/bin/chromium, installed by tests/browser.sh)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kontext_data.manifest import read_manifest, write_manifest
from kontext_data.preview import PreviewConfig, make_preview
from test_check import make_sample_module, pair_dir, run_cli, sample_manifest, shuffle_references

CHROMIUM = Path("/usr/bin/chromium")


def browser_dom(page: Path, fragment: str, tmp_path: Path) -> str:
    """The DOM of `page` after its scripts ran, from headless Chromium."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: the HTML preview must be tested in a real browser. "
                    "Install it with `sh tests/browser.sh` (apt-get install -y chromium).")
    profile = tmp_path / f"chromium-profile-{fragment.strip('#=')}"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
           f"--user-data-dir={profile}", "--virtual-time-budget=3000", "--dump-dom", page.as_uri() + fragment]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "<body" in r.stdout, f"chromium failed ({r.returncode}): {r.stderr[-2000:]}"
    return r.stdout


def body_attrs(dom: str) -> dict[str, str]:
    tag = re.search(r"<body([^>]*)>", dom).group(1)
    return dict(re.findall(r'(data-[a-z-]+)="([^"]*)"', tag))


def test_png_contact_sheet_shows_pairs_with_crop_box_and_is_deterministic(tmp_path):
    manifest = sample_manifest(tmp_path, n=12)
    cfg = PreviewConfig(out=tmp_path / "sheet.png", n=6, columns=2, thumb=96)
    res = make_preview(manifest, cfg)
    assert res.ok and res.shown == 6 and res.total == 12
    with Image.open(tmp_path / "sheet.png") as im:
        arr = np.asarray(im.convert("RGB"))
    # 2 columns x 3 rows of cells, each 3 panels of 96 px wide
    assert arr.shape[1] >= 2 * 3 * 96 and arr.shape[0] >= 3 * 96
    magenta = (arr[..., 0] > 230) & (arr[..., 1] < 60) & (arr[..., 2] > 180)
    assert magenta.sum() > 6 * 4 * 40  # a crop box drawn around each of the 6 originals
    first = (tmp_path / "sheet.png").read_bytes()
    make_preview(manifest, cfg)
    assert (tmp_path / "sheet.png").read_bytes() == first
    # the edited panel of the first pair is the trainer's image (load_image), scaled into its 96 px box
    rec = read_manifest(manifest).records()[0]
    from kontext_data.manifest import load_image

    s = 96 / max(rec["bucket_width"], rec["bucket_height"])
    w, h = round(rec["bucket_width"] * s), round(rec["bucket_height"] * s)
    want = np.asarray(load_image(rec["target_path"], rec).resize((w, h), Image.Resampling.BOX), float)
    found = min(np.abs(arr[y:y + h, x:x + w].astype(float) - want).mean()
                for y in range(0, 60) for x in range(2 * 96, 2 * 96 + 40, 1))
    assert found < 2.0


def test_sort_worst_puts_shuffled_pairs_first(tmp_path):
    ms = make_sample_module()
    n = 40
    ms.make_sample(tmp_path, n=n, seed=2)
    shuffled = shuffle_references(tmp_path, ms, n, 0.05, seed=2)
    manifest = pair_dir(tmp_path)
    res = make_preview(manifest, PreviewConfig(out=tmp_path / "p.html", sort="worst", workers=1))
    assert res.checked and res.shown == n
    page = (tmp_path / "p.html").read_text()
    data = json.loads(re.search(r'<script id="preview-data" type="application/json">(.*?)</script>', page, re.S)
                      .group(1).replace("<\\/", "</"))
    first = [it["id"] for it in data["items"][:len(shuffled)]]
    assert set(first) == shuffled
    assert all("unrelated" in it["flags"] and "mis-paired" in it["reasons"][0] for it in data["items"][:len(shuffled)])
    # after `check --in-place`, flags and reasons come from the manifest's kontext.check metadata
    assert run_cli("check", manifest, "--in-place", "-q").exit_code == 1
    res = make_preview(manifest, PreviewConfig(out=tmp_path / "q.html", sort="worst", workers=1))
    assert not res.checked
    page = (tmp_path / "q.html").read_text()
    data2 = json.loads(re.search(r'<script id="preview-data" type="application/json">(.*?)</script>', page, re.S)
                       .group(1).replace("<\\/", "</"))
    assert {it["id"] for it in data2["items"][:len(shuffled)]} == shuffled
    assert data2["items"][0]["reasons"] == data["items"][0]["reasons"]
    r = run_cli("preview", manifest, "--out", tmp_path / "w.png", "--sort", "worst", "--n", "4", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output[r.output.index("{"):])["shown"] == 4


def test_html_pages_load_in_chromium_without_errors(tmp_path):
    manifest = sample_manifest(tmp_path / "data", n=130)
    records = read_manifest(manifest).records()
    Path(records[5]["reference_paths"][0]).write_bytes(b"broken")  # one unreadable image: a grey panel
    out = tmp_path / "site" / "preview.html"
    r = run_cli("preview", manifest, "--out", out, "--page-size", "48", "--workers", "2", "-q")
    assert r.exit_code == 1 and "unreadable" in r.output  # the page is written all the same
    files = sorted((tmp_path / "site" / "preview_files").iterdir())
    assert len(files) == 130 * 3 - 1 and all(f.suffix == ".jpg" for f in files)
    assert sum(f.stat().st_size for f in files) < 130 * 3 * 20_000  # small thumbnails, none inline
    page = out.read_text()
    assert "base64" not in page and "http://" not in page and "https://" not in page
    assert out.stat().st_mode & 0o044 and (out.parent / "preview_files").stat().st_mode & 0o055  # not private
    # the page works from another folder too: only relative links
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "site", moved)
    dom = browser_dom(moved / "preview.html", "#page=3", tmp_path)
    attrs = body_attrs(dom)
    assert attrs["data-errors"] == "0", dom[-3000:]
    assert attrs["data-total"] == "130" and attrs["data-pages"] == "3" and attrs["data-page"] == "3"
    assert attrs["data-shown"] == "34" and len(re.findall(r'<figure class="pair', dom)) == 34
    assert attrs["data-img-errors"] == "0" and int(attrs["data-img-loaded"]) > 0
    assert "<pre class=\"js-error\"" not in dom
    dom1 = browser_dom(moved / "preview.html", "", tmp_path)
    attrs1 = body_attrs(dom1)
    assert attrs1["data-page"] == "1" and attrs1["data-shown"] == "48" and attrs1["data-errors"] == "0"
    assert dom1.count('class="bad"') == 1 and records[5]["sample_id"] in dom1


def test_html_paging_scales_to_10000_samples(tmp_path):
    """10,000 rows (the same two pairs of files) -> one page of 10,000 entries, paged 100 at a time."""
    manifest = sample_manifest(tmp_path / "data", n=2, size=32)
    base = read_manifest(manifest).records()
    rows = []
    for i in range(10_000):
        row = dict(base[i % 2])
        row["sample_id"] = f"big:{i:05d}"
        row["caption"] = f"edit number {i} </script><b>not html</b>"
        rows.append(row)
    write_manifest(rows, tmp_path / "data" / "big.parquet")
    out = tmp_path / "big.html"
    res = make_preview(tmp_path / "data" / "big.parquet", PreviewConfig(out=out, workers=2, page_size=100))
    assert res.ok and res.shown == 10_000
    assert out.stat().st_size < 8_000_000
    dom = browser_dom(out, "#page=100", tmp_path)
    attrs = body_attrs(dom)
    assert attrs["data-errors"] == "0" and attrs["data-pages"] == "100" and attrs["data-shown"] == "100"
    grid = re.search(r'<main id="grid">(.*?)</main>', dom, re.S).group(1)
    assert len(re.findall(r'<figure class="pair', grid)) == 100
    assert "big:09999" in grid and "big:09899" not in grid and "big:09900" in grid
    assert "&lt;/script&gt;&lt;b&gt;not html&lt;/b&gt;" in grid and "<b>not html" not in grid  # text, never markup
    # samples that share a file and geometry share its thumbnail: 2 samples' worth of files, not 30,000
    assert len(list((tmp_path / "big_files").iterdir())) == 6


def test_preview_usage_errors(tmp_path):
    manifest = sample_manifest(tmp_path, n=2)
    assert run_cli("preview", manifest, "--out", tmp_path / "p.jpg").exit_code == 2
    assert run_cli("preview", manifest, "--out", tmp_path / "p.png", "--sort", "best").exit_code == 2
    assert run_cli("preview", tmp_path / "none.parquet", "--out", tmp_path / "p.png").exit_code == 2


def test_sort_random_is_seeded_and_worst_puts_unscored_last():
    from kontext_data.preview import select

    records = [{} for _ in range(50)]
    none = [None] * 50
    flags = [[] for _ in range(50)]
    cfg = lambda **kw: PreviewConfig(out=Path("p.png"), **kw)  # noqa: E731
    a = select(records, none, flags, cfg(sort="random", seed=1, n=10))
    assert a == select(records, none, flags, cfg(sort="random", seed=1, n=10))
    assert a != select(records, none, flags, cfg(sort="random", seed=2, n=10)) and len(set(a)) == 10
    sims = [0.9 - i / 100 for i in range(50)]
    sims[3] = None  # a reference-free sample has no similarity
    flags[40] = ["unrelated"]
    order = select(records, sims, flags, cfg(sort="worst", n=50))
    assert order[0] == 40 and order[1:4] == [49, 48, 47] and order[-1] == 3
    assert select(records, sims, flags, cfg(sort="manifest"))[:3] == [0, 1, 2]


def test_rows_with_a_loss_mask_show_it(tmp_path):
    """pair --masks: a "mask" panel after the edited one, the cropped edited image with the masked region tinted red
    and the rest darkened; in the PNG sheet and in the HTML page, only for rows that have a mask."""
    from kontext_data.preview import MASK_TINT, mask_overlay

    make_sample_module().make_sample(tmp_path, n=4, size=128, seed=0)
    for edited in sorted((tmp_path / "edited").rglob("*.png")):
        rel = edited.relative_to(tmp_path / "edited")
        w, h = Image.open(edited).size
        arr = np.zeros((h, w), np.uint8)
        arr[:, : w // 2] = 255  # the left half is the edited region
        (tmp_path / "masks" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(tmp_path / "masks" / rel)
    manifest = pair_dir(tmp_path, masks=tmp_path / "masks")
    rec = read_manifest(manifest).records()[0]
    size = (96, round(96 * rec["bucket_height"] / rec["bucket_width"]))
    over = np.asarray(mask_overlay(rec["target_path"], rec, rec["mask_path"], size, exact=True), float)
    from kontext_data.manifest import view_image

    plain = np.asarray(view_image(rec["target_path"], rec, None, size, exact=True), float)
    left, right = slice(0, size[0] // 2 - 2), slice(size[0] // 2 + 2, size[0])
    tint = np.asarray(MASK_TINT, float)
    assert np.allclose(over[:, left], 0.55 * plain[:, left] + 0.45 * tint, atol=1.0)  # tinted inside
    assert np.allclose(over[:, right], 0.35 * plain[:, right], atol=1.0)  # darkened outside
    # PNG: one column more than the pairs without masks, holding that overlay
    res = make_preview(manifest, PreviewConfig(out=tmp_path / "sheet.png", n=1, columns=1, thumb=96))
    assert res.ok
    with Image.open(tmp_path / "sheet.png") as im:
        sheet = np.asarray(im.convert("RGB"), float)
    assert sheet.shape[1] >= 4 * 96
    found = min(np.abs(sheet[y:y + size[1], x:x + size[0]] - over).mean()
                for y in range(0, 60) for x in range(3 * 96, sheet.shape[1] - size[0] + 1))
    assert found < 2.0
    # HTML: the mask panel and its thumbnail; a manifest without masks has none
    res = make_preview(manifest, PreviewConfig(out=tmp_path / "p.html", workers=1))
    data = json.loads(re.search(r'<script id="preview-data" type="application/json">(.*?)</script>',
                                (tmp_path / "p.html").read_text(), re.S).group(1).replace("<\\/", "</"))
    for item in data["items"]:
        assert [p["name"] for p in item["panels"]] == ["original + crop", "reference", "edited", "mask"]
        assert (tmp_path / "p_files" / item["panels"][-1]["src"]).is_file() and "masked loss" in item["status"]
    plain_manifest = pair_dir(tmp_path, out="plain.parquet")
    make_preview(plain_manifest, PreviewConfig(out=tmp_path / "q.html", workers=1))
    assert '"name":"mask"' not in (tmp_path / "q.html").read_text()
