"""RFM scores from the README's formula, against a plain Python reference."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.segments.profiles import ClvInputs, rfm_by_cuts, rfm_by_rank

AS_OF_DAY = 20_000

# (days since the last order, orders, net revenue) per buyer; small ranges, so ties abound.
buyers = st.lists(
    st.tuples(
        st.integers(0, 30), st.integers(1, 6), st.integers(-500, 5_000).map(lambda v: v * 100)
    ),
    min_size=1,
    max_size=60,
)


def _inputs(rows: list[tuple[int, int, int]]) -> ClvInputs:
    days_since, orders, net = (np.array(col, dtype=np.int64) for col in zip(*rows, strict=True))
    n = len(rows)
    zeros = np.zeros(n, dtype=np.int64)
    return ClvInputs(
        customer_id=np.arange(1, n + 1, dtype=np.int64),
        frequency=zeros,
        recency=zeros,
        age=zeros,
        monetary=np.zeros(n),
        avg_order_value=np.zeros(n),
        days_since=days_since,
        orders_count=orders,
        net=net,
    )


def _reference(values: list[int], worse: str) -> list[int]:
    """``1 + floor(5 × (rank − 1) ÷ N)``, rank = 1 + the number strictly worse."""
    n = len(values)
    ranks = [
        1 + sum(1 for other in values if (other > v if worse == "more" else other < v))
        for v in values
    ]
    return [1 + (5 * (rank - 1)) // n for rank in ranks]


@settings(max_examples=200, deadline=None)
@given(buyers)
def test_scores_are_the_readmes_quintiles(rows: list[tuple[int, int, int]]) -> None:
    (r, f, m), cuts = rfm_by_rank(_inputs(rows), AS_OF_DAY)
    assert r.tolist() == _reference([row[0] for row in rows], worse="more")
    assert f.tolist() == _reference([row[1] for row in rows], worse="less")
    assert m.tolist() == _reference([row[2] for row in rows], worse="less")
    assert cuts.buyers == len(rows)


@settings(max_examples=200, deadline=None)
@given(buyers, buyers)
def test_cuts_score_a_buyer_as_the_full_ranking_would(
    rows: list[tuple[int, int, int]], newcomers: list[tuple[int, int, int]]
) -> None:
    """The buyers scored against their own ranking's cuts get their scores back (what a
    scoped recompute relies on), and anyone else steps past score k exactly when their
    value is above every value the ranking scored k or less."""
    inputs = _inputs(rows)
    scores, cuts = rfm_by_rank(inputs, AS_OF_DAY)
    again = rfm_by_cuts(inputs, AS_OF_DAY, cuts)
    for ranked, cut in zip(scores, again, strict=True):
        assert cut.tolist() == ranked.tolist()
    others = rfm_by_cuts(_inputs(newcomers), AS_OF_DAY, cuts)
    for k, (measure, better) in enumerate(
        (
            ([AS_OF_DAY - row[0] for row in rows], [AS_OF_DAY - row[0] for row in newcomers]),
            ([row[1] for row in rows], [row[1] for row in newcomers]),
            ([row[2] for row in rows], [row[2] for row in newcomers]),
        )
    ):
        ranked_scores = scores[k].tolist()
        for value, got in zip(better, others[k].tolist(), strict=True):
            below = [
                max(
                    (v for v, s in zip(measure, ranked_scores, strict=True) if s <= step),
                    default=None,
                )
                for step in range(1, 5)
            ]
            assert got == 1 + sum(1 for cut in below if cut is None or value > cut)
