"""The DPO packing benchmark's arithmetic: padding efficiency by hand, synthetic lengths as documented."""

import numpy as np

from jaxrlhf.bench import packing


def test_padding_efficiency_counts_real_tokens_over_row_tokens():
    seg = np.zeros((2, 2, 10), np.int32)
    seg[0, 0, :7], seg[0, 1, :4] = 1, 1  # one padded pair: 11 real of 20
    seg[1, 0, :3], seg[1, 0, 3:9], seg[1, 1, :10] = 1, 2, 1  # a packed row: 9 + 10 real of 20
    assert packing.padding_efficiency([{"segment_ids": seg[:1]}]) == 11 / 20
    assert packing.padding_efficiency([{"segment_ids": seg[:1]}, {"segment_ids": seg[1:]}]) == 30 / 40


def test_synthetic_pairs_have_the_documented_lengths_and_fit():
    pairs = packing.synthetic_pairs(1500, 100_000, 50, seed=0)
    prompts = [int((p["chosen"]["loss_mask"] == 0).sum()) for p in pairs]
    replies = [int(p[s]["loss_mask"].sum()) for p in pairs for s in ("chosen", "rejected")]
    assert abs(np.median(prompts) / packing.PROMPT_MEDIAN - 1) < 0.1
    assert abs(np.median(replies) / packing.REPLY_MEDIAN - 1) < 0.1
    for p in packing.synthetic_pairs(200, 256, 50, seed=1):
        for side in ("chosen", "rejected"):
            tokens, mask = p[side]["tokens"], p[side]["loss_mask"]
            assert 2 <= len(tokens) <= 256 and mask[0] == 0 and mask.any()
        np.testing.assert_array_equal(p["chosen"]["tokens"][: (p["chosen"]["loss_mask"] == 0).sum()],
                                      p["rejected"]["tokens"][: (p["rejected"]["loss_mask"] == 0).sum()])  # fmt: skip
