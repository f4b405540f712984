"""KID beside FID where the sample count is small: difflab-eval's kid=auto."""

from __future__ import annotations

import torch

from difflab.metrics.fid import KID_BELOW, FIDEvaluator, kid_wanted
from tests.test_fid import FixedFeatures


def test_kid_auto_is_on_below_ten_thousand_samples_and_explicit_choices_stay():
    assert KID_BELOW == 10_000
    assert kid_wanted("auto", 9_999) and not kid_wanted("auto", 10_000)
    assert kid_wanted(True, 50_000) and not kid_wanted(False, 100)


def test_kid_names_carry_its_std_beside_the_unchanged_fid_key():
    """results.json/csv get val/kid_<extractor>_<n> and its _std over subsets; the FID key stays as
    experiments/benchmarks/time_to_quality.py parses it."""
    ev = FIDEvaluator(FixedFeatures(), num_samples=1000, kid=True)
    assert ev.names() == {"fid": "val/fid_fixed_1k", "kid": "val/kid_fixed_1k"}
    g = torch.Generator().manual_seed(0)
    ev.set_real_features(torch.randn(300, 16, generator=g, dtype=torch.float64))
    ev.kid.update(torch.rand(300, 1, 8, 8, generator=g), real=False)
    mean, std = ev.kid.compute()
    assert ev.kid.subset_size == 150 and float(std) > 0 and torch.isfinite(mean)
