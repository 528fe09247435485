"""Importing the package keeps albumentations from asking PyPI for updates, unless the user says otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Counts the requests albumentations makes on import (each refused, as on an offline node).
PROBE = """
import urllib.request
calls = []
def refuse(opener, url, *args, **kwargs):
    calls.append(url)
    raise OSError("offline")
urllib.request.OpenerDirector.open = refuse
import idc_lightning, albumentations
print(len(calls))
"""


@pytest.mark.parametrize(("given", "requests"), [(None, "0"), ("0", "1")])
def test_update_check_is_off_unless_asked_for(given: str | None, requests: str) -> None:
    env = {key: value for key, value in os.environ.items() if key != "NO_ALBUMENTATIONS_UPDATE"}
    if given is not None:
        env["NO_ALBUMENTATIONS_UPDATE"] = given
    result = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == requests
