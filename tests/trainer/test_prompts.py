"""Validation prompts (`validation_prompts`): every problem of the JSONL file listed at start-up, naming its line,
before any model loads; relative image paths; the prompts rendered beside the eval strips at every validation,
their captions cached with the others."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image
from typer.testing import CliRunner

from kontext_trainer.cli import app
from kontext_trainer.prompts import read_validation_prompts, reference_geometry
from kontext_trainer.recipe import KontextLoRARecipe, TrainError
from conftest import tiny_cpu_config


def _prompts_file(folder, lines):
    refs = folder / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (80, 60), (200, 40, 40)).save(refs / "red.png")
    (refs / "broken.png").write_bytes(b"not an image at all")
    path = folder / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = ['{"image": "refs/red.png", "prompt": "make it blue", "size": "64x48"}',
        '',
        '{"images": ["refs/red.png", "refs/red.png"], "prompt": "add a hat", "seed": 5}']
BAD = ['{"image": "refs/red.png", "prompt": "fine"}',
       '{"image": "refs/red.png", "prompt": ',
       '{"image": "refs/red.png"}',
       '{"image": "refs/missing.png", "prompt": "x"}',
       '{"image": "refs/broken.png", "prompt": "x"}',
       '{"image": "refs/red.png", "prompt": "x", "width": 100, "height": 64}',
       '{"image": "refs/red.png", "prompt": "x", "sede": 1}']


def test_prompts_with_relative_paths(tmp_path):
    path = _prompts_file(tmp_path / "val", GOOD)
    prompts, problems = read_validation_prompts(path)
    assert problems == []
    assert [p.line for p in prompts] == [1, 3]
    red = str((tmp_path / "val" / "refs" / "red.png").resolve())
    assert prompts[0].images == (red,) and prompts[0].size == (64, 48) and prompts[0].seed is None
    assert prompts[1].images == (red, red) and prompts[1].size is None and prompts[1].seed == 5
    assert [p.name for p in prompts] == ["prompt-01-make_it_blue", "prompt-02-add_a_hat"]
    assert prompts[0].image_sizes == ((80, 60),)
    g = reference_geometry((80, 60), 64 * 64)  # its aspect at the training buckets' area, multiples of 16
    assert (g["bucket_width"], g["bucket_height"]) == (64, 48)


def test_every_problem_is_listed_with_its_line(tmp_path):
    path = _prompts_file(tmp_path, BAD)
    prompts, problems = read_validation_prompts(path)
    assert [p.line for p in prompts] == [1]
    assert len(problems) == 6, problems
    for line, needle in ((2, "not valid JSON"), (3, 'no "prompt"'), (4, "image not found"),
                         (5, "cannot read image"), (6, "size 100x64 must be positive multiples of 16"),
                         (7, "unknown key(s) 'sede'")):
        assert any(p.startswith(f"{path} line {line}: ") and needle in p for p in problems), (line, problems)
    assert read_validation_prompts(tmp_path / "nope.jsonl")[1] == [f"{tmp_path / 'nope.jsonl'}: no such file "
                                                                   "(validation_prompts)"]


def _cfg(manifest, model, out, **kw):
    return tiny_cpu_config(manifest, model, out, **{"max_train_steps": 2, **kw})


def test_problems_stop_the_run_at_start_up_with_exit_1(sample_manifest, tmp_path):
    path = _prompts_file(tmp_path, BAD)
    cfg = _cfg(sample_manifest, tmp_path / "no-such-model", tmp_path / "out", validation_prompts=str(path))
    with pytest.raises(TrainError) as exc:
        KontextLoRARecipe(cfg).setup()
    assert len(exc.value.problems) == 6 and exc.value.title == f"validation_prompts {path}"
    assert "no-such-model" not in str(exc.value)  # the model was never looked at
    result = CliRunner().invoke(app, ["train", str(sample_manifest), "--model", str(tmp_path / "no-such-model"),
                                      "-o", str(tmp_path / "o"), "--validation-prompts", str(path), "--quiet"])
    assert result.exit_code == 1
    assert "line 2" in result.output and "line 7" in result.output


def test_prompts_render_at_every_validation_and_their_captions_are_cached(sample_manifest, tiny_model, tmp_path):
    folder = tmp_path / "elsewhere"
    path = _prompts_file(folder, GOOD)
    shutil.copy(path, tmp_path / "copy.jsonl")  # a copy outside its folder: its relative paths no longer resolve
    assert read_validation_prompts(tmp_path / "copy.jsonl")[1]
    out = tmp_path / "out"
    events = []
    recipe = KontextLoRARecipe(_cfg(sample_manifest, tiny_model, out, validation_steps=1, skip_final_validation=False,
                                    validation_prompts=str(path), report_to="tensorboard"),
                               on_event=lambda k, d: events.append((k, d)))
    recipe.setup()
    assert {"make it blue", "add a hat"} <= set(recipe.keys.text)  # encoded with the other captions
    assert any("2 validation prompt(s)" in d.get("message", "") for k, d in events if k == "stage")
    result = recipe.train()
    assert [p.name for p in result.validation_dirs] == ["step_000001", "step_000002"]
    for step_dir in result.validation_dirs:
        strips = {p.name: p for p in step_dir.glob("prompt-*.png")}
        assert sorted(strips) == ["prompt-01-make_it_blue.png", "prompt-02-add_a_hat.png"]
        with Image.open(strips["prompt-01-make_it_blue.png"]) as im:
            assert im.width > 2 * 64  # reference | output (64x48)
        with Image.open(strips["prompt-02-add_a_hat.png"]) as im:
            assert im.width > 3 * 64  # both references | output
        assert len(list(step_dir.glob("*.png"))) == 4  # beside the two eval strips
    files = [f for k, d in events if k == "validation" for f in d["files"]]
    assert sum("prompt-01-make_it_blue.png" in f for f in files) == 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "logs"))
    acc.Reload()
    assert "validation/prompt-01-make_it_blue" in acc.Tags()["images"]
    assert json.loads((out / "config.resolved.json").read_text())["validation_prompts"] == str(path)
