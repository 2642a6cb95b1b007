"""Benchmarks, advisor and report: small runs on synthetic inputs (no timing assertions)."""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import re

import numpy as np
import pytest
from PIL import Image

import packer
from benchmarks import run_all
from pipelines import packing_efficiency as packing

SIZES = [(120, 160), (480, 640), (300, 300), (64, 500), (900, 200), (33, 47), (1000, 1000), (250, 375)]


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for i, (h, w) in enumerate(SIZES):
        sub = root / f"class{i % 2}"
        sub.mkdir(exist_ok=True)
        Image.new("RGB", (w, h), (i * 20, 100, 200 - i * 20)).save(sub / f"img{i}.jpg", quality=80)
    return str(root)


def test_load_sizes_from_folder_and_csv(image_dir, tmp_path):
    sizes = packing.load_sizes(image_dir)
    assert sorted((s.height, s.width) for s in sizes) == sorted(SIZES)
    csv_path = tmp_path / "sizes.csv"
    csv_path.write_text("key,height,width\n" + "".join(f"k{i},{h},{w}\n" for i, (h, w) in enumerate(SIZES)))
    assert [(s.height, s.width) for s in packing.load_sizes(str(csv_path))] == SIZES


def test_draws_use_the_real_planning_functions(image_dir):
    """Draw i of a file has the token count that prepare_image gives for the key f"{i}/{file}"."""
    sizes = packing.load_sizes(image_dir)
    config = packer.PackConfig(seq_len=256, resolution="uniform:64:256", token_drop="beta:0.5:0.8")
    tokens = packing.draw_tokens(sizes, config, 2 * len(sizes))
    for i in (0, 3, len(sizes) + 5):
        s = sizes[i % len(sizes)]
        with open(os.path.join(image_dir, s.key), "rb") as f:
            image = packer.prepare_image(f.read(), f"{i}/{s.key}", config, images_seen=i)
        assert image.num_tokens == tokens[i]


def test_martello_toth_l2_known_and_bounding():
    assert packing.martello_toth_l2(np.array([6, 6, 6]), 10) == 3  # ceil bound says 2
    assert packing.lower_bounds(np.array([6, 6, 6]), 10, 16)["ceil"] == 2
    rng = np.random.default_rng(0)
    for _ in range(50):
        C = int(rng.integers(8, 64))
        lengths = rng.integers(1, C + 1, int(rng.integers(1, 60)))
        b = packing.lower_bounds(lengths, C, C)
        bins = len(packer.pack_lengths(lengths.tolist(), "bfd", C, C))
        assert b["ceil"] <= b["l2"] <= bins


def test_emax_accounting():
    """100 one-token images, L=10, max_images_per_seq=2: every sequence is closed by max_images_per_seq; the paper's scheme (pack
    without the limit, drop the extra images) would lose 8 of every 10."""
    m = packing.measure_packer(np.ones(100, np.int64), packing.PackerSpec("next-fit"), 10, 2)
    assert m["sequences"] == 50 and m["emax_closed"] == 50 and m["images_over_emax"] == 80


def test_bench_packing_cli_json_and_plots(image_dir, tmp_path):
    from pipelines.cli import bench as cmd_bench

    parser = argparse.ArgumentParser()
    cmd_bench.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "bench.json"
    args = parser.parse_args(["bench", "packing", "--input", image_dir, "--seq-len", "64", "256", "--draws", "300",
                              "--packers", "pad-to-budget", "next-fit", "first-fit", "window-bfd@64", "bfd",
                              "--max-images-per-seq", "auto", "3", "--json", str(out), "--plots", str(tmp_path / "plots")])
    assert args.func(args) == 0
    result = json.loads(out.read_text())
    assert result["meta"]["draws"] == 300 and result["meta"]["num_sizes"] == len(SIZES)
    cells = result["cells"]
    assert len(cells) == 2 * 2 * 5
    for c in cells:
        b = c["bounds"]
        assert c["images"] == 300
        assert sum(c["images_per_seq_hist"].values()) == c["sequences"]
        assert sum(int(k) * v for k, v in c["images_per_seq_hist"].items()) == c["images"]
        assert b["l2"] >= b["ceil"] and b["best"] == max(b["l2"], b["items"])
        assert c["efficiency"] <= c["efficiency_bound"] + 1e-12 <= c["efficiency_ceil"] + 2e-12
        if c["packer"] != "pad-to-budget":
            assert c["sequences"] >= b["best"] and max(map(int, c["images_per_seq_hist"])) <= c["max_images_per_seq"]
        assert math.isclose(c["padding"], 1 - c["efficiency"])
    by = {(c["seq_len"], c["max_images_per_seq"], c["packer"]): c for c in cells}
    # Same draws for every packer of a cell; the windowed packer's tokens match the offline one's.
    assert by[256, 16, "bfd"]["tokens"] == by[256, 16, "next-fit"]["tokens"] == by[256, 16, "pad-to-budget"]["tokens"]
    assert by[256, 3, "first-fit"]["images_over_emax"] > 0
    assert by[256, 16, "bfd"]["efficiency"] >= by[256, 16, "next-fit"]["efficiency"]
    for name in ("efficiency_vs_seq_len.png", "tokens_per_image.png", "images_per_sequence.png"):
        with Image.open(tmp_path / "plots" / name) as im:
            assert im.size[0] > 400
    assert len(result["distributions"]) == 2


def test_bench_rejects_bad_specs(image_dir):
    parser = argparse.ArgumentParser()
    packing.add_arguments(parser)
    for bad, flag in ((["--resolution", "uniform:9:1"], "resolution"), (["--packers", "worst-fit"], "worst-fit"),
                      (["--draws", "0"], "--draws")):
        with pytest.raises(ValueError, match=flag):
            packing.run(parser.parse_args(["--input", image_dir, *bad]))


def test_advise(image_dir, tmp_path):
    from pipelines.cli import advise as cmd_advise

    parser = argparse.ArgumentParser()
    cmd_advise.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "advice.json"
    args = parser.parse_args(["advise", "--input", image_dir, "--resolution", "uniform:64:256", "--draws", "400",
                              "--seq-len", "64", "128", "256", "512", "1024", "--target-padding", "0.03",
                              "--json", str(out)])
    assert args.func(args) == 0
    a = json.loads(out.read_text())
    rec, rows = a["recommended"], a["candidates"]
    assert [r["seq_len"] for r in rows] == [64, 128, 256, 512, 1024]
    fits = [r for r in rows if r["padding"] <= 0.03 and r["shrunk"] <= a["max_shrunk"]]
    if fits:
        assert rec["meets_target"] and rec["seq_len"] == fits[0]["seq_len"] and rec["padding"] <= 0.03
    else:
        assert not rec["meets_target"]
    for r in rows:
        assert 1 <= r["max_images_per_seq"] <= r["seq_len"] and r["padding"] >= r["padding_bound"] - 1e-12
    assert rows[0]["shrunk"] > 0  # 256-pixel draws need 256 tokens, more than L=64


def test_report_html(tmp_path):
    pytest.importorskip("pyarrow")
    import schemas
    from pipelines.cli import report

    config = packer.PackConfig(seq_len=64, patch_size=16, resolution="uniform:32:128", token_drop="beta:0.3:0.8")
    rng = np.random.default_rng(0)
    images = []
    for i in range(40):
        h, w = int(rng.integers(20, 200)), int(rng.integers(20, 200))
        px = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(px).save(buf, format="PNG")
        images.append(packer.prepare_image(buf.getvalue(), f"im{i}", config, label=i % 3))
    records = list(packer.pack_patched(images, config))
    data = tmp_path / "ds"
    schemas.write_dataset(str(data), records, config=config, fmt="parquet", num_shards=3)
    page = report.write_report(str(data), str(tmp_path / "out" / "report.html"))
    text = open(page, encoding="utf-8").read()
    srcs = re.findall(r'<img src="([^"]+)"', text)
    assert len(srcs) == 7
    for src in srcs:
        with Image.open(os.path.join(os.path.dirname(page), src)) as im:
            assert im.format == "PNG" and im.size[0] >= 400
    stats = report.collect(str(data))
    assert len(stats["images"]["grid_h"]) == 40 and len(stats["shards"]) == 3
    assert sum(s["sequences"] for s in stats["shards"]) == len(records)
    from pipelines import cli

    assert cli.main(["stats", str(data), "--report", str(tmp_path / "cli" / "stats.html")]) == 0
    assert len(os.listdir(tmp_path / "cli" / "stats_files")) == 7


def test_results_sections_kept_and_missing_modules_skipped(tmp_path):
    path = str(tmp_path / "RESULTS.md")
    run_all.write_results({"packing": "## Packing efficiency\n\nfirst\n"}, path)
    run_all.write_results({"formats": "## Formats\n\nsecond\n"}, path)
    text = open(path).read()
    assert "first" in text and "second" in text and "Not run yet" in text
    assert "Skipped" in run_all.module_section("no_such_benchmark")
    # A section no benchmark writes (added by hand) survives a rerun, in its place.
    with open(path, "a") as f:
        f.write("<!-- bench: by_hand -->\n## By hand\n\nthird\n")
    run_all.write_results({"formats": "## Formats\n\nfourth\n"}, path)
    text = open(path).read()
    assert "first" in text and "fourth" in text and "second" not in text and "third" in text
    names = re.findall(r"<!-- bench: (\w+) -->", text)
    assert names[-1] == "by_hand" and sorted(names[:-1]) == sorted(run_all.BENCHMARKS)


def _bench_child(module: str, params) -> dict:
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", module, "--child", json.dumps(params)], capture_output=True, text=True,
                         cwd=root, env={**os.environ, "PYTHONPATH": root}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_stream_and_scaling_measurements_run(image_dir, tmp_path):
    """The measurements behind the streaming and scaling tables run against today's stream and batch job
    (they read the pool's workers and the job's processes; a rename there must not leave them broken)."""
    flat = tmp_path / "flat"
    flat.mkdir()
    for sub in sorted(os.listdir(image_dir)):
        for name in sorted(os.listdir(os.path.join(image_dir, sub))):
            (flat / f"{sub}_{name}").write_bytes(open(os.path.join(image_dir, sub, name), "rb").read())
    stream = _bench_child("benchmarks.streaming", ["stream", [str(flat), 1, 20, 1, 2]])
    assert stream["images"] >= 20 and stream["main_cpu_us_per_image"] > 0 and stream["workers_cpu_us_per_image"] > 0
    job = _bench_child("benchmarks.scaling", [str(flat), str(tmp_path / "out"), "1", "1", "tfrecord", "uniform:64:256",
                                              "256", "0"])
    assert job["images"] == len(SIZES) and job["main_cpu"] > 0 and len(job["worker_cpu"]) == 1
    from benchmarks import main_cpu  # the steady-state main CPU: distinct linked files, a stream run apiece

    linked = main_cpu.linked_copies(str(flat), 2, str(tmp_path / "linked"))
    assert sorted(os.listdir(linked)) == ["c000", "c001"] and len(os.listdir(os.path.join(linked, "c001"))) == len(SIZES)
    run = main_cpu.run(linked, 1)
    assert run["images"] == 2 * len(SIZES) and run["cpu"] > 0 and run["planner_cpu"] > 0
