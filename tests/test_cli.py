"""The pack / stats / inspect commands: one-line errors on bad options, help text, and a small end-to-end run."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from conftest import image_folder
from pipelines import cli
from pipelines.cli import options

pytest.importorskip("apache_beam")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_imgs")
    image_folder(root, 16, classes=["dogs", "cats"], seed=3, sizes=(30, 200), fmt="PNG", name="{i}.png", noise=True)
    (root / "dogs" / "bad.png").write_bytes(b"\x89PNG broken")
    return str(root)


@pytest.fixture(scope="module")
def packed(image_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_out") / "out"
    argv = ["pack", "--input", image_dir, "--output", str(out), "--seq-len", "128", "--resolution", "uniform:32:128",
            "--token-drop", "const:0.3", "--format", "parquet", "--no-progress"]
    assert cli.main(argv) == 0
    return str(out)


@pytest.mark.parametrize("flag,value", [
    ("--seq-len", "abc"), ("--seq-len", "0"), ("--patch-size", "-3"), ("--resolution", "uniform:9"),
    ("--token-drop", "beta:0.9:0.5"), ("--max-images-per-seq", "9999"), ("--packer", "magic"),
    ("--window", "x"), ("--seed", "-1"), ("--fill", "maybe"), ("--labels", "some"), ("--format", "csv"),
    ("--num-shards", "0"), ("--epochs", "two"), ("--workers", "-1"), ("--max-reject-fraction", "2"),
    ("--meta-fields", "a,,b"), ("--max-tokens-per-image", "1000"), ("--resize", "lanczos"),
])
def test_bad_option_gives_one_line_naming_it(flag, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["pack", "--input", "synthetic:4", "--output", str(tmp_path / "o"), flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"navit-pack: error: {flag}: "), err
    assert not (tmp_path / "o").exists()  # failed before any work


def test_help_gives_an_example_for_every_option(capsys):
    with pytest.raises(SystemExit):
        cli.main(["pack", "--help"])
    text = "".join(capsys.readouterr().out.split())  # help wraps lines, even inside flags
    for flag in list(options.CONFIG_FLAGS.values()) + ["--labels", "--label-field", "--meta-fields", "--format",
                                                        "--num-shards",
                                                        "--epochs", "--workers", "--input", "--output"]:
        assert f"e.g.{flag}" in text, flag


def test_beam_args_after_double_dash():
    from pipelines.cli.options import beam_args
    from pipelines.batch.beam import is_local

    args = cli.build_parser().parse_args(["pack", "--input", "a", "--output", "b", "--", "--runner", "DataflowRunner",
                                          "--project", "p"])
    beam = beam_args(args.beam_args)
    assert beam == ["--runner", "DataflowRunner", "--project", "p"] and not is_local(beam)
    assert is_local([]) and is_local(["--runner=DirectRunner"])


def test_pack_prints_summary_and_stats_agree(packed, capsys):
    cli.main(["stats", packed, "--json"])
    stats = json.loads(capsys.readouterr().out)
    manifest = json.load(open(f"{packed}/manifest.json"))
    assert stats["num_images_in"] == 17 == stats["num_images_packed"] + stats["num_rejected"]
    assert stats["rejects_by_reason"] == {"undecodable": 1}
    assert stats["num_sequences"] == manifest["num_sequences"]
    assert sum(int(k) * v for k, v in stats["images_per_sequence_histogram"].items()) == 16
    assert abs(stats["drop_rate"]["mean"] - 0.3) < 0.05
    assert stats["num_labels"] == 2
    cli.main(["stats", packed])
    table = capsys.readouterr().out
    assert "packing efficiency" in table and "undecodable" in table


def test_pack_summary_table(image_dir, tmp_path, capsys):
    assert cli.main(["pack", "--input", image_dir, "--output", str(tmp_path / "o"), "--format", "arrow",
                     "--resolution", "budget:16", "--seq-len", "64", "--no-progress"]) == 0
    out = capsys.readouterr().out
    for row in ("images in", "images packed", "images rejected", "sequences", "packing efficiency"):
        assert row in out
    assert "from folder names: 2 classes" in out
    with pytest.raises(SystemExit) as exit_info:  # a non-empty output without --overwrite: one line, exit 2
        cli.main(["pack", "--input", image_dir, "--output", str(tmp_path / "o"), "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("navit-pack: error: --output"), repr(err)


def test_reject_budget_exits_nonzero_with_one_line(image_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["pack", "--input", image_dir, "--output", str(tmp_path / "o"), "--max-reject-fraction", "0",
                  "--resolution", "budget:16", "--no-progress"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err  # raw stderr: the one line and nothing else (no progress with --no-progress)
    assert err.count("\n") == 1 and err.startswith("navit-pack: error") and "max-reject-fraction" in err, repr(err)


def test_inspect_renders_each_image_of_the_sequence(packed, tmp_path, capsys):
    out = tmp_path / "seq.png"
    assert cli.main(["inspect", packed, "--sequence", "0", "--out", str(out)]) == 0
    img = Image.open(out)
    assert img.size[0] > 300 and img.size[1] > 200
    pixels = np.asarray(img.convert("RGB"))
    assert (np.abs(pixels.astype(int) - 128).sum(-1) == 0).sum() > 0  # dropped tokens painted grey (30% dropped)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["inspect", packed, "--sequence", "100000", "--out", str(out)])
    assert exit_info.value.code == 2
    assert "--sequence" in capsys.readouterr().err


@pytest.mark.parametrize("argv,kernel", [([], "default"), (["--resize", "fast"], "fast")])
def test_resize_flag_reaches_the_config(argv, kernel):
    import argparse

    parser = argparse.ArgumentParser()
    options.add_pack_options(parser)
    assert options.config_or_error(parser.parse_args(argv)).resize == kernel


def test_labels_from_file_names_reach_the_records_and_the_summary(tmp_path, capsys):
    import schemas

    for name in ("cat_1.png", "cat_2.png", "dog_1.png", "other.png"):
        Image.new("RGB", (40, 30)).save(tmp_path / name)
    out = tmp_path / "o"
    assert cli.main(["pack", "--input", str(tmp_path), "--output", str(out), "--labels", r"filename:^([a-z]+)_\d",
                     "--seq-len", "64", "--no-progress"]) == 0
    assert r"labels              from file names by ^([a-z]+)_\d: 2 classes" in capsys.readouterr().out
    labels = {k: int(v) for r in schemas.read(str(out)) for k, v in zip(r["image_keys"][: r["num_images"]],
                                                                         r["labels"][: r["num_images"]])}
    assert labels == {"cat_1.png": 0, "cat_2.png": 0, "dog_1.png": 1, "other.png": -1}


def test_inspect_captions_give_width_by_height():
    import packer
    from pipelines.cli.inspect import image_caption

    config = packer.PackConfig(seq_len=64, patch_size=8, resolution="native")
    buf = io.BytesIO()
    Image.new("RGB", (48, 16)).save(buf, format="PNG")  # 48 wide, 16 high
    caption = image_caption(1, packer.prepare_image(buf.getvalue(), "wide.png", config))
    assert "original 48x16 (WxH)" in caption and "grid 6x2 (WxH)" in caption
