"""docs/settings.md lists every setting with its default and meaning: generated from the Settings class, so
an operator's reference cannot drift from the code (13 settings were in no document before)."""

from __future__ import annotations

from pathlib import Path

from server.settings import Settings, settings_reference

DOC = Path(__file__).resolve().parents[2] / "docs" / "settings.md"


def test_docs_settings_md_is_the_generated_reference():
    assert DOC.read_text() == settings_reference(), "regenerate: python -m server.settings > docs/settings.md"


def test_every_setting_is_described():
    undescribed = [name for name, field in Settings.model_fields.items() if not (field.description or "").strip()]
    assert not undescribed
    for name in Settings.model_fields:
        assert f"| `EDIFFI_{name.upper()}` |" in DOC.read_text()
