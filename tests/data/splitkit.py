"""Builders of composite images and sources for the split stage tests (real PNG/JPEG/Parquet files)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kontext_data.split import SplitConfig

PANEL = 128  # small panels keep the suite fast (auto gutters may be up to 1/8 of a panel)


def panel(seed: int, h: int = PANEL, w: int = PANEL) -> np.ndarray:
    """Busy content (never uniform along a whole line) unique per seed."""
    rng = np.random.default_rng(seed)
    return rng.integers(20, 236, (h, w, 3), dtype=np.uint8)


def composite(panels: list[np.ndarray], cols: int, rows: int, gutter: int = 0, margin: int = 0,
              extra_x: int = 0, extra_y: int = 0, color=(255, 255, 255)) -> np.ndarray:
    h, w = panels[0].shape[:2]
    width = 2 * margin + cols * w + (cols - 1) * gutter + extra_x
    height = 2 * margin + rows * h + (rows - 1) * gutter + extra_y
    image = np.empty((height, width, 3), np.uint8)
    image[:] = color
    for i, p in enumerate(panels):
        r, c = divmod(i, cols)
        y, x = margin + r * (h + gutter), margin + c * (w + gutter)
        image[y:y + h, x:x + w] = p
    return image


def png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    assert ok
    return buf.tobytes()


def read(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def config(src, out, **kw) -> SplitConfig:
    kw.setdefault("workers", 1)
    return SplitConfig(sources=tuple(str(s) for s in ([src] if not isinstance(src, list) else src)),
                       out=Path(out), **kw)


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def photo(seed: int) -> np.ndarray:
    """Photo-like panel (smooth shapes + sensor noise): what JPEG composites really hold."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    smooth = cv2.resize(low, (PANEL, PANEL), interpolation=cv2.INTER_CUBIC)
    return cv2.add(smooth, rng.integers(0, 12, smooth.shape, dtype=np.uint8))


def subjects_table(n: int, start: int = 0, json_descriptions: bool = False) -> tuple[pa.Table, list]:
    panels = [(panel(100 + 2 * i), panel(101 + 2 * i)) for i in range(start, start + n)]
    images = [{"bytes": png(composite(list(p), 2, 1, gutter=16, margin=8)), "path": f"img{i}.png"}
              for i, p in zip(range(start, start + n), panels)]
    desc = [{"item": f"cup {i}", "description_0": f"a cup on a table {i}", "description_1": f"a cup in snow {i}"}
            for i in range(start, start + n)]
    if json_descriptions:
        desc_col = pa.array([json.dumps(d) for d in desc])
    else:
        desc_col = pa.array(desc)
    table = pa.table({
        "image": pa.array(images, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        "description": desc_col,
        "uid": pa.array([f"s/{i:03d}" for i in range(start, start + n)]),
    })
    return table, panels


@pytest.fixture(scope="module")
def parquet_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("pq")
    t1, p1 = subjects_table(5)
    t2, p2 = subjects_table(4, start=5)
    pq.write_table(t1, root / "train-00000-of-00002.parquet", row_group_size=2)
    pq.write_table(t2, root / "train-00001-of-00002.parquet", row_group_size=3)
    return root, p1 + p2


CAPTIONS = (("edit", "description.description_0"), ("reference", "description.description_1"))


@pytest.fixture(scope="module")
def saved_dataset(tmp_path_factory):
    import datasets

    root = tmp_path_factory.mktemp("ds")
    table, panels = subjects_table(4)
    files = []
    for i, img in enumerate(table.column("image").to_pylist()):
        f = root / f"src{i}.png"
        f.write_bytes(img["bytes"])
        files.append(str(f))
    ds = datasets.Dataset.from_dict(
        {"image": files, "description": table.column("description").to_pylist()},
        features=datasets.Features({
            "image": datasets.Image(),
            # a nested struct, as datasets stores Subjects200K's `description`
            "description": {"item": datasets.Value("string"), "description_0": datasets.Value("string"),
                            "description_1": datasets.Value("string")},
        }),
    )
    ds = ds.cast_column("image", datasets.Image())  # embeds bytes on save
    dd = datasets.DatasetDict({"train": ds})
    dd.save_to_disk(str(root / "saved"))
    return root / "saved", panels
