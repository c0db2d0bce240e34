"""The registry of architecture families: the one place a family's name is looked up. Everything that differs
between families is an attribute or method of its `Family` (model/family.py), asked through here."""

from __future__ import annotations

from forethought.errors import ForethoughtError
from forethought.model.config import FAMILY_TABLE
from forethought.model.family import Family
from forethought.model.feedback import FEEDBACK
from forethought.model.gemma3 import GEMMA3
from forethought.model.gpt2 import GPT2
from forethought.model.llama import LLAMA
from forethought.model.recurrent import RECURRENT

FAMILIES: dict[str, Family] = {f.name: f for f in (LLAMA, GPT2, GEMMA3, FEEDBACK, RECURRENT)}
FAMILY_TABLE.update(FAMILIES)  # what `ModelConfig.family_spec` reads


def family_of(name: str) -> Family:
    family = FAMILIES.get(name)
    if family is None:
        raise ForethoughtError(f"unknown model family {name!r} (one of {', '.join(FAMILIES)})")
    return family
