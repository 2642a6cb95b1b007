"""PackedStream across data-parallel ranks: every image on exactly one rank, equal batch counts, balanced
steps, the same state on every rank, and elastic exact resume onto another number of ranks."""
from __future__ import annotations

import collections
import json

import numpy as np
import pytest

import packer
from pipelines.stream import PackedStream, attention_cost, deal
from test_stream import CONFIG, ListSource, make_records

BAD = {4, 19}  # undecodable: rejected when planned, on every rank's plan


def keys_of(batches) -> list[str]:
    return [str(k) for b in batches for row, n in zip(b["image_keys"], b["num_images"]) for k in row[:int(n)]]


def run(records, rank, ranks, batch=2, epochs=1, state=None, steps=None, **kw):
    """(batches, state after them) of one rank; `steps` batches, or all."""
    stream = PackedStream(ListSource(records), CONFIG, epochs=epochs, num_parallel=kw.pop("num_parallel", 0),
                          shard_index=rank, shard_count=ranks, state=state, **kw)
    out = []
    with stream:
        for b in stream.batches(batch):
            out.append(b)
            if steps is not None and len(out) == steps:
                break
        return out, json.loads(json.dumps(stream.state())), stream.stats


@pytest.mark.parametrize("ranks", [2, 3])
def test_every_image_on_exactly_one_rank_and_equal_steps(ranks):
    records = make_records(41, bad=BAD)
    runs = [run(records, r, ranks) for r in range(ranks)]
    keys = [k for batches, _, _ in runs for k in keys_of(batches)]
    assert sorted(keys) == sorted(r.key for i, r in enumerate(records) if i not in BAD)  # each once, none lost
    assert len({len(batches) for batches, _, _ in runs}) == 1  # the same number of steps on every rank
    assert len({sum(len(b["num_images"]) for b in batches) for batches, _, _ in runs}) == 1
    padding = sum(stats["sequences_padding"] for _, _, stats in runs)
    assert padding < ranks and padding == sum(int((b["num_images"] == 0).sum()) for bs, _, _ in runs for b in bs)
    # read-time rejects are every rank's to see, one rank's to count
    assert sum(stats["images_rejected"] for _, _, stats in runs) == len(BAD)
    assert sum(stats["images_packed"] for _, _, stats in runs) == len(records) - len(BAD)


def test_one_rank_is_the_whole_plan_in_order():
    records = make_records(30)
    whole = list(PackedStream(ListSource(records), CONFIG, epochs=1, num_parallel=0))
    ranks = [run(records, r, 2, batch=1)[0] for r in range(2)]
    global_keys = [str(k) for rec in whole for k in rec["image_keys"][:int(rec["num_images"])]]
    assert sorted(keys_of(ranks[0]) + keys_of(ranks[1])) == sorted(global_keys)
    alone = run(records, 0, 1, batch=1)[0]
    assert keys_of(alone) == global_keys


def test_output_does_not_depend_on_the_workers():
    records = make_records(30)
    a = run(records, 1, 3, num_parallel=0)[0]
    b = run(records, 1, 3, num_parallel=2)[0]
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_the_state_is_the_same_json_on_every_rank():
    records = make_records(50)
    states = [run(records, r, 3, steps=2, num_parallel=np, epochs=None)[1]
              for r, np in ((0, 0), (1, 2), (2, 0))]  # other worker counts read ahead differently
    assert states[0] == states[1] == states[2]
    assert len(json.dumps(states[0])) < 64_000


def test_resume_at_every_step_equals_an_uninterrupted_run():
    records = make_records(41, bad=BAD)
    for rank in range(2):
        full, _, _ = run(records, rank, 2)
        assert len(full) >= 4
        for k in range(1, len(full)):
            first, state, _ = run(records, rank, 2, steps=k)
            rest, _, _ = run(records, rank, 2, state=state)
            assert len(first) == k and len(first) + len(rest) == len(full)
            for x, y in zip(first + rest, full):
                for name in x:
                    np.testing.assert_array_equal(x[name], y[name], err_msg=f"{name}, resumed at step {k}")


@pytest.mark.parametrize("old,new", [(2, 3), (3, 1), (1, 2)])
def test_elastic_resume_onto_another_number_of_ranks(old, new):
    """Saved after k steps of `old` ranks, continued by `new` ranks: every image exactly once overall."""
    records = make_records(47, bad=BAD)
    before = [run(records, r, old, steps=3) for r in range(old)]
    state = before[0][1]
    assert all(s == state for _, s, _ in before)
    after = [run(records, r, new, state=state)[0] for r in range(new)]
    keys = [k for batches, _, _ in before for k in keys_of(batches)] + [k for batches in after for k in keys_of(batches)]
    counts = collections.Counter(keys)
    assert set(counts.values()) == {1}
    assert sorted(counts) == sorted(r.key for i, r in enumerate(records) if i not in BAD)


def test_steps_are_balanced_by_attention_cost():
    rng = np.random.default_rng(0)
    spread = {True: [], False: []}
    for _ in range(200):
        costs = [int(c) for c in rng.integers(1, 256, 16) ** 2]
        for balance in (True, False):
            dealt = deal(costs, 4, balance)
            assert sorted(i for r in dealt for i in r) == list(range(16)) and all(len(r) == 4 for r in dealt)
            loads = [sum(costs[i] for i in r) for r in dealt]
            spread[balance].append(max(loads) / np.mean(loads))
    assert np.mean(spread[True]) < np.mean(spread[False])
    assert max(spread[True]) <= max(spread[False])
    d = packer.Decision(0, ((packer.plan_size(32, 48, "k", CONFIG), None),))
    assert attention_cost(d) == d.plans[0].final_tokens ** 2


def test_a_short_last_step_gives_every_rank_the_same_count():
    assert [len(r) for r in deal([5, 1, 9], 2)] == [2, 1] or [len(r) for r in deal([5, 1, 9], 2)] == [1, 2]
    assert sorted(i for r in deal([5, 1, 9, 2, 2], 3) for i in r) == list(range(5))


def test_shard_auto_reads_the_launcher_and_an_explicit_value_wins(monkeypatch):
    records = make_records(6)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    s = PackedStream(ListSource(records), CONFIG, shard="auto", num_parallel=0)
    assert (s.shard_index, s.shard_count) == (1, 3)
    s = PackedStream(ListSource(records), CONFIG, shard="auto", shard_index=0, num_parallel=0)
    assert (s.shard_index, s.shard_count) == (0, 3)
    with pytest.raises(ValueError, match="shard_index"):
        PackedStream(ListSource(records), CONFIG, shard_index=3, shard_count=3)


def step_spread(records, ranks, batch, balance) -> float:
    """Mean over steps of max / mean rank attention cost (sum of squared image token counts)."""
    per_rank = [run(records, r, ranks, batch=batch, balance=balance)[0] for r in range(ranks)]
    spreads = []
    for step in zip(*per_rank):
        loads = [float((b["num_tokens"].astype(np.int64) ** 2).sum()) for b in step]
        spreads.append(max(loads) / np.mean(loads))
    return float(np.mean(spreads))


def test_the_stream_balances_each_steps_attention_cost():
    records = make_records(160)
    assert step_spread(records, 4, 4, True) < step_spread(records, 4, 4, False)


def test_a_plan_file_gives_the_sequences_of_planning_on_the_fly(tmp_path):
    import subprocess
    import sys

    plan = tmp_path / "plan.jsonl"
    args = ["--resolution", "uniform:32:96", "--seq-len", "64", "--patch-size", "8", "--seed", "3"]
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "plan", "--input", "synthetic:60", "--output", str(plan),
                        "--epochs", "2", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    config = packer.PackConfig(seq_len=64, patch_size=8, resolution="uniform:32:96", seed=3)
    for rank in range(3):
        fly = PackedStream("synthetic:60", config, epochs=2, num_parallel=0, shard_index=rank, shard_count=3)
        filed = PackedStream("synthetic:60", config, epochs=2, num_parallel=0, shard_index=rank, shard_count=3,
                             plan=str(plan))
        a, b = list(fly.batches(2)), list(filed.batches(2))
        assert len(a) == len(b)
        for x, y in zip(a, b):
            for k in x:
                np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    # resume from the plan file, onto another number of ranks
    first = PackedStream("synthetic:60", config, epochs=2, num_parallel=0, plan=str(plan))
    seen = [k for _, rec in zip(range(10), first) for k in rec["image_keys"][:int(rec["num_images"])]]
    state = first.state()
    rest = [k for r in range(2) for rec in PackedStream("synthetic:60", config, epochs=2, num_parallel=0, plan=str(plan),
                                                        shard_index=r, shard_count=2, state=state)
            for k in rec["image_keys"][:int(rec["num_images"])]]
    assert collections.Counter(map(str, seen + rest)) == collections.Counter(f"synthetic/{i:06d}" for i in range(60)
                                                                            for _ in range(2))
    with pytest.raises(Exception, match="other options"):
        PackedStream("synthetic:60", packer.PackConfig(seq_len=64, patch_size=8, seed=4, resolution="uniform:32:96"),
                     epochs=2, plan=str(plan))


def test_a_plan_file_needs_images_that_read_alone(tmp_path):
    from pipelines.stream import StreamError

    with pytest.raises(StreamError, match="reference"):
        PackedStream(ListSource(make_records(8)), CONFIG, epochs=1, num_parallel=0).write_plan(str(tmp_path / "p"))
    assert not (tmp_path / "p").exists()


def test_a_plan_file_names_by_reference_the_images_the_listing_read_whole(tmp_path):
    """PNGs (and JPEGs that are not plain) are read whole for their size; the plan still names their files."""
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(12):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (20 + 5 * i, 40, 3), dtype=np.uint8)).save(buf, format="PNG" if i % 2 else "JPEG")
        (tmp_path / f"im{i:02d}.{'png' if i % 2 else 'jpg'}").write_bytes(buf.getvalue())
    plan = str(tmp_path / "epoch.plan")
    src = str(tmp_path)
    assert PackedStream(src, CONFIG, epochs=1, num_parallel=0).write_plan(plan) > 0
    a = list(PackedStream(src, CONFIG, epochs=1, num_parallel=0).batches(2))
    b = list(PackedStream(src, CONFIG, epochs=1, num_parallel=0, plan=plan).batches(2))
    assert len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
