"""A site's edge node reports its models and its router its policies, under one site id:
the registry keeps both, each report replacing only the entries of its own kinds."""

from __future__ import annotations

from pathlib import Path

from ota.registry_client import SiteServes
from registry.sites import SiteBook, SiteReport


def test_edge_and_router_reports_of_one_site_are_kept_side_by_side(tmp_path: Path) -> None:
    book = SiteBook(tmp_path)
    edge = (SiteServes("model", "fashion-edge", 1), SiteServes("model", "digits-edge", 1))
    router = (
        SiteServes("router-policy", "fashion-mnist", 1),
        SiteServes("router-policy", "digits", 2, (3,)),
    )
    book.record(SiteReport("site-a", edge, 100.0))
    book.record(SiteReport("site-a", router, 101.0))
    (report,) = book.reports()
    assert set(report.served) == set(edge + router) and report.reported_at == 101.0
    # The router's next report replaces its policies only; the edge's models stay.
    book.record(SiteReport("site-a", (SiteServes("router-policy", "digits", 4),), 102.0))
    assert set(book.reports()[0].served) == {*edge, SiteServes("router-policy", "digits", 4)}
    assert book.version_mix()[("router-policy", "digits", 4)] == 1
    assert ("router-policy", "fashion-mnist", 1) not in book.version_mix()
    # Written through: a restarted registry reads the merged view.
    assert set(SiteBook(tmp_path).reports()[0].served) == set(book.reports()[0].served)
