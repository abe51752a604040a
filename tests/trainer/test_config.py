"""Config files (JSON with comments, TOML, YAML) + overrides; all errors at once. (SimpleTuner's keys:
tests/trainer/test_compat.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kontext_trainer.config import ConfigError, read_config_file, resolve_config

def test_overrides_win_and_are_typed():
    r = resolve_config({"learning_rate": 1e-5, "lora_rank": 16},
                       {"manifest": "m.parquet", "learning_rate": "3e-4", "lora_rank": "4", "vae_tiling": "true"})
    assert r.config.learning_rate == 3e-4 and r.config.lora_rank == 4 and r.config.vae_tiling is True


def test_every_error_is_reported_together():
    with pytest.raises(ConfigError) as exc:
        resolve_config({"model_flavour": "dev", "lora_rank": 0, "optimizer": "sgd", "learning_rate": "fast",
                        "lr_scheduler": "polynomial", "validation_resolution": "1000x1000"},
                       {"manifest": "m.parquet", "lora_rnak": 4})
    text = str(exc.value)
    assert len(exc.value.problems) == 7
    for needle in ("model_flavour", "lora_rank", "optimizer", "learning_rate", "lr_scheduler",
                   "validation_resolution", "did you mean 'lora_rank'"):
        assert needle in text


def test_toml_and_yaml(tmp_path):
    (tmp_path / "c.toml").write_text('learning_rate = 2e-4\n[lora]\nrank = 8\ntargets = "attention+ffs"\n')
    (tmp_path / "c.yaml").write_text("learning_rate: 2.0e-4\nlora_rank: 8\noptimizer: lion\n")
    t = resolve_config(read_config_file(tmp_path / "c.toml"), {"manifest": "m"}).config
    y = resolve_config(read_config_file(tmp_path / "c.yaml"), {"manifest": "m"}).config
    assert (t.learning_rate, t.lora_rank, t.lora_targets) == (2e-4, 8, "attention+ffs")
    assert (y.learning_rate, y.lora_rank, y.optimizer) == (2e-4, 8, "lion")


def test_unparseable_file_names_the_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{"lora_rank": 16,,}')
    with pytest.raises(ConfigError, match="bad.json"):
        read_config_file(p)


def test_compile_blocks_with_a_quanto_base_is_accepted_and_a_budget_needs_compiled_blocks(tmp_path):
    from kontext_trainer.config import ConfigError, resolve_config

    m = str(tmp_path / "m.parquet")
    ok = resolve_config({"manifest": m, "base_model_precision": "int8-quanto", "compile_blocks": True})
    assert ok.config.compile_blocks is True  # quanto's data runs as plain tensors (DequantLinear): it compiles
    assert resolve_config({"manifest": m, "activation_memory_budget": 0.2}).config.activation_memory_budget == 0.2
    with pytest.raises(ConfigError) as exc:
        resolve_config({"manifest": m, "activation_memory_budget": 0.2, "compile_blocks": False})
    assert "activation_memory_budget" in str(exc.value) and "checkpoint_fraction" in str(exc.value)
    with pytest.raises(ConfigError, match="above 0"):
        resolve_config({"manifest": m, "activation_memory_budget": 0})


# ------------------------------------------------------------------------------------------- shipped configs
# Every training config a user can copy from the docs or the examples must load. Which blocks those are is decided
# by a rule, not a list: `_not_a_training_config` says why a block is skipped.

ROOT = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^```(json|jsonc|toml|ya?ml)[ \t]*\n(.*?)^```", re.S | re.M)
HEREDOC = re.compile(r"<<-?\s*['\"]?(JSONC?|TOML|YAML)['\"]?[^\n]*\n(.*?)^\s*\1\s*$", re.S | re.M)
SUFFIX = {"json": ".json", "jsonc": ".jsonc", "toml": ".toml", "yaml": ".yaml", "yml": ".yaml"}


def _shipped_config_blocks() -> list[tuple[str, str, str]]:
    """(where, suffix, text) of every config-language block: fenced ```json / ```jsonc / ```toml / ```yaml blocks
    of docs/**/*.md, config files in examples/, config heredocs (<<'JSON' ... JSON) of examples/*.sh, and the
    SimpleTuner guide's config.json copies in tests/fixtures/simpletuner/."""
    blocks = []
    for md in sorted((ROOT / "docs").rglob("*.md")):
        text = md.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            blocks.append((f"{md.relative_to(ROOT)}:{line}", SUFFIX[m.group(1)], m.group(2)))
    for path in sorted((ROOT / "examples").iterdir()):
        if path.suffix in (".json", ".jsonc", ".toml", ".yaml", ".yml"):
            blocks.append((str(path.relative_to(ROOT)), path.suffix, path.read_text(encoding="utf-8")))
        elif path.suffix == ".sh":
            text = path.read_text(encoding="utf-8")
            for m in HEREDOC.finditer(text):
                line = text.count("\n", 0, m.start()) + 1
                blocks.append((f"{path.relative_to(ROOT)}:{line}", SUFFIX[m.group(1).lower()], m.group(2)))
    for path in sorted((ROOT / "tests" / "fixtures" / "simpletuner").glob("config*.json*")):
        blocks.append((str(path.relative_to(ROOT)), path.suffix, path.read_text(encoding="utf-8")))
    return blocks


def _not_a_training_config(where: str, values: dict) -> str | None:
    """Why a parsed block is not a training config (None: it is one). The rule: a training config is one object
    most of whose keys kontext-train reads (our fields or SimpleTuner keys), or a copy of SimpleTuner's config.json.
    Other JSON in the docs is another file's format: kontext-data's reports and provenance records, whose keys are
    their own."""
    from kontext_trainer.compat import is_known, normalize_key
    from kontext_trainer.config import FIELD_NAMES

    if "fixtures/simpletuner" in where:
        return None
    known = [k for k in values if normalize_key(k) in FIELD_NAMES or is_known(normalize_key(k))]
    if len(known) * 2 <= len(values):
        return f"another file's format: only {known or 'none'} of its keys {sorted(values)} are config keys"
    return None


def test_every_config_shipped_in_docs_and_examples_loads(tmp_path):
    configs, skipped = [], []
    for i, (where, suffix, text) in enumerate(_shipped_config_blocks()):
        path = tmp_path / f"block{i}{suffix}"
        path.write_text(text, encoding="utf-8")
        try:
            values = read_config_file(path)
        except ConfigError as exc:  # several JSON objects, one per line: JSON Lines (validation prompts), data
            if suffix in (".json", ".jsonc") and len([ln for ln in text.splitlines() if ln.strip()]) > 1 and all(
                    ln.strip().startswith("{") for ln in text.splitlines() if ln.strip()):
                skipped.append((where, "JSON Lines: a data file (one object per line), not a config"))
                continue
            raise AssertionError(f"{where}: does not parse as a config: {exc.problems}") from None
        reason = _not_a_training_config(where, values)
        if reason:
            skipped.append((where, reason))
            continue
        overrides = {} if "manifest" in values else {"manifest": "m.parquet"}  # the manifest comes from the CLI
        try:
            resolve_config(values, overrides, source=where)
        except ConfigError as exc:
            raise AssertionError(f"{where}: {exc.problems}") from None
        configs.append(where)
    names = " ".join(configs)
    # the rule must keep finding the configs users copy: the quickstarts, train.md's, the demo's, the guide's
    for expected in ("docs/quickstart.md", "docs/es/quickstart.md", "docs/train.md", "examples/demo_train.sh",
                     "tests/fixtures/simpletuner/config.jsonc"):
        assert expected in names, (expected, configs, skipped)
    assert all(reason for _, reason in skipped)


def test_train_md_documents_every_config_key():
    """docs/train.md's "Every key" table has one row per TrainConfig field, and no row for a field that is gone."""
    from kontext_trainer.config import FIELD_NAMES

    text = (ROOT / "docs" / "train.md").read_text(encoding="utf-8")
    table = text.split("### Every key", 1)[1].split("\n\n", 2)[1]
    rows = re.findall(r"^\| `(\w+)` \|", table, re.M)
    assert sorted(set(FIELD_NAMES) - set(rows)) == [], "fields missing from docs/train.md's table"
    assert sorted(set(rows) - set(FIELD_NAMES)) == [], "rows of docs/train.md's table that are no field"
