"""`.env.example` lists every setting with its real default, and loading it changes nothing."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from config.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def env_names(model: type[BaseModel], prefix: str = "") -> list[str]:
    names = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names += env_names(annotation, f"{prefix}{name}__")
        else:
            names.append(f"{prefix}{name}".upper())
    return names


def example_entries() -> dict[str, str]:
    entries = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            entries[key.strip()] = value.strip()
    return entries


def test_every_setting_is_listed_and_nothing_else() -> None:
    assert sorted(example_entries()) == sorted(env_names(Settings))


def test_listed_values_are_the_defaults() -> None:
    from_file = Settings(_env_file=ROOT / ".env.example")
    assert from_file == Settings(_env_file=None)
