"""LoKr factorization: the spec §3.3 table, a sweep against the lycoris-lora 4.1.3 oracle, properties."""

from __future__ import annotations

import math

import pytest
from lycoris.functional.general import factorization as lyco_factorization

from networks.functional import factorization

TABLE = {
    320: {-1: (16, 20), 4: (4, 80), 8: (8, 40)},
    512: {-1: (16, 32), 4: (4, 128), 8: (8, 64), 6: (4, 128)},
    640: {-1: (20, 32), 4: (4, 160), 8: (8, 80)},
    1280: {-1: (32, 40), 4: (4, 320), 8: (8, 160), 64: (20, 64)},
    2048: {-1: (32, 64), 4: (4, 512), 8: (8, 256)},
    768: {-1: (24, 32)},
    1024: {-1: (32, 32)},
    5120: {-1: (64, 80)},
    8192: {-1: (64, 128)},
    10240: {-1: (80, 128)},
    127: {-1: (1, 127), 4: (1, 127), 16: (1, 127)},
    360: {-1: (18, 20), 16: (15, 24)},
}


@pytest.mark.parametrize("dim", sorted(TABLE))
def test_spec_table(dim: int) -> None:
    for f, want in TABLE[dim].items():
        assert factorization(dim, f) == want, (dim, f)


def test_sweep_against_oracle_and_properties() -> None:
    for dim in range(1, 1025):
        root = math.isqrt(dim)
        for f in [-1, *range(1, 65)]:
            m, n = factorization(dim, f)
            assert m * n == dim and m <= n, (dim, f)
            if f > 0 and dim % f == 0:
                assert (m, n) == tuple(sorted((f, dim // f))), (dim, f)
            else:  # the largest divisor not above min(f, √dim)
                limit = root if f < 0 else min(f, root)
                assert m == max(x for x in range(1, limit + 1) if dim % x == 0), (dim, f)
            assert (m, n) == lyco_factorization(dim, f), (dim, f)


def test_properties_up_to_4096() -> None:
    """Spec §7 #7 sweep range; the oracle comparison above stops at 1024 to keep the suite fast."""
    for dim in range(1025, 4097):
        root = math.isqrt(dim)
        for f in [-1, *range(1, 65)]:
            m, n = factorization(dim, f)
            assert m * n == dim and m <= n
            if f > 0 and dim % f == 0:
                assert (m, n) == tuple(sorted((f, dim // f)))
            else:
                assert m <= (root if f < 0 else min(f, root))


@pytest.mark.parametrize(
    "dim,factor", [(0, -1), (-4, -1), (12, 0), (12, -2), (12, 2.5), ("12", -1), (True, -1)]
)
def test_bad_input(dim, factor) -> None:
    with pytest.raises(ValueError, match="factorization"):
        factorization(dim, factor)
