"""The RFC 7240 ``Prefer`` header of ``POST /generate``: what asks for 202 at once, and how long a wait is."""

from __future__ import annotations

import pytest

from server.routes.generate import parse_prefer


@pytest.mark.parametrize(("header", "expected"), [
    (None, (False, None)),
    ("respond-async", (True, None)),
    ("Respond-Async, wait=10", (True, 10.0)),
    ("wait=2.5", (False, 2.5)),
    ('wait="7"', (False, 7.0)),
    ("respond-async=false", (False, None)),  # respond-async takes no value
    ("wait=nan", (False, None)),  # not delta-seconds: ignored, not a zero wait
    ("wait=inf", (False, None)),
    ("wait=-1", (False, None)),
    ("wait=1e3", (False, None)),
    ("wait=", (False, None)),
    ("handling=lenient; return=minimal", (False, None)),
])
def test_prefer_header(header, expected):
    assert parse_prefer(header) == expected
