"""Grain pipelines: batch layout, packing == padding, determinism, resume, sharding, mixtures, eval."""

from __future__ import annotations

import collections
import itertools
import json

import grain
import numpy as np
import pytest

from data_fixtures import (
    TOKENIZER_DIR,
    read_jsonl,
    tokenizer,
    write_jsonl,
    write_parquet,
    write_save_to_disk,
)
from jaxrlhf.data import DataConfig, DatasetConfig, asset_path, encode_dpo, encode_sft, make_iterator

TOK = tokenizer()
SFT = read_jsonl(asset_path("sft.jsonl"))
DPO = read_jsonl(asset_path("dpo.jsonl"))
KEYS = {"tokens", "loss_mask", "segment_ids", "positions"}


def make_config(tmp_path, *paths, **overrides) -> DataConfig:
    config = DataConfig(
        tokenizer=TOKENIZER_DIR,
        train=[DatasetConfig(paths=[str(p) for p in paths])],
        max_length=96,
        batch_size=4,
        read_threads=2,
        cache_dir=str(tmp_path / "cache"),
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def segments(tokens, loss_mask, segment_ids):
    """(tokens, loss_mask) of every packed example in rows of a batch, from segment ids."""
    out = []
    for row_tokens, row_mask, row_seg in zip(tokens, loss_mask, segment_ids):
        for s in np.unique(row_seg[row_seg > 0]):
            where = row_seg == s
            out.append((tuple(row_tokens[where].tolist()), tuple(row_mask[where].tolist())))
    return out


def all_segments(batches, side=None):
    pick = (lambda b, k: b[k]) if side is None else (lambda b, k: b[k][:, side])
    return [seg for b in batches for seg in segments(pick(b, "tokens"), pick(b, "loss_mask"), pick(b, "segment_ids"))]


def encoded(example):
    return (tuple(example["tokens"].tolist()), tuple(example["loss_mask"].tolist()))


def test_sft_padded_rows_follow_the_documented_layout(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", SFT[:8])
    batches = list(make_iterator(make_config(tmp_path, path, shuffle=False), task="sft"))
    assert len(batches) == 2
    for b in batches:
        assert set(b) == KEYS and all(v.shape == (4, 96) and v.dtype == np.int32 for v in b.values())
    rows = [{k: b[k][i] for k in KEYS} for b in batches for i in range(4)]
    for row, record in zip(rows, SFT[:8]):
        ex = encode_sft(record, TOK, max_length=96)
        n = len(ex["tokens"])
        np.testing.assert_array_equal(row["tokens"][:n], ex["tokens"])
        np.testing.assert_array_equal(row["loss_mask"][:n], ex["loss_mask"])
        assert (row["tokens"][n:] == TOK.pad_token_id).all() and (row["loss_mask"][n:] == 0).all()
        np.testing.assert_array_equal(row["segment_ids"], np.arange(96) < n)
        np.testing.assert_array_equal(row["positions"], np.where(np.arange(96) < n, np.arange(96), 0))


def test_padding_never_hides_eos_when_pad_id_equals_eos_id(tmp_path):
    assert TOK.pad_token_id == TOK.eos_token_id
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Hello", "completion": ", World !"}])
    (batch,) = make_iterator(make_config(tmp_path, path, batch_size=1, max_length=12), task="sft")
    n = int(batch["segment_ids"][0].sum())
    assert batch["tokens"][0, n - 1] == TOK.eos_token_id and batch["loss_mask"][0, n - 1] == 1
    assert (batch["tokens"][0, n:] == TOK.eos_token_id).all() and batch["loss_mask"][0, n:].sum() == 0


@pytest.mark.parametrize("packing", ["first_fit", "best_fit"])
def test_packed_and_padded_pipelines_hold_the_same_examples(tmp_path, packing):
    path = write_jsonl(tmp_path / "d.jsonl", SFT[:60])
    padded = list(make_iterator(make_config(tmp_path, path, batch_size=1), task="sft"))
    packed = list(make_iterator(make_config(tmp_path, path, batch_size=1, packing=packing, packing_bins=4), task="sft"))
    assert len(packed) < len(padded) == 60
    assert collections.Counter(all_segments(packed)) == collections.Counter(all_segments(padded))
    assert collections.Counter(all_segments(padded)) == collections.Counter(
        encoded(encode_sft(r, TOK, max_length=96)) for r in SFT[:60]
    )
    assert max(int(b["segment_ids"].max()) for b in packed) > 1


RESUME_CASES = {
    "sft-padded": ("sft", "sft.jsonl", {}),
    "sft-packed": ("sft", "sft.jsonl", {"packing": "first_fit", "packing_bins": 3}),
    "dpo": ("dpo", "dpo.jsonl", {}),
    "dpo-packed": ("dpo", "dpo.jsonl", {"packing": "best_fit", "packing_bins": 3, "num_epochs": 6}),
}


@pytest.mark.parametrize("case", RESUME_CASES)
def test_resume_yields_the_identical_next_batches(tmp_path, case):
    task, name, overrides = RESUME_CASES[case]
    records = read_jsonl(asset_path(name))[:30]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    config = make_config(tmp_path, path, **{"num_epochs": 2, "batch_size": 3, "max_length": 64, **overrides})
    it = make_iterator(config, task=task)
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = list(itertools.islice(it, 9))
    resumed = make_iterator(config, task=task)
    resumed.set_state(state)
    got = list(itertools.islice(resumed, 9))
    assert len(got) == 9
    assert resumed.stats == it.stats  # drop counts are part of the state
    for a, b in zip(expected, got):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_iterator_state_goes_into_an_orbax_composite_checkpoint(tmp_path):
    import orbax.checkpoint as ocp

    path = write_jsonl(tmp_path / "d.jsonl", SFT[:24])
    config = make_config(tmp_path, path, batch_size=2, packing="first_fit")
    it = make_iterator(config, task="sft")
    for _ in range(3):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    expected = next(it)
    resumed = make_iterator(config, task="sft")
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    got = next(resumed)
    for key in expected:
        np.testing.assert_array_equal(expected[key], got[key])


def _order(config, task="sft"):
    return [tuple(row[:12].tolist()) for b in make_iterator(config, task=task) for row in b["tokens"]]


def test_shuffle_is_deterministic_by_seed_and_differs_per_epoch(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", SFT[:40])
    config = make_config(tmp_path, path, num_epochs=2)
    first = _order(config)
    assert first == _order(config)
    assert first != _order(make_config(tmp_path, path, num_epochs=2, seed=1))
    epoch1, epoch2 = first[:40], first[40:]
    assert epoch1 != epoch2 and sorted(epoch1) == sorted(epoch2)
    assert sorted(epoch1) == sorted(_order(make_config(tmp_path, path, shuffle=False)))


def test_each_process_reads_its_own_slice(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", SFT[:41])
    config = make_config(tmp_path, path, batch_size=4)
    seen = []
    for index in range(2):
        shard = grain.sharding.ShardOptions(shard_index=index, shard_count=2, drop_remainder=True)
        seen.append(all_segments(make_iterator(config, task="sft", shard=shard)))
        assert len(seen[-1]) == 20  # per-process batch 2: ten batches of its 20 records
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) == {encoded(encode_sft(r, TOK, max_length=96)) for r in SFT[:40]}


def test_weighted_mixture_and_epoch_length(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"apple {i}"} for i in range(30)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"moon {i}"} for i in range(10)])
    config = make_config(tmp_path, a, batch_size=1, max_length=16)
    config.train = [DatasetConfig(paths=[str(a)], weight=3.0), DatasetConfig(paths=[str(b)], weight=1.0)]
    texts = [TOK.decode(b["tokens"][0][b["segment_ids"][0] == 1]) for b in make_iterator(config, task="sft")]
    assert len(texts) == 40  # one epoch of a mixture = as many records as its datasets hold
    apples = sum("apple" in t for t in texts)
    assert apples == 30
    assert sum("moon" in t for t in texts) == 10
    # Every moon record appears once even though the mixture draws it with weight 1/4 (b repeats when exhausted).
    assert abs(sum("apple" in t for t in texts[:20]) - 15) <= 1


def test_records_in_every_file_kind_give_the_same_batches(tmp_path):
    records = SFT[:20]
    json_path = tmp_path / "d.json"
    json_path.write_text(json.dumps(records))
    paths = [
        write_jsonl(tmp_path / "d.jsonl", records),
        json_path,
        write_parquet(tmp_path / "d.parquet", records),
        write_save_to_disk(tmp_path / "saved", records),
    ]
    runs = [list(make_iterator(make_config(tmp_path, p), task="sft")) for p in paths]
    for run in runs[1:]:
        assert len(run) == len(runs[0]) == 5
        for a, b in zip(runs[0], run):
            np.testing.assert_array_equal(a["tokens"], b["tokens"])


def test_glob_of_several_files(tmp_path):
    write_jsonl(tmp_path / "part-0.jsonl", SFT[:6])
    write_jsonl(tmp_path / "part-1.jsonl", SFT[6:12])
    config = make_config(tmp_path, tmp_path / "part-*.jsonl", shuffle=False, batch_size=2)
    got = all_segments(make_iterator(config, task="sft"))
    assert got == [encoded(encode_sft(r, TOK, max_length=96)) for r in SFT[:12]]


def test_eval_keeps_every_pair_with_a_pair_mask_and_equal_batch_counts(tmp_path):
    records = DPO[:25]
    path = write_jsonl(tmp_path / "eval.jsonl", records)
    config = make_config(tmp_path, path, max_length=31, eval_batch_size=8)
    config.eval = [DatasetConfig(paths=[str(path)])]
    expected = []
    for r in records:
        try:
            out = encode_dpo(r, TOK, max_length=31)
        except Exception:  # too long for this max_length: the pipeline must count it, not yield it
            continue
        expected.append((encoded(out["chosen"]), encoded(out["rejected"])))
    assert 0 < len(expected) < 25
    real, counts, stats = [], [], []
    for index in range(2):
        shard = grain.sharding.ShardOptions(shard_index=index, shard_count=2)
        it = make_iterator(config, task="dpo", split="eval", shard=shard)
        batches = list(it)
        counts.append(len(batches))
        stats.append(it.stats)
        for b in batches:
            assert set(b) == KEYS | {"pair_mask"} and b["tokens"].shape == (4, 2, 31) and b["pair_mask"].shape == (4,)
            padding = b["pair_mask"] == 0
            assert (b["segment_ids"][padding] == 0).all() and (b["loss_mask"][padding] == 0).all()
            for i in np.flatnonzero(b["pair_mask"]):
                pair = [b[k][i] for k in ("tokens", "loss_mask", "segment_ids")]  # each [2, T]
                real.append(tuple(segments(*[x[s : s + 1] for x in pair])[0] for s in (0, 1)))
    assert counts[0] == counts[1] == 4  # 13 records (incl. one filler) per process, 4 per batch
    assert collections.Counter(real) == collections.Counter(expected)
    assert sum(s["kept"] for s in stats) == len(expected)
    assert sum(sum(s["dropped"].values()) for s in stats) == 25 - len(expected)


def test_eval_fraction_is_a_fixed_disjoint_carve(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", SFT[:50])
    config = make_config(tmp_path, path, eval_fraction=0.2, batch_size=1)
    train = set(all_segments(make_iterator(config, task="sft")))
    held_out = all_segments(make_iterator(config, task="sft", split="eval"))
    assert len(held_out) == 10 and len(train) == 40 and not train & set(held_out)
    reseeded = make_config(tmp_path, path, eval_fraction=0.2, batch_size=1, seed=7)
    assert all_segments(make_iterator(reseeded, task="sft", split="eval")) == held_out


def test_identical_pairs_dropped_and_counted_in_the_pipeline(tmp_path):
    records = DPO[:6] + [dict(DPO[6], rejected=DPO[6]["chosen"])]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    it = make_iterator(make_config(tmp_path, path, batch_size=1, on_identical_pairs="drop"), task="dpo")
    assert len(list(it)) == 6 and it.stats == {"kept": 6, "dropped": {"identical_pair": 1}}


def test_configuration_errors(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", DPO[:4])
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        make_iterator(make_config(tmp_path, path), task="dpo", shard=grain.sharding.ShardOptions(0, 3))
    with pytest.raises(ValueError, match="no eval data"):
        make_iterator(make_config(tmp_path, path), task="dpo", split="eval")
    with pytest.raises(ValueError, match="no tokenizer given"):
        make_iterator(make_config(tmp_path, path, tokenizer=""), task="dpo")


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_resume(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", SFT[:24])
    config = make_config(tmp_path, path, batch_size=2, packing="first_fit")
    reference = list(make_iterator(config, task="sft"))
    config.worker_count = 2
    it = make_iterator(config, task="sft")
    got = [next(it) for _ in range(3)]
    state = it.get_state()
    got += list(it)
    it.close()
    resumed = make_iterator(config, task="sft")
    resumed.set_state(state)
    tail = list(resumed)
    resumed.close()
    assert len(got) == len(reference) and len(tail) == len(reference) - 3
    for a, b in zip(reference, got):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
    for a, b in zip(reference[3:], tail):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
