"""docs/CONFIG.md and `mimkit config --list` are generated from the typed config and stay in sync with it."""

import dataclasses
from pathlib import Path

from mimkit import cli
from mimkit.config import Config
from mimkit.config.reference import commands, markdown, missing_meanings

PAGE = Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md"


def test_config_page_is_in_sync_with_the_dataclasses():
    assert PAGE.read_text() == markdown(), (
        "docs/CONFIG.md is out of date: regenerate it with `mimkit config --markdown > docs/CONFIG.md`")


def test_every_key_has_a_meaning_next_to_its_field():
    assert missing_meanings() == [], "add a `# meaning` comment on the field's line in its dataclass"


def test_every_pretraining_key_is_listed_with_its_default(capsys):
    keys = {k.key: k for k in commands()[0][2]}
    cfg = Config()
    for sec in dataclasses.fields(Config):
        for f in dataclasses.fields(getattr(cfg, sec.name)):
            assert f"{sec.name}.{f.name}" in keys
    assert keys["train.epochs"].default == 100 and "epochs" in keys["train.epochs"].meaning
    assert keys["eval.pool"].choices == ("cls", "mean")
    assert cli.main(["config", "--list"]) == 0
    out = capsys.readouterr().out
    assert "data.in_memory" in out and "aug.mixup" in out and "head.global_pool" in out
