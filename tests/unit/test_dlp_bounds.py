"""Bounds of the floor's decoders (dlp.analyse): a hostile body cannot make the scan explode.

No timing assertions: each test asserts on the work done (decoded characters, views), which the
bounds in dlp's docstring promise to keep within WORK_FACTOR times the text plus WORK_FLOOR, and
MAX_DEPTH decodings deep. Past the bound the scan says decode_limit instead of passing the text.
"""

from __future__ import annotations

import base64
import gzip
import json
import random
import urllib.parse

from bottle_tasks.sidecars import dlp
from tests.unit.test_dlp import fake_aws_key


def within_bounds(text: str) -> dlp.Analysis:
    analysis = dlp.analyse(text)
    limit = dlp.WORK_FACTOR * len(text) + dlp.WORK_FLOOR
    assert analysis.work <= limit
    assert sum(len(view.text) for view in analysis.views[1:]) <= limit
    assert max(view.depth for view in analysis.views) <= dlp.MAX_DEPTH
    return analysis


def nested_base64(text: str, times: int) -> str:
    for _ in range(times):
        text = base64.b64encode(text.encode()).decode()
    return text


def test_decoding_stops_at_the_depth_bound():
    key = fake_aws_key()
    for times in range(1, dlp.MAX_DEPTH + 1):
        assert dlp.matching_pattern_names(nested_base64(key, times)) == ["aws_access_key_id"], times
    deeper = nested_base64(key, dlp.MAX_DEPTH + 3)
    within_bounds(deeper)
    assert dlp.matching_pattern_names(deeper) == []  # the documented limit


def test_percent_encoding_a_hundred_times_stays_bounded():
    text = fake_aws_key()
    for _ in range(100):
        text = urllib.parse.quote(text, safe="")
    analysis = within_bounds(text)
    assert len(analysis.views) <= dlp.MAX_DEPTH + 1


def test_text_that_decodes_to_text_at_several_alignments_stays_within_the_bound():
    # Base64 of repeated letters, nested: periodic, so several alignments decode to text, and
    # their decodings do too; about 9 times its length in all, and what it hides is still found.
    text = nested_base64("A" * 60_000 + fake_aws_key(), 3)
    assert not within_bounds(text).exhausted
    assert dlp.matching_pattern_names(text) == ["aws_access_key_id"]


def test_past_the_bound_the_scan_fails_closed(monkeypatch):
    monkeypatch.setattr(dlp, "WORK_FACTOR", 1)
    monkeypatch.setattr(dlp, "WORK_FLOOR", 0)
    dlp.analyse.cache_clear()
    try:
        text = nested_base64("x" * 3000, 2)
        assert dlp.analyse(text).exhausted
        assert dlp.matching_pattern_names(text) == [dlp.DECODE_LIMIT]
    finally:
        dlp.analyse.cache_clear()


def test_a_huge_base64_image_costs_three_times_its_size():
    image = base64.b64encode(random.Random(7).randbytes(2 << 20)).decode()  # 2.8 MB of base64
    analysis = within_bounds(image)
    assert analysis.work <= 3 * len(image) and len(analysis.views) < 100
    assert not analysis.exhausted


def test_many_small_runs_stay_bounded():
    body = json.dumps([base64.b64encode(f"item number {i} of many".encode()).decode() for i in range(40_000)])
    analysis = within_bounds(body)
    assert not analysis.exhausted  # ordinary data, however much of it, is within the bound


def test_a_compression_bomb_inside_base64_inflates_only_so_far():
    bomb = base64.b64encode(gzip.compress(b"A" * (200 << 20))).decode()  # 200 MB of A, a few hundred KB sent
    analysis = within_bounds(bomb)
    assert sum(len(view.text) for view in analysis.views[1:]) <= dlp.MAX_INFLATE + dlp.WORK_FLOOR + 3 * len(bomb)


def test_json_nested_deeper_than_the_parser_allows():
    body = "[" * 200_000 + '"x"' + "]" * 200_000
    assert dlp.scan_body_text(body, "application/json") == []
    result = dlp.redact_body(body, "application/json")
    assert result.text == body and result.unredactable == []


def test_a_million_escapes():
    body = "\\u0041" * 1_000_000
    analysis = within_bounds(body)
    assert len(analysis.views) <= 2 * dlp.MAX_DEPTH + 1
