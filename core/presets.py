"""Named presets: PRESET=record-1.0611 reads presets/record-1.0611.json (docs/spec.md §6, "Presets").

A preset file is JSON with a "description", sections of settings ("model", "optimizer", "schedule",
"artifact", "ttt", "memory": what a run of it needs to fit, not the source's own settings)
and "other_work": the settings its source uses that belong to work not in twingpt yet, grouped under
the name of that work. An "other_work" setting may also be in a section, as what this build uses
instead of its source's: its line names the substitute. A preset
sits under every other source of a setting (flags, environment, the CONFIG file): an explicit
setting always wins.

Nothing of a preset is dropped in silence. A setting this build does not know (a model option that
has not landed yet) and every "other_work" setting are the preset's `unsupported` list, which the
plan and the run's log print in full.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from core.errors import ConfigError

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"
SECTIONS = ("model", "optimizer", "schedule", "artifact", "ttt", "memory")
TOP_LEVEL = ("description", *SECTIONS, "other_work")


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    settings: dict[str, Any]               # field name -> value, only settings this build knows
    unsupported: dict[str, tuple[Any, str]]   # ENV NAME -> (value, why it is not applied)

    def unsupported_lines(self) -> list[str]:
        """The settings of the preset that are not applied, grouped by why, one line a group."""
        by_reason: dict[str, list[str]] = {}
        for key, (value, why) in self.unsupported.items():
            by_reason.setdefault(why, []).append(f"{key}={value}")
        return [f"preset {self.name}: not yet supported, not applied ({why}): {' '.join(items)}"
                for why, items in by_reason.items()]


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name: str, known: Iterable[str]) -> Preset:
    """The preset `name`; `known` are the field names of TrainConfig. An unknown name is a ConfigError."""
    path = PRESET_DIR / f"{name}.json"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name) or not path.is_file():
        raise ConfigError(f"PRESET={name}: no such preset; known: {', '.join(preset_names()) or 'none'}")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"PRESET={name}: {path} cannot be read as JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"PRESET={name}: {path} is not a JSON object")
    strange = sorted(set(data) - set(TOP_LEVEL))
    if strange:   # a misspelt section would otherwise be ignored in silence
        raise ConfigError(f"PRESET={name}: {path} has unknown sections {strange}; known: {', '.join(TOP_LEVEL)}")
    known = set(known)
    settings: dict[str, Any] = {}
    unsupported: dict[str, tuple[Any, str]] = {}
    for section in SECTIONS:
        for key, value in data.get(section, {}).items():
            if key.lower() in known:
                settings[key.lower()] = value
            else:
                unsupported[key] = (value, f"{section} setting unknown to this build")
    for work, items in data.get("other_work", {}).items():
        for key, value in items.items():
            instead = f"; the preset sets {key}={settings[key.lower()]} instead" if key.lower() in settings else ""
            unsupported[key] = (value, work + instead)
    return Preset(name, data.get("description", ""), settings, unsupported)
