"""One metric table drives gates, promotion limits, the report, the summary and the registry columns."""

import dataclasses

import pytest

from pipeline import metric_table
from pipeline.metric_table import METRICS, MetricRow, side_by_side
from pipeline.recipe import GatesConfig, PromoteConfig
from pipeline.registry.promotion import compare


def test_recipe_gate_and_promote_keys_are_the_table_columns():
    assert set(GatesConfig.model_fields) == {m.gate.field for m in METRICS if m.gate}
    assert set(PromoteConfig.model_fields) == {m.promote.field for m in METRICS if m.promote}
    assert GatesConfig().max_ppl_increase_pct == 10.0 and GatesConfig().min_next_token_agreement is None
    with pytest.raises(ValueError):
        GatesConfig(min_tokens_per_s=0)  # strict bound from the row
    with pytest.raises(ValueError):
        PromoteConfig(max_agreement_drop=1.5)  # maximum from the row


def test_one_name_per_metric():
    keys = [m.key for m in METRICS]
    assert len(keys) == len(set(keys)) and "agreement" not in keys  # next_token_agreement only
    assert all(m.key == m.key.lower() and " " not in m.key for m in METRICS)


def test_a_new_row_shows_in_the_report_and_summary(monkeypatch):
    row = MetricRow("joules_per_token", "energy per token (J)", ".2f", "lower", unit="J")
    monkeypatch.setattr(metric_table, "METRICS", METRICS + (row,))
    rows = side_by_side({"engine_ppl": 21.0, "source_ppl": 20.0, "joules_per_token": 0.5})
    assert rows == [("perplexity (held-out)", "20.000", "21.000"), ("energy per token (J)", "", "0.50")]


def test_promotion_rows_follow_the_table_directions():
    champion = {m.key: 10.0 for m in METRICS}
    rows = compare({**champion, "tokens_per_s": 9.0, "ttft_ms": 11.0}, champion, PromoteConfig())
    by_key = {r.metric: r for r in rows}
    assert [r.metric for r in rows] == [m.key for m in METRICS if m.promote]
    assert by_key["tokens_per_s"].change == pytest.approx(10.0) and by_key["ttft_ms"].change == pytest.approx(10.0)
    assert dataclasses.asdict(by_key["engine_ppl"])["change"] == 0
