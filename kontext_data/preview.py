"""Contact sheets of the dataset as the trainer sees it: `kontext-data preview`.

In: a manifest and a ``PreviewConfig``. Out: a PNG contact sheet (``.png``), or a static HTML page (``.html``) with
its thumbnails written beside it as small JPEG files in ``<stem>_files/`` and plain-JavaScript paging, that opens
from disk (file://) with no network and stays light for 10,000+ samples (one page of thumbnails loads at a time).

Every pair shows: the original edited image with the recorded crop box drawn on it, each reference and the edited
image after the recorded resize + crop (the trainer's pixels: ``manifest.view_image``; on-demand references are
synthesized), for a row with a loss mask (``pair --masks``) a "mask" panel: the cropped edited image with the masked
region tinted red and the rest darkened (``mask_overlay``), and under them the sample id, bucket, split, similarity
and flags of the content check, and the caption. ``sort="worst"`` shows the lowest `pair_similarity` first (the
column written by `kontext-data check --write-manifest`, or the content check run on the spot when the manifest has
none).

The HTML page records its state in attributes of <body> for scripts and tests: ``data-total`` (samples),
``data-shown`` (pairs on the current page), ``data-page``, ``data-pages``, ``data-errors`` (JavaScript errors
caught by window.onerror, 0 when none), ``data-img-errors`` / ``data-img-loaded`` (thumbnails that failed / loaded);
thumbnails are loaded lazily.

Every file is written atomically (``kontext_data.fileio``): the sheet or page, and the thumbnail folder as a whole.
"""

from __future__ import annotations

import html
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from kontext_data.fileio import atomic_dir, atomic_path, write_text_atomic
from kontext_data.manifest import (Manifest, crop_box, geometry_items, load_mask, read_manifest, view_image,
                                   view_original)

SORTS = ("manifest", "worst", "random")
FORMATS = (".png", ".html")


@dataclass(frozen=True)
class PreviewConfig:
    """Options of `kontext-data preview`."""

    out: Path
    """preview.png (one contact sheet) or preview.html (pages + thumbnails in <stem>_files/)."""
    n: int | None = None
    """Pairs to show: default 24 for PNG, every sample for HTML."""
    sort: str = "manifest"
    """manifest (file order) | worst (lowest pair similarity first) | random (seeded)."""
    seed: int = 0
    """Seed of --sort random."""
    thumb: int = 192
    """Longest side of each picture in pixels (PNG); HTML thumbnails use 256."""
    columns: int = 2
    """Pairs per row of the PNG contact sheet."""
    page_size: int = 48
    """Pairs per page of the HTML preview."""
    workers: int = 0
    """Processes for HTML thumbnails and an on-the-spot content check; 0 = all cores."""

    @property
    def format(self) -> str:
        return Path(self.out).suffix.lower()

    def problems(self) -> list[str]:
        out = []
        if self.format not in FORMATS:
            out.append(f"--out {self.out}: the name must end in .png (contact sheet) or .html (pages), "
                       f"e.g. --out preview.html")
        if self.sort not in SORTS:
            out.append(f"--sort {self.sort!r} is not one of {list(SORTS)}")
        if self.n is not None and self.n < 1:
            out.append(f"--n {self.n}: must be >= 1")
        if not 32 <= self.thumb <= 1024:
            out.append(f"--thumb {self.thumb}: must be between 32 and 1024")
        if self.columns < 1:
            out.append(f"--columns {self.columns}: must be >= 1")
        if self.page_size < 1:
            out.append(f"--page-size {self.page_size}: must be >= 1")
        if self.workers < 0:
            out.append(f"--workers {self.workers}: must be >= 0")
        return out


@dataclass
class PreviewResult:
    out: Path
    shown: int
    total: int
    sort: str
    files: list[Path] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    """Images that could not be read (drawn as grey panels)."""
    checked: bool = False
    """True when the content check ran on the spot (sort worst on a manifest without pair_similarity)."""

    @property
    def ok(self) -> bool:
        return not self.errors

    def report(self) -> dict[str, Any]:
        return {"out": str(self.out), "shown": self.shown, "total": self.total, "sort": self.sort,
                "files": len(self.files), "errors": self.errors, "checked_on_the_spot": self.checked}


# --------------------------------------------------------------------------------------------- selection


def _scores(manifest: Manifest, records: list[dict], config: PreviewConfig,
            on_progress) -> tuple[list, list, list, bool]:
    """(similarity per row, flags per row, reasons per row, whether the check ran now)."""
    from kontext_data.check import CheckConfig, check_records

    sims = manifest.similarities()
    if sims is not None:
        flagged = (manifest.check or {}).get("flagged") or {}
        entries = [flagged.get(r["sample_id"]) or {} for r in records]
        return (sims, [list(e.get("flags", [])) for e in entries], [list(e.get("reasons", [])) for e in entries],
                False)
    if config.sort != "worst":
        return [None] * len(records), [[] for _ in records], [[] for _ in records], False
    res = check_records(records, CheckConfig(workers=config.workers), manifest.path, on_progress)
    return res.similarities(), [s.flags for s in res.samples], [s.reasons for s in res.samples], True


def select(records: list[dict], sims: Sequence[float | None], flags: Sequence[list], config: PreviewConfig) -> list[int]:
    """Row indices to show, in order."""
    n = config.n if config.n is not None else (24 if config.format == ".png" else len(records))
    order = list(range(len(records)))
    if config.sort == "worst":
        order.sort(key=lambda i: (not flags[i], sims[i] is None, sims[i] if sims[i] is not None else 0.0, i))
    elif config.sort == "random":
        import numpy as np

        order = [int(i) for i in np.random.default_rng(config.seed).permutation(len(records))]
    return order[:n]


# --------------------------------------------------------------------------------------------- pictures


def _original_with_box(path: str, rec: dict, max_side: int):
    """The edited image, shrunk to fit max_side, with the recorded crop box drawn on it."""
    from PIL import ImageDraw

    img = view_original(path, max_side)
    left, top, right, bottom = crop_box(img.size, rec)
    box = (left, top, right - 1, bottom - 1)  # the rectangle's last pixels lie inside the crop
    d = ImageDraw.Draw(img)
    lw = max(1, round(max_side / 96))
    d.rectangle(box, outline=(0, 0, 0), width=lw + 2)
    d.rectangle(box, outline=(255, 40, 200), width=lw)
    return img


MASK_TINT = (235, 30, 30)


def mask_overlay(target_path: str, rec: dict, mask_path: str, size: tuple[int, int], exact: bool = False):
    """The edited image after the recorded crop, scaled to `size`, with its loss mask drawn on it: the masked region
    (white in the mask) tinted red, the rest darkened, grays in between. The mask follows the target's geometry
    (``manifest.load_mask``), so this is exactly the region the trainer's loss favours."""
    import numpy as np
    from PIL import Image

    img = view_image(target_path, rec, None, size, exact=exact)
    m = Image.fromarray(np.round(load_mask(mask_path, rec) * 255).astype(np.uint8), "L")
    if m.size != img.size:
        m = m.resize(img.size, Image.Resampling.BOX)
    a = np.asarray(m, dtype=np.float32)[..., None] / 255.0
    x = np.asarray(img, dtype=np.float32)
    inside = 0.55 * x + 0.45 * np.asarray(MASK_TINT, dtype=np.float32)
    out = a * inside + (1.0 - a) * (0.35 * x)
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8), "RGB")


def _fit(geom: dict, max_side: int) -> tuple[int, int]:
    bw, bh = int(geom["bucket_width"]), int(geom["bucket_height"])
    s = max_side / max(bw, bh)
    return max(1, round(bw * s)), max(1, round(bh * s))


def render_pair(rec: dict, max_side: int, exact: bool) -> tuple[list, list[str]]:
    """[original with crop box, reference 1..k, edited, + the mask overlay for a row with a mask] as PIL images
    (None where unreadable) + error messages."""
    images: list = []
    errors: list[str] = []

    def attempt(fn, what):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - a broken file becomes a grey panel, never a crash
            errors.append(f"{rec['sample_id']}: cannot read {what}: {type(exc).__name__}: {exc}")
            return None

    images.append(attempt(lambda: _original_with_box(rec["target_path"], rec, max_side), rec["target_path"]))
    for path, geom, deg in zip(rec["reference_paths"], rec["reference_geometry"], rec["reference_degradations"]):
        images.append(attempt(lambda: view_image(path, geom, deg, _fit(geom, max_side), exact=exact), path))
    images.append(attempt(lambda: view_image(rec["target_path"], rec, None, _fit(rec, max_side), exact=exact),
                          rec["target_path"]))
    if rec.get("mask_path"):
        images.append(attempt(lambda: mask_overlay(rec["target_path"], rec, rec["mask_path"], _fit(rec, max_side),
                                                   exact=exact), rec["mask_path"]))
    return images, errors


def _caption_lines(text: str, font, width: int, max_lines: int, draw) -> list[str]:
    words = (text or "(no caption)").split()
    lines: list[str] = []
    cur = ""
    for w in words:
        trial = f"{cur} {w}".strip()
        if draw.textlength(trial, font=font) <= width or not cur:
            cur = trial
        else:
            lines.append(cur)
            cur = w
            if len(lines) == max_lines:
                break
    if len(lines) < max_lines and cur:
        lines.append(cur)
    elif cur and len(lines) == max_lines:
        while lines[-1] and draw.textlength(lines[-1] + " ...", font=font) > width:
            lines[-1] = lines[-1][:-1]
        lines[-1] += " ..."
    return lines


def _status(rec: dict, sim, flags) -> str:
    parts = [f"bucket {rec['bucket_width']}x{rec['bucket_height']}", rec["split"]]
    if rec.get("mask_path"):
        parts.append("masked loss")
    if sim is not None:
        parts.append(f"similarity {sim:.2f}")
    if flags:
        parts.append(" ".join(f.upper() for f in flags))
    return "  |  ".join(parts)


def contact_sheet(records: list[dict], rows: list[int], sims, flags, config: PreviewConfig,
                  on_progress: Callable[[int, int], None] | None = None):
    """The PNG contact sheet (a PIL image) and the read errors."""
    from PIL import Image, ImageDraw, ImageFont

    t = config.thumb
    pad, gap = 10, 6
    font = ImageFont.load_default(size=max(11, t // 14))
    small = ImageFont.load_default(size=max(10, t // 16))
    fh = max(11, t // 14) + 4
    max_refs = max([len(records[i]["reference_paths"]) for i in rows] or [1])
    any_mask = any(records[i].get("mask_path") for i in rows)
    panels = max_refs + 2 + int(any_mask)
    cell_w = panels * t + (panels - 1) * gap
    cell_h = fh + t + 5 * fh + pad
    cols = max(1, min(config.columns, len(rows)))
    nrows = max(1, -(-len(rows) // cols))
    sheet = Image.new("RGB", (pad + cols * (cell_w + 2 * pad), pad + nrows * (cell_h + pad)), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    errors: list[str] = []
    for k, i in enumerate(rows):
        rec = records[i]
        images, errs = render_pair(rec, t, exact=True)
        errors.extend(errs)
        x0 = pad + (k % cols) * (cell_w + 2 * pad)
        y0 = pad + (k // cols) * (cell_h + pad)
        nref = len(rec["reference_paths"])
        names = ["original + crop"] + [f"reference {j + 1}" if nref > 1 else "reference" for j in range(nref)] + ["edited"]
        # the edited image in the column after the most references of the sheet, its mask overlay after it
        columns = list(range(nref + 1)) + [max_refs + 1]
        if rec.get("mask_path"):
            names.append("mask")
            columns.append(max_refs + 2)
        bg = (255, 235, 235) if flags[i] else (244, 244, 244)
        d.rectangle((x0 - pad // 2, y0 - pad // 2, x0 + cell_w + pad // 2, y0 + cell_h - pad // 2), fill=bg)
        for img, name, col in zip(images, names, columns):
            px = x0 + col * (t + gap)
            d.text((px, y0), name, fill=(90, 90, 90), font=small)
            py = y0 + fh
            if img is None:
                d.rectangle((px, py, px + t - 1, py + t - 1), fill=(150, 150, 150))
                d.text((px + 8, py + t // 2 - 8), "unreadable", fill="white", font=font)
                continue
            sheet.paste(img, (px + (t - img.width) // 2, py + (t - img.height) // 2))
        ty = y0 + fh + t + 4
        d.text((x0, ty), rec["sample_id"], fill="black", font=font)
        d.text((x0, ty + fh), _status(rec, sims[i], flags[i]), fill=(200, 0, 0) if flags[i] else (60, 60, 60), font=small)
        for li, line in enumerate(_caption_lines(rec["caption"] or "", font, cell_w, 3, d)):
            d.text((x0, ty + (2 + li) * fh), line, fill=(20, 20, 120), font=font)
        if on_progress:
            on_progress(k + 1, len(rows))
    return sheet, errors


# --------------------------------------------------------------------------------------------- HTML


@dataclass(frozen=True)
class ThumbJob:
    """One thumbnail: `kind` "original" (with the crop box) or "view" (after the recorded crop), written as name."""

    name: str
    kind: str
    path: str
    geometry: tuple[tuple[str, int], ...]
    degradation: str | None
    mask: str = ""
    """kind "mask": the loss mask drawn over `path` (the edited image)."""


@dataclass(frozen=True)
class ThumbWorker:
    """Picklable pool worker: writes the JPEG thumbnails of a chunk of ThumbJobs into `folder`.
    Never raises: an unreadable image comes back as (name, error message)."""

    folder: str
    max_side: int = 256
    quality: int = 82

    def __call__(self, chunk: Sequence[ThumbJob]) -> list[tuple[str, str | None]]:
        try:
            import cv2

            cv2.setNumThreads(1)
        except Exception:  # noqa: BLE001
            pass
        out = []
        for job in chunk:
            try:
                geom = dict(job.geometry)
                if job.kind == "original":
                    img = _original_with_box(job.path, geom, self.max_side)
                elif job.kind == "mask":
                    img = mask_overlay(job.path, geom, job.mask, _fit(geom, self.max_side))
                else:
                    img = view_image(job.path, geom, job.degradation, _fit(geom, self.max_side))
                img.save(os.path.join(self.folder, job.name), format="JPEG", quality=self.quality, optimize=False)
                out.append((job.name, None))
            except Exception as exc:  # noqa: BLE001 - never raise across the process boundary
                out.append((job.name, f"cannot read {job.path}: {type(exc).__name__}: {exc}"))
        return out


def _job(kind: str, path: str, geometry: dict, degradation: str | None, max_side: int, mask: str = "") -> ThumbJob:
    """A job named by its content: the file's path, size and mtime, the geometry and degradation (and the mask's path,
    size and mtime). Samples that share a file and geometry share the thumbnail, and a later run reuses every
    thumbnail whose file did not change."""
    import xxhash

    geom = geometry_items(geometry)

    def ident(p: str) -> str:
        try:
            st = os.stat(p)
            return f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            return "missing"

    parts = [kind, path, ident(path), geom, degradation, max_side]
    if mask:
        parts += [mask, ident(mask)]
    key = xxhash.xxh3_64_hexdigest(json.dumps(parts).encode())
    return ThumbJob(f"{key}.jpg", kind, path, geom, degradation, mask)


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
body{font-family:system-ui,sans-serif;margin:0;background:#fafafa;color:#222}
header{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;padding:8px 14px;z-index:2}
header h1{font-size:17px;margin:0 0 6px 0}
nav{display:flex;gap:8px;align-items:center;flex-wrap:wrap;font-size:14px}
#grid{display:flex;flex-wrap:wrap;gap:12px;padding:12px}
.pair{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;margin:0}
.pair.flagged{border-color:#d33;background:#fff4f4}
.imgs{display:flex;gap:6px;align-items:flex-start}
.panel{display:flex;flex-direction:column;font-size:11px;color:#777}
.panel img{max-width:200px;max-height:200px;background:#eee}
.panel .bad{width:128px;height:128px;background:#999;color:#fff;display:flex;align-items:center;justify-content:center}
figcaption{font-size:13px;margin-top:4px;max-width:620px}
.sid{font-family:monospace}.st{color:#555}.flag{color:#c00;font-weight:bold}.why{color:#b00}.cap{color:#124}
</style></head>
<body data-errors="0" data-img-errors="0" data-img-loaded="0" data-shown="0" data-total="__TOTAL__" data-page="0" data-pages="0">
<header><h1>__TITLE__</h1>
<nav><button id="prev">&larr; prev</button><span id="where"></span><button id="next">next &rarr;</button>
<label>page <input id="pageno" type="number" min="1" style="width:5em"></label>
<label>filter <input id="q" type="search" placeholder="caption, id, flag"></label>
<label><input id="onlyflagged" type="checkbox"> flagged only</label></nav></header>
<main id="grid"></main>
<script id="preview-data" type="application/json">__DATA__</script>
<script>
(function(){
  var body=document.body, errors=0, imgErrors=0, imgLoaded=0;
  function fail(msg){errors+=1;body.setAttribute("data-errors",String(errors));
    var p=document.createElement("pre");p.className="js-error";p.textContent=String(msg);document.body.appendChild(p);}
  window.onerror=function(m,src,line){fail(m+" ("+line+")");return false;};
  try{
    var D=JSON.parse(document.getElementById("preview-data").textContent);
    var all=D.items, items=all, size=D.page_size, page=0;
    function pages(){return Math.max(1,Math.ceil(items.length/size));}
    function el(tag,cls,text){var e=document.createElement(tag);if(cls)e.className=cls;if(text!=null)e.textContent=text;return e;}
    function render(){
      var grid=document.getElementById("grid");grid.textContent="";
      page=Math.min(Math.max(page,0),pages()-1);
      var slice=items.slice(page*size,(page+1)*size);
      slice.forEach(function(it){
        var f=el("figure","pair"+(it.flags.length?" flagged":""));f.setAttribute("data-id",it.id);
        var row=el("div","imgs");
        it.panels.forEach(function(p){
          var c=el("div","panel");c.appendChild(el("span",null,p.name));
          if(p.src){var im=document.createElement("img");im.loading="lazy";im.alt=p.name;
            im.onerror=function(){imgErrors+=1;body.setAttribute("data-img-errors",String(imgErrors));};
            im.onload=function(){imgLoaded+=1;body.setAttribute("data-img-loaded",String(imgLoaded));};
            im.src=D.folder+"/"+p.src;c.appendChild(im);}
          else{c.appendChild(el("div","bad","unreadable"));}
          row.appendChild(c);});
        f.appendChild(row);
        var cap=el("figcaption");
        cap.appendChild(el("div","sid",it.id));
        var st=el("div","st",it.status);if(it.flags.length){st.appendChild(el("span","flag","  "+it.flags.join(" ").toUpperCase()));}
        cap.appendChild(st);
        it.reasons.forEach(function(r){cap.appendChild(el("div","why",r));});
        cap.appendChild(el("div","cap",it.caption||"(no caption)"));
        f.appendChild(cap);grid.appendChild(f);});
      document.getElementById("where").textContent="page "+(page+1)+" of "+pages()+" \\u2014 "+items.length+" of "+all.length+" pairs";
      document.getElementById("pageno").value=page+1;
      body.setAttribute("data-shown",String(slice.length));body.setAttribute("data-page",String(page+1));
      body.setAttribute("data-pages",String(pages()));
      if(location.hash!=="#page="+(page+1)){history.replaceState(null,"","#page="+(page+1));}
      window.scrollTo(0,0);
    }
    function filter(){
      var q=document.getElementById("q").value.toLowerCase(), only=document.getElementById("onlyflagged").checked;
      items=all.filter(function(it){
        if(only&&!it.flags.length)return false;
        if(!q)return true;
        return (it.id+" "+(it.caption||"")+" "+it.flags.join(" ")+" "+it.status).toLowerCase().indexOf(q)>=0;});
      page=0;render();
    }
    var m=/page=(\\d+)/.exec(location.hash);if(m){page=parseInt(m[1],10)-1;}
    document.getElementById("prev").onclick=function(){page-=1;render();};
    document.getElementById("next").onclick=function(){page+=1;render();};
    document.getElementById("pageno").onchange=function(e){page=parseInt(e.target.value,10)-1;render();};
    document.getElementById("q").oninput=filter;
    document.getElementById("onlyflagged").onchange=filter;
    document.addEventListener("keydown",function(e){if(e.target.tagName==="INPUT")return;
      if(e.key==="ArrowRight"){page+=1;render();}if(e.key==="ArrowLeft"){page-=1;render();}});
    render();
  }catch(e){fail(e&&e.stack?e.stack:e);}
})();
</script>
</body></html>
"""


def _html_items(records, rows, max_side: int) -> tuple[list, dict[str, ThumbJob]]:
    """(record, row, [(panel label, job)]) per shown row, and every thumbnail job by name (shared ones once)."""
    items, jobs = [], {}
    for i in rows:
        rec = records[i]
        nref = len(rec["reference_paths"])
        panels = [("original + crop", _job("original", rec["target_path"], rec, None, max_side))]
        for j, (path, geom, deg) in enumerate(zip(rec["reference_paths"], rec["reference_geometry"],
                                                  rec["reference_degradations"])):
            panels.append((f"reference {j + 1}" if nref > 1 else "reference", _job("view", path, geom, deg, max_side)))
        panels.append(("edited", _job("view", rec["target_path"], rec, None, max_side)))
        if rec.get("mask_path"):
            panels.append(("mask", _job("mask", rec["target_path"], rec, None, max_side, mask=rec["mask_path"])))
        for _, job in panels:
            jobs[job.name] = job
        items.append((rec, i, panels))
    return items, jobs


def _page_text(items, failed: dict[str, str], sims, flags, reasons, config: PreviewConfig, folder_name: str,
               title: str) -> tuple[str, list[str]]:
    """The HTML page (its data inline as JSON) and the read errors of its thumbnails."""
    from urllib.parse import quote

    errors: list[str] = []
    data_items = []
    for rec, i, panels in items:
        errors.extend(f"{rec['sample_id']}: {failed[job.name]}" for _, job in panels if job.name in failed)
        data_items.append({"id": rec["sample_id"], "caption": rec["caption"], "status": _status(rec, sims[i], []),
                           "flags": list(flags[i]), "reasons": list(reasons[i]),
                           "panels": [{"name": label, "src": None if job.name in failed else job.name}
                                      for label, job in panels]})
    data = {"folder": quote(folder_name), "page_size": config.page_size, "items": data_items}
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")
    page = (_PAGE.replace("__TITLE__", html.escape(title)).replace("__TOTAL__", str(len(data_items)))
            .replace("__DATA__", text))
    return page, errors


def html_page(records, rows, sims, flags, reasons, config: PreviewConfig, title: str,
              on_progress=None) -> tuple[list[Path], list[str]]:
    """Write the HTML page and its thumbnail folder; return the files written and the read errors.

    The folder is rebuilt as a whole (`fileio.atomic_dir`; a thumbnail whose file, geometry and degradation did not
    change is copied from the previous run), then the page is written: its links are valid from then on.
    """
    from kontext_data.check import POOL_MIN_SAMPLES
    from kontext_data.workers import chunked, map_chunks, resolve_workers

    out = Path(config.out)
    folder_name = f"{out.stem}_files"
    final = out.parent / folder_name
    max_side = 256
    items, jobs = _html_items(records, rows, max_side)
    with atomic_dir(final) as tmp_dir:
        todo = []
        for name, job in jobs.items():
            old = final / name
            if old.is_file():  # unchanged file, same geometry: reuse the thumbnail of the previous run
                shutil.copyfile(old, tmp_dir / name)
            else:
                todo.append(job)
        workers = resolve_workers(config.workers, len(todo), pool_min_items=POOL_MIN_SAMPLES)
        chunks = chunked(todo, 16 if workers > 1 else 64)
        done = len(jobs) - len(todo)
        failed: dict[str, str] = {}

        def tick(n: int) -> None:
            nonlocal done
            done += n
            if on_progress:
                on_progress(done, len(jobs))

        if on_progress:
            on_progress(done, len(jobs))
        for name, error in map_chunks(ThumbWorker(str(tmp_dir), max_side), chunks, workers, tick, opencv=True):
            if error:
                failed[name] = error
    page, errors = _page_text(items, failed, sims, flags, reasons, config, folder_name, title)
    write_text_atomic(out, page)
    files = [out] + sorted(final.iterdir())
    return files, errors


def make_preview(manifest_path: Path | str, config: PreviewConfig,
                 on_progress: Callable[[int, int], None] | None = None) -> PreviewResult:
    """Read a manifest (raises ManifestError) and write the PNG sheet or HTML pages of `config.out`."""
    m = read_manifest(manifest_path)
    records = m.records()
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sims, flags, reasons, checked = _scores(m, records, config, on_progress)
    rows = select(records, sims, flags, config)
    if not rows:
        return PreviewResult(out=out, shown=0, total=len(records), sort=config.sort, checked=checked,
                             errors=[f"{m.path}: no samples to show"])
    if config.format == ".png":
        sheet, errors = contact_sheet(records, rows, sims, flags, config, on_progress)
        with atomic_path(out) as tmp:
            sheet.save(tmp, format="PNG")
        files = [out]
    else:
        title = f"{m.path.name}: {len(rows)} of {len(records)} pairs" + (", worst first" if config.sort == "worst" else "")
        files, errors = html_page(records, rows, sims, flags, reasons, config, title, on_progress)
    return PreviewResult(out=out, shown=len(rows), total=len(records), sort=config.sort, files=files, errors=errors,
                         checked=checked)
