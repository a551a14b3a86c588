"""Chemical formulas: the one place a formula is parsed.

* :func:`parse_composition`: a formula as a pymatgen ``Composition`` of real elements, or a :class:`FormulaError`
  naming the formula and what is wrong (pymatgen alone reads ``Xy2`` as a dummy species).
* :func:`reduced_formula`: the pymatgen reduced formula (``CuInSe2`` -> ``InCuSe2``), the key every match uses
  (cached: a 100k-row table is parsed once per process).
* :func:`written_elements`: the elements in the order they are written, for site-ordered descriptors.
* :func:`formula_symbols`: the element symbols of a plain formula without parsing it (fast path for reading
  shipped tables whose formulas are already reduced).
* :func:`recapitalised_formulas`, :func:`case_hint`: "did you mean 'GaAs'?" for a formula typed in the wrong case.
"""

from __future__ import annotations

import re
import warnings
from functools import lru_cache

from pymatgen.core import Composition, Element

from materials.errors import InputError


class FormulaError(InputError):
    """A chemical formula cannot be read; the message names it and the problem."""


#: An element symbol as written in a plain formula.
_SYMBOL = re.compile(r"[A-Z][a-z]?")


def formula_symbols(formula: str) -> frozenset[str]:
    """Element symbols written in a plain formula (``"GaAs"`` -> ``{"Ga", "As"}``), without parsing it: for
    shipped tables of reduced formulas (no brackets, no charges), read row by row. User input goes through
    :func:`parse_composition`."""
    return frozenset(_SYMBOL.findall(formula))


@lru_cache(maxsize=1 << 18)  # every MP formula fits: reloading a set skips re-parsing
def reduced_formula(formula: str) -> str:
    """pymatgen reduced formula of ``formula`` (``CuInSe2`` -> ``InCuSe2``), the key every match uses.

    Raises:
        FormulaError: as :func:`parse_composition` (a ``ValueError``).
    """
    comp = parse_composition(formula.strip() if isinstance(formula, str) else formula)
    with warnings.catch_warnings():
        # noble gases have no Pauling electronegativity; pymatgen warns but orders them consistently
        warnings.simplefilter("ignore", UserWarning)
        return comp.reduced_formula


#: Lower-case element symbol -> symbol, for reading formulas typed in the wrong case.
_SYMBOLS_BY_LOWER = {el.symbol.lower(): el.symbol for el in Element}


def recapitalised_formulas(formula: str, limit: int = 3) -> list[str]:
    """Spellings of an unparseable ``formula`` that differ only in letter case and do parse (``si`` -> ``Si``,
    ``SI``; ``GAAS`` -> ``GaAs``), at most ``limit``. Empty when ``formula`` parses as written or no re-casing of it
    reads as real elements (``Xx2``), so a non-empty answer means "a case typo".

    Most likely first: fewest elements heavier than Bi (``Ba(NO3)2`` before nobelium ``Ba(No3)2``), then fewest
    element symbols as written (``Si`` before ``SI``, ``CoO2`` before ``COO2``)."""
    text = formula.strip()
    if not any(c.isalpha() for c in text):
        return []
    if _parses(text):  # already a formula: nothing to suggest
        return []
    readings: dict[str, tuple[str, ...]] = {}

    def walk(i: int, built: str, symbols: tuple[str, ...]) -> None:
        if len(readings) >= 64:  # long all-caps strings have many readings; the first few are what we show
            return
        if i == len(text):
            readings.setdefault(built, symbols)
            return
        if not text[i].isalpha():
            walk(i + 1, built + text[i], symbols)
            return
        for width in (2, 1):
            chunk = text[i : i + width]
            if len(chunk) == width and chunk.isalpha() and chunk.lower() in _SYMBOLS_BY_LOWER:
                symbol = _SYMBOLS_BY_LOWER[chunk.lower()]
                walk(i + width, built + symbol, (*symbols, symbol))

    walk(0, "", ())
    ranked = []
    for reading, symbols in readings.items():
        try:
            reduced_formula(reading)
        except ValueError:
            continue
        heavy = sum(Element(s).Z > Element("Bi").Z for s in set(symbols))
        ranked.append(((heavy, len(symbols), reading), reading))
    return [reading for _, reading in sorted(ranked)[:limit]]


def case_hint(formula: str) -> str:
    """``"; formulas are case-sensitive: did you mean 'Si' (or 'SI')?"`` for a case typo, else ``""``."""
    readings = recapitalised_formulas(formula)
    if not readings:
        return ""
    others = f" (or {', '.join(map(repr, readings[1:]))})" if len(readings) > 1 else ""
    return f"; formulas are case-sensitive: did you mean {readings[0]!r}{others}?"


def _parses(text: str) -> bool:
    """True when ``text`` reads as a formula as written."""
    try:
        reduced_formula(text)
    except ValueError:
        return False
    return True


def parse_composition(formula: str) -> Composition:
    """Parse a chemical formula into a pymatgen Composition of real elements.

    Raises:
        FormulaError: the formula is empty, unparseable, has no atoms, or names an unknown element
            (pymatgen turns unknown symbols into dummy species), naming the formula and the problem.
    """
    if not isinstance(formula, str):
        raise FormulaError(f"formula {formula!r} is not text; give a chemical formula such as 'GaAs'.")
    if not formula.strip():
        raise FormulaError(f"formula {formula!r} is empty; give a chemical formula such as 'GaAs'.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            comp = Composition(formula)
    except Exception as exc:  # pymatgen raises ValueError, KeyError, ... for different malformed strings
        raise FormulaError(
            f"formula {formula!r} cannot be parsed ({exc}); write it like 'SrTiO3' or 'Ga0.5In0.5As'."
        ) from exc
    unknown = [getattr(sp, "symbol", str(sp)) for sp in comp.elements if not isinstance(sp, Element)]
    if unknown:
        raise FormulaError(
            f"formula {formula!r} contains unknown element(s) {unknown}; check the symbols' spelling and case."
        )
    if comp.num_atoms <= 0:
        raise FormulaError(f"formula {formula!r} has no atoms; amounts must be positive.")
    return comp


_TOKEN = re.compile(r"([A-Z][a-z]?)(\d*\.?\d*)")


def written_elements(formula: str) -> list[tuple[str, float]]:
    """The elements of a formula in the order it is written, with their amounts (a repeated symbol is merged
    into its first position): ``"SrTiO3"`` -> ``[("Sr", 1), ("Ti", 1), ("O", 3)]``.

    Raises:
        FormulaError: as :func:`parse_composition` (the formula is parsed by pymatgen first), or a formula with
            brackets, whose written order is ambiguous.
    """
    parse_composition(formula)
    if re.search(r"[()\[\]]", formula):
        raise FormulaError(
            f"formula {formula!r} has brackets, so its written order is ambiguous; site-ordered features need a "
            "flat formula such as 'SrTiO3'."
        )
    order: dict[str, float] = {}
    for symbol, amount in _TOKEN.findall(formula.replace(" ", "")):
        order[symbol] = order.get(symbol, 0.0) + (float(amount) if amount else 1.0)
    return list(order.items())
