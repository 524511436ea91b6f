"""Test-wide settings: under CI (`.ci/run` sets HYPOTHESIS_PROFILE=ci) Hypothesis draws the same examples on every
run, so a submission's result does not depend on which random examples a run happened to draw; locally it keeps
exploring new ones."""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("HYPOTHESIS_PROFILE"):
    settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])
