"""What the 2D and 3D synthetic generators share: the checks of their specs and their seeded random streams.

Both draw every random number from a stream seeded by (data seed, site, purpose, chunk), so a dataset is a pure
function of its spec and an external site's patients never share a stream with the internal ones.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import numpy as np

from radssl.errors import DataError

Check = tuple[bool, str, str]
"""(holds, ``field=value`` as given, how to fix it)."""


class SeededSpec(Protocol):
    """A synthetic spec: the knobs every generator has."""

    n_patients: int
    positive_rate: float
    finding_contrast: float
    site: int
    seed: int


def spec_stream(spec: SeededSpec, stream: int, chunk: int = 0) -> np.random.Generator:
    """Independent random stream per (seed, site, purpose, chunk)."""
    return np.random.default_rng(np.random.SeedSequence([spec.seed, spec.site, stream, chunk]))


def common_checks(spec: SeededSpec) -> dict[str, Check]:
    """The checks of the knobs both specs have, by field name (each spec lists them in its own order)."""
    return {
        "n_patients": (spec.n_patients >= 1, f"n_patients={spec.n_patients}", "use at least 1 patient"),
        "positive_rate": (0.0 <= spec.positive_rate <= 1.0, f"positive_rate={spec.positive_rate}",
                          "use a value in [0, 1]"),
        "site": (spec.site >= 0, f"site={spec.site}", "use 0 for the internal site or a positive integer"),
        "finding_contrast": (spec.finding_contrast >= 0.0, f"finding_contrast={spec.finding_contrast}",
                             "use a value >= 0"),
    }


def check_spec(owner: str, checks: Iterable[Check]) -> None:
    """A DataError naming ``owner`` and the first knob that fails, before anything is generated."""
    for ok, field_value, fix in checks:
        if not ok:
            raise DataError(owner, f"{field_value} is invalid", fix)
