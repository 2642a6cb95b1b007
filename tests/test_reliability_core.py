"""The hostile corpus through the core transform: each file is an image or a typed rejection, as expected."""
import packer
from hostile import write_hostile_corpus


def test_hostile_corpus_outcomes_through_prepare_image(tmp_path):
    expected = write_hostile_corpus(tmp_path)
    cfg = packer.PackConfig(resolution="uniform:64:256", max_pixels=50_000_000)
    for rel, outcome in expected.items():
        try:
            im = packer.prepare_image((tmp_path / rel).read_bytes(), rel, cfg)
            got = "packed"
            assert 1 <= im.num_tokens <= cfg.seq_len
        except packer.ImageRejected as e:
            got = "rejected"
            assert e.reason and e.detail is not None
        assert got == outcome, rel
