"""``llavadi regenerate`` with the real vLLM CPU engine and the HF engine on the tiny teacher."""
import json
import shutil
import signal

import pytest
import torch

from llavadi.schemas.samples import iter_samples

from conftest import cli, kill_when, status_json, tree_bytes

pytestmark = pytest.mark.vllm
FAST = ["regenerate.sampling.max_new_tokens=8", "regenerate.block_size=16"]


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, synth, tiny_teacher):
    train, root = synth
    run = tmp_path_factory.mktemp("regen") / "base"
    cli("ingest", run, "--input", train, "--image-root", root, "--shard-size", "40", "--executor", "local",
        "ingest.inputs=" + json.dumps([str(train)]))
    return run


def fresh(ingested, tmp_path, name="run"):
    run = tmp_path / name
    shutil.copytree(ingested, run)
    return run


def rows(run):
    return [r for f in sorted((run / "regenerate").glob("part-*.parquet")) for r in iter_samples(f)]


def regen(run, teacher, *extra, check=True, env=None, executor="local"):
    return cli("regenerate", run, "--teacher", teacher, "--executor", executor, *FAST, *extra, check=check,
               env=env, timeout=900)


def cached_tokens(run) -> list[int]:
    """Per shard: prompt tokens the vLLM engine served from its prefix cache."""
    return [json.loads(f.read_text())["prompt_tokens_cached"]
            for f in sorted((run / "regenerate" / "stats").glob("*.json"))]


def test_greedy_vllm_and_hf_give_identical_tokens(ingested, tmp_path, tiny_teacher):
    """Also: vLLM's prefix cache (on by default) serves prompt tokens and changes no answer."""
    a, b = fresh(ingested, tmp_path, "vllm"), fresh(ingested, tmp_path, "hf")
    c = fresh(ingested, tmp_path, "vllm-no-prefix-cache")
    regen(a, tiny_teacher, "--engine", "vllm", "regenerate.sampling.temperature=0")
    regen(b, tiny_teacher, "--engine", "hf", "regenerate.sampling.temperature=0")
    regen(c, tiny_teacher, "--engine", "vllm", "regenerate.sampling.temperature=0", "teacher.prefix_caching=false")
    ra, rb, rc = rows(a), rows(b), rows(c)
    assert len(ra) == len(rb) == 120
    assert [r["conversations"] for r in ra] == [r["conversations"] for r in rb] == [r["conversations"] for r in rc]
    assert [r["turn_num_tokens"] for r in ra] == [r["turn_num_tokens"] for r in rb]
    # each shard: 40 samples in blocks of 16 sharing the system prompt, multi-turn prompts that
    # repeat the conversation so far; at least one 32-token block per block of 16 after the first call
    assert len(cached_tokens(a)) == 3 and min(cached_tokens(a)) >= 32 * 16
    assert cached_tokens(c) == [0, 0, 0]
    # every assistant turn was re-answered, human turns and order kept
    for r in ra:
        conv, orig = r["conversations"], r["original_conversations"]
        assert [t["value"] for t in conv[0::2]] == [t["value"] for t in orig[0::2]]
        assert len(r["turn_finish_reasons"]) == len(conv) // 2
    assert sum(r["image"] is None for r in ra) > 0 and sum(r["image"] is not None for r in ra) > 0
    assert json.loads(ra[0]["sampling"])["temperature"] == 0.0
    t = json.loads(ra[0]["teacher"])
    assert t["name"] == "teacher" and len(t["weights"]) == 16
    st = status_json(a)["stages"]["regenerate"]
    assert st["complete"] and st["samples"]["out"] == 120
    gen = st["generation"]  # summed from stats/: checked against the rows and the per-shard files
    assert gen["generated_tokens"] == sum(sum(r["turn_num_tokens"]) for r in ra) > 0
    assert gen["prompt_tokens_cached"] == sum(cached_tokens(a)) and gen["generated_tokens_per_s"] > 0
    assert f"regenerate: {gen['generated_tokens']} tokens generated" in cli("status", a).stdout


def test_turn_two_is_conditioned_on_the_teachers_own_turn_one(ingested, tmp_path, tiny_teacher, synth):
    """Greedy: the stored turn-2 answer is what the teacher generates for the prompt that holds
    *its own* turn-1 answer (recomputed here with HF), not the original answer."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    _, root = synth
    run = fresh(ingested, tmp_path)
    regen(run, tiny_teacher, "--engine", "hf", "regenerate.sampling.temperature=0")
    multi = [r for r in rows(run) if len(r["conversations"]) >= 4 and r["image"]][:8]
    assert multi
    proc = AutoProcessor.from_pretrained(tiny_teacher)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_teacher, dtype=torch.float32).eval()

    def greedy(turns, image):
        msgs = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in turns]
        prompt = proc.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        inp = proc(text=[prompt], images=[image], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inp, max_new_tokens=8, do_sample=False)
        return prompt, proc.tokenizer.decode(out[0, inp["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    discriminative = []
    for r in multi:
        img = Image.open(root / r["image"]).convert("RGB")
        conv, orig = r["conversations"], r["original_conversations"]
        prompt, own = greedy(conv[:3], img)
        assert conv[1]["value"] in prompt and f"ASSISTANT: {conv[1]['value']}</s>USER: {conv[2]['value']}" in prompt
        assert own == conv[3]["value"]
        _, with_original = greedy(orig[:3], img)
        discriminative.append(with_original != conv[3]["value"] and orig[1]["value"] != conv[1]["value"])
    # a random tiny teacher often repeats itself whatever the history: the check above only proves the
    # conditioning where the original history gives a different answer — at least one row must
    assert any(discriminative)


def test_sigkill_mid_stage_then_rerun_is_identical_with_sampling(ingested, tmp_path, tiny_teacher):
    """Temperature 1 with per-sample seeds: the reference runs on Ray, the killed/resumed one
    in-process — byte-identical shards."""
    ref = fresh(ingested, tmp_path, "ref")
    regen(ref, tiny_teacher, "regenerate.seed=7", executor="ray",
          env={"RAY_AUTH_MODE": "disabled"})
    run = fresh(ingested, tmp_path, "killed")
    done = run / "regenerate" / "_done"
    rc = kill_when(["regenerate", run, "--teacher", tiny_teacher, "--executor", "local", *FAST, "regenerate.seed=7"],
                   lambda: done.exists() and len(list(done.glob("*.json"))) >= 1)
    assert rc == -signal.SIGKILL
    assert len(list(done.glob("*.json"))) < 3
    p = regen(run, tiny_teacher, "regenerate.seed=7")
    assert "already done" in p.stdout
    assert tree_bytes(run / "regenerate") == tree_bytes(ref / "regenerate")
    # the prefix cache is emptied at each shard's start: the shard the relaunch served first (with a
    # fresh engine) took exactly as much from it as in the reference run, where it followed another shard
    assert cached_tokens(run) == cached_tokens(ref) and min(cached_tokens(ref)) > 0
    r = rows(run)
    assert json.loads(r[0]["sampling"])["temperature"] == 1.0 and len({x["id"] for x in r}) == 120


def test_reject_prompt_too_long_and_image_changed(ingested, tmp_path, tiny_teacher, synth):
    _, root = synth
    run = fresh(ingested, tmp_path)
    # break one image after ingest (e.g. storage corruption): its sha256 is no longer the one ingest recorded,
    # so that record is rejected (image_changed), not the stage
    victim = next(r for r in iter_samples(run / "data" / "part-00000.parquet") if r["image"])
    bad_root = tmp_path / "images"
    shutil.copytree(root, bad_root)
    (bad_root / victim["image"]).write_bytes(b"garbage")
    cfg = (run / "config.yaml").read_text().replace(str(root), str(bad_root))
    (run / "config.yaml").write_text(cfg)
    # the rendered prompt is ~45 tokens for one turn (system prompt + 4 image tokens); 3-turn
    # conversations exceed 70 by their last turn
    regen(run, tiny_teacher, "--engine", "vllm", "teacher.max_model_len=70")
    rej = [json.loads(l) for f in (run / "regenerate" / "rejects").glob("*.jsonl") for l in f.read_text().splitlines()]
    reasons = {r["reason"] for r in rej}
    assert reasons == {"prompt_too_long", "image_changed"}, rej
    assert [r["id"] for r in rej if r["reason"] == "image_changed"] == [victim["id"]]
    st = status_json(run)["stages"]["regenerate"]
    assert st["rejected_by_reason"]["image_changed"] == 1 and st["rejected_by_reason"]["prompt_too_long"] >= 1
    assert st["samples"]["out"] + st["samples"]["rejected"] == 120


def test_reject_truncated_and_keep_original(ingested, tmp_path, tiny_teacher):
    run = fresh(ingested, tmp_path)
    # a random teacher rarely emits EOS within 8 tokens: nearly every turn is truncated
    regen(run, tiny_teacher, "--engine", "hf", "regenerate.reject_truncated=true")
    st = status_json(run)["stages"]["regenerate"]
    assert set(st["rejected_by_reason"]) == {"truncated"} and st["rejected_by_reason"]["truncated"] >= 100
    assert st["samples"]["out"] + st["rejected_by_reason"]["truncated"] == 120
    keep = fresh(ingested, tmp_path, "keep")
    regen(keep, tiny_teacher, "--engine", "hf", "regenerate.reject_truncated=true", "regenerate.on_failure=keep_original")
    r = rows(keep)
    assert len(r) == 120
    kept = 0
    for x in r:
        for t, reason in enumerate(x["turn_finish_reasons"]):
            assert reason in ("kept_original", "stop")
            if reason == "kept_original":
                kept += 1
                assert x["conversations"][2 * t + 1] == x["original_conversations"][2 * t + 1]
                assert x["turn_num_tokens"][t] == 0
    assert kept >= 100


def test_reject_empty_generation(ingested, tmp_path, tiny_teacher):
    """A teacher whose output head is all zeros greedily emits token 0 (<unk>, a special token):
    the decoded answer is empty."""
    from safetensors.torch import load_file, save_file

    mute = tmp_path / "mute"
    shutil.copytree(tiny_teacher, mute)
    sd = load_file(mute / "model.safetensors")
    key = next(k for k in sd if k.endswith("lm_head.weight"))
    sd[key] = torch.zeros_like(sd[key])
    save_file(sd, mute / "model.safetensors", metadata={"format": "pt"})
    run = fresh(ingested, tmp_path)
    regen(run, mute, "--engine", "vllm", "regenerate.sampling.temperature=0")
    st = status_json(run)["stages"]["regenerate"]
    assert st["rejected_by_reason"] == {"empty_generation": 120}


def test_stage_problems_are_refused_before_work(ingested, tmp_path, tiny_teacher):
    run = fresh(ingested, tmp_path)
    p = cli("regenerate", run, "--executor", "local", check=False)
    assert p.returncode == 2 and "no teacher: set teacher.model=DIR" in p.stderr
    p = cli("regenerate", tmp_path / "empty", "--teacher", tmp_path, "--executor", "local", check=False)
    assert p.returncode == 2
    assert "is not a model directory" in p.stderr and "run `llavadi ingest" in p.stderr  # both, at once
    assert not (tmp_path / "empty" / "regenerate").exists()
