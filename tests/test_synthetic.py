import hashlib
import json

from llavadi.stages.demo.synthetic_vqa import COLOURS, NUMBER_WORDS, SHAPES, generate


def _digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_arguments_same_bytes_and_different_seed_differs(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate(a, 60, seed=1)
    generate(b, 60, seed=1)
    generate(c, 60, seed=2)
    assert _digest(a) == _digest(b)
    assert _digest(a)["train.json"] != _digest(c)["train.json"]


def test_records_are_llava_format_with_every_kind(tmp_path):
    recs = json.loads(generate(tmp_path, 300, seed=0).read_text())
    assert len(recs) == 300 and len({r["id"] for r in recs}) == 300
    text_only = [r for r in recs if "image" not in r]
    multi = [r for r in recs if len(r["conversations"]) > 2]
    assert 10 < len(text_only) < 60 and len(multi) > 30
    answers = set()
    for r in recs:
        conv = r["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert sum(t["value"].count("<image>") for t in conv) == (1 if "image" in r else 0)
        if "image" in r:
            assert (tmp_path / r["image"]).exists() and conv[0]["value"].startswith("<image>\n")
        answers |= {t["value"] for t in conv[1::2]}
    # answers come from the task's small vocabulary (colours, counts, yes/no, positions, objects)
    words = set(COLOURS) | set(NUMBER_WORDS) | set(SHAPES) | {"yes", "no", "top", "bottom", "left", "right"}
    assert all(set(a.split()) <= words for a in answers)
    assert len(answers) > 20
