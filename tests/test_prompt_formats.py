"""Prompt formats and LLaVA's image rule (issue #12 item 2, #13 class 3), expected strings by hand."""
from __future__ import annotations

import json

import pytest

from families.llava import build_llava15

TURNS = [{"from": "human", "value": "What is in the picture?\n<image>"}, {"from": "gpt", "value": "A cat on a mat."},
         {"from": "human", "value": "What colour is it?"}, {"from": "gpt", "value": "Orange."}]


@pytest.fixture(scope="module")
def llava15(tmp_path_factory):
    return build_llava15(tmp_path_factory.mktemp("llava15"), "student")


def test_study_preset_renders_llava_conv_vicuna_v1_string_for_string(llava15):
    """configs/llava13b_to_mobilellama2.7b.yaml → LLaVA's conv_vicuna_v1.get_prompt(), <image> moved from
    the end of the first human turn to its front (llava/train/train.py preprocess_multimodal)."""
    from llavadi.models.adapter import ModelAdapter
    from llavadi.pipeline.config import load_config, load_yaml
    from llavadi.stages.demo import tiny_models  # noqa: F401  (package import check)

    preset = load_config(load_yaml("configs/llava13b_to_mobilellama2.7b.yaml"))
    assert preset.teacher.prompt_format == "llava_v1" and preset.train_student.prompt_format == "llava_v1"
    ad = ModelAdapter(llava15, preset.teacher.prompt_format)
    expected = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                "helpful, detailed, and polite answers to the user's questions. USER: <image>\nWhat is in the "
                "picture? ASSISTANT: A cat on a mat.</s>USER: What colour is it? ASSISTANT: Orange.</s>")
    conv = ad.conversation(TURNS, True)
    assert conv.text == expected
    assert ad.prompt(TURNS[:3], True) == expected[: expected.index("Orange.")].rstrip()
    # answer tokens: each answer's text plus the </s> the format emits, one BOS at the start
    assert [ad.tokenizer.decode(conv.ids[a:b]) for a, b in conv.spans] == ["A cat on a mat.</s>", "Orange.</s>"]
    assert conv.ids[0] == ad.tokenizer.bos_token_id and conv.ids.count(ad.tokenizer.bos_token_id) == 1


def test_auto_uses_the_published_processor_template_with_structured_content(llava15):
    """llava-1.5-hf keeps its template in chat_template.json (processor level), none in the tokenizer."""
    from llavadi.models.adapter import ModelAdapter

    assert "chat_template" not in json.loads((llava15 / "tokenizer_config.json").read_text())
    ad = ModelAdapter(llava15, "auto")
    conv = ad.conversation(TURNS, True)
    assert conv.text == "USER: <image>\nWhat is in the picture? ASSISTANT: A cat on a mat. USER: What colour is it? ASSISTANT: Orange. "
    # that template ends answers with a space and no </s>: the answer is the text alone
    assert [ad.tokenizer.decode(conv.ids[a:b]) for a, b in conv.spans] == ["A cat on a mat.", "Orange."]


def test_jinja_file_prompt_format(llava15, tmp_path):
    from llavadi.models.adapter import ModelAdapter

    tpl = tmp_path / "t.jinja"
    tpl.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                   "{% if add_generation_prompt %}[assistant] {% endif %}")
    ad = ModelAdapter(llava15, str(tpl))
    assert ad.prompt(TURNS[:1], True) == "[user] <image>\nWhat is in the picture?\n[assistant] "


@pytest.mark.parametrize("turns,has_image,reason", [
    ([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Look: <image>"}], True, "image_placement"),
    ([{"from": "human", "value": "<image> a <image>"}, {"from": "gpt", "value": "x"}], True, "image_placement"),
    ([{"from": "human", "value": "<image> a"}, {"from": "gpt", "value": "x"}], False, "image_placement"),
])
def test_image_placement_rejects(turns, has_image, reason):
    from llavadi.models.prompts import place_image
    from llavadi.schemas.samples import Reject

    with pytest.raises(Reject) as e:
        place_image(turns, has_image)
    assert e.value.reason == reason


def test_image_in_a_later_human_turn_moves_to_the_front_of_the_first():
    from llavadi.models.prompts import place_image

    turns = [{"from": "human", "value": "Hello."}, {"from": "gpt", "value": "Hi."},
             {"from": "human", "value": "What is this? <image>"}, {"from": "gpt", "value": "A dog."}]
    assert [t["value"] for t in place_image(turns, True)] == ["<image>\nHello.", "Hi.", "What is this?", "A dog."]


def test_ingest_rejects_an_image_inside_an_answer():
    from llavadi.schemas.samples import Reject, validate_conversations

    with pytest.raises(Reject) as e:
        validate_conversations([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "<image> here"}], True, 1000)
    assert e.value.reason == "image_placement"


def test_unsupported_family_and_missing_template_are_refused_before_work(llava15, tmp_path):
    from llavadi.models import UnsupportedModel, family_of
    from llavadi.pipeline.config import load_config
    from llavadi.stages.regenerate import teacher_preflight

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "blip-2"}))
    with pytest.raises(UnsupportedModel, match="blip-2"):
        family_of(bad)
    assert "not a family llavadi supports" in teacher_preflight(load_config({}, [f"teacher.model={bad}"]))[0]
    # auto without any chat template: refused with the fix named
    nt = tmp_path / "notemplate"
    import shutil

    shutil.copytree(llava15, nt)
    (nt / "chat_template.json").unlink()
    probs = teacher_preflight(load_config({}, [f"teacher.model={nt}"]))
    assert probs and "prompt_format=llava_v1" in probs[0]


def test_readme_family_table_matches_the_code():
    """Every family llavadi supports has a row, and its vLLM column says what ``vllm_cpu`` says."""
    import re
    from pathlib import Path

    from llavadi.models import FAMILIES

    text = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    block = text[text.index("<!-- families:begin -->"): text.index("<!-- families:end -->")]
    rows = {m.group(1): line for line in block.splitlines() if (m := re.match(r"\| `(\w+)` \|", line))}
    types = {t for f in FAMILIES for t in f.model_types}
    assert set(rows) == types
    for f in FAMILIES:
        for t in f.model_types:
            last = rows[t].rstrip(" |").split("|")[-1].strip()
            assert last.startswith("yes") == (f.vllm_cpu is None), t


def test_a_literal_special_token_in_a_turn_is_rejected_not_truncated(llava15):
    """'</s>' inside an answer would be read as the end of the answer (the rest silently dropped)."""
    from llavadi.models.adapter import ModelAdapter
    from llavadi.schemas.samples import Reject

    ad = ModelAdapter(llava15, "llava_v1")
    for turns in ([{"from": "human", "value": "Edit it."}, {"from": "gpt", "value": "Use <s>old</s> text."}],
                  [{"from": "human", "value": "Say <pad> twice."}, {"from": "gpt", "value": "No."}]):
        with pytest.raises(Reject) as e:
            ad.conversation(turns, False)
        assert e.value.reason == "special_token_in_text"
    # the leading <image> placeholder of the image rule is not text
    assert ad.conversation([{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Yo."}], True).spans


def test_format_problems_refuse_a_template_without_the_image_and_warn_on_no_stop(llava15, tmp_path):
    from llavadi.models.adapter import ModelAdapter

    assert ModelAdapter(llava15, "llava_v1").format_problems() == ([], [])
    refuse, warn = ModelAdapter(llava15, "auto").format_problems()  # llava-1.5-hf: answers end with ' '
    assert not refuse and "no stop token" in warn[0]
    text_only = tmp_path / "text_only.jinja"  # a text-only LLM's template: image items never rendered
    text_only.write_text("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}"
                         "{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    refuse, _ = ModelAdapter(llava15, str(text_only)).format_problems()
    assert refuse and "cannot show an image" in refuse[0]
