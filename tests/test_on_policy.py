"""``llavadi on-policy`` (issue #24) on the tiny models: the round cache equals an independent teacher forward
on the student's sampled ids; greedy generations equal HF ``generate`` from the previous round's checkpoint;
two rounds equal one continued run over the same batches; SIGKILL in each part of a round + the same command =
the uninterrupted round; the sampled-id splice and its rejects; the tokenizer refusal; a vLLM round = the HF round (greedy)."""
import json
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import cli, kill_when, status_json, tree_bytes

MAX_NEW = 6
# small learning rates: a few steps at 1e-3 already teach the tiny student to answer "</s>" first, and the
# tests want varied greedy answers (cut ones, multi-turn ones)
TRAIN = ["train_student.batch_size=4", "train_student.micro_batch_size=2", "train_student.shuffle_buffer=8",
         "train_student.lr=1e-5", "train_student.keep_checkpoints=10"]
ROUNDS = ["on_policy.prompts_per_round=12", "on_policy.fraction=0.5", "on_policy.temperature=0",
          f"on_policy.max_new_tokens={MAX_NEW}", "on_policy.lr=2e-5", "train_student.save_every_steps=1"]


def config(run: Path, *extra: str):
    from llavadi.pipeline.session import resolve

    return resolve(run, None, ["run.executor=local"], [*TRAIN, *ROUNDS, *extra])


@pytest.fixture(scope="module")
def base(cached_run, tmp_path_factory):
    """cached_run + train-student for 2 steps: what round 1 continues."""
    run = tmp_path_factory.mktemp("op") / "base"
    shutil.copytree(cached_run[0], run)
    cli("train-student", run, "--student", cached_run[1], "--executor", "local", *TRAIN, "train_student.max_steps=2")
    return run


@pytest.fixture(scope="module")
def rounds2(base, tmp_path_factory):
    """Two on-policy rounds, in this process."""
    from llavadi.stages.on_policy.rounds import run_on_policy

    run = tmp_path_factory.mktemp("op2") / "run"
    shutil.copytree(base, run)
    infos = run_on_policy(run, config(run, "on_policy.rounds=2"), progress=False)
    return run, infos


def rows(run: Path, r: int) -> list[dict]:
    from llavadi.schemas.samples import iter_samples

    d = run / "on_policy" / f"round_{r}" / "generate"
    return [row for f in sorted(d.glob("part-*.parquet")) for row in iter_samples(f)]


def final_ckpt(run: Path, part: str) -> Path:
    sd = run / part
    return sd / "checkpoints" / json.loads((sd / "_stage.json").read_text())["final_checkpoint"]


def weights(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(ckpt / "model.safetensors")


# ------------------------------------------------------------------ the round's parts, end to end


def test_rounds_chain_and_status(rounds2):
    run, infos = rounds2
    assert [i["round"] for i in infos] == [1, 2]
    r1, r2 = (json.loads((run / "on_policy" / f"round_{r}" / "round.json").read_text()) for r in (1, 2))
    assert r1["seed"] != r2["seed"] and r1["prompts"] == {"on_policy": 6, "base": 6}
    assert r1["init"] == str(final_ckpt(run, "train_student"))
    assert r2["init"] == r1["final_checkpoint"] == str(final_ckpt(run, "on_policy/round_1/train_student"))
    assert r2["previous"] == r1["fingerprints"]["train_student"]  # round 2 chains round 1
    assert len(r1["generator"]["weights_sha256"]) == 64 and r1["generator"]["weights_sha256"] != \
        r2["generator"]["weights_sha256"]
    st = status_json(run)["stages"]
    for r in (1, 2):
        for part in ("generate", "cache_teacher", "train_student"):
            assert st[f"on_policy/round_{r}/{part}"]["complete"], (r, part)
    gen = st["on_policy/round_1/generate"]["samples"]
    assert gen["in"] == 6 and gen["out"] + gen["rejected"] == 6
    steps = [st[f"on_policy/round_{r}/train_student"]["steps_done"] for r in (1, 2)]
    assert 2 < steps[0] < steps[1]  # the step count carries on from train-student's 2
    # the same command again: every part is a no-op
    from llavadi.stages.on_policy.rounds import run_on_policy

    def outputs():
        return {k: v for k, v in tree_bytes(run / "on_policy").items() if not k.endswith("_lock.json")}

    before = outputs()
    run_on_policy(run, config(run, "on_policy.rounds=2"), progress=False)
    assert outputs() == before


def conversation_inputs(proc, root: Path, row: dict, turns: int):
    """The sequence built here from the student's ids: the prompt of turn 0 from the processor, then for each of
    the first ``turns`` answers its sampled ids (+ the template's ``</s>`` when the answer has none) and the
    template's next human turn, tokenised after a ``</s>`` (as it stands in the conversation) — the prompt of
    answer ``turns``, or the whole conversation. Returns (forward inputs, answer token positions, answer ids)."""
    from PIL import Image

    tok, eos = proc.tokenizer, proc.tokenizer.eos_token_id
    conv = row["conversations"]
    text = tok.apply_chat_template([{"role": "user", "content": conv[0]["value"]}], tokenize=False,
                                   add_generation_prompt=True)
    kw = {"images": [Image.open(root / row["image"]).convert("RGB")]} if row["image"] else {}
    inp = proc(text=[text], return_tensors="pt", **kw)
    ids = inp["input_ids"][0].tolist()
    pos, ans = [], []
    for t, a in enumerate(row["answer_token_ids"][:turns]):
        pos += list(range(len(ids), len(ids) + len(a)))
        ans += list(a)
        ids += list(a) + ([] if a[-1] == eos else [eos])
        if t + 1 < len(conv) // 2:
            ids += tok("</s>USER: " + conv[2 * t + 2]["value"] + " ASSISTANT:", add_special_tokens=False)["input_ids"][1:]
    inp["input_ids"] = torch.tensor([ids])
    inp["attention_mask"] = torch.ones_like(inp["input_ids"])
    return inp, pos, ans


def hf_greedy_turns(run: Path, r: int, gen: Path, root: Path) -> int:
    """Assert every turn of every row round ``r`` generated = transformers ``generate`` from ``gen`` on the prompt
    built here (``conversation_inputs``); returns how many later turns (prompts holding spliced ids) were checked."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    proc = AutoProcessor.from_pretrained(gen)
    model = LlavaForConditionalGeneration.from_pretrained(gen, dtype=torch.float32).eval()
    eos = proc.tokenizer.eos_token_id
    got = rows(run, r)
    assert got, f"round {r} generated nothing"
    later_turns = 0
    for row in got:
        for t, answer in enumerate(row["answer_token_ids"]):
            inp, _, _ = conversation_inputs(proc, root, row, t)
            with torch.no_grad():
                out = model.generate(**inp, do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=eos,
                                     pad_token_id=proc.tokenizer.pad_token_id)[0, inp["input_ids"].shape[1]:].tolist()
            if eos in out:
                out = out[: out.index(eos) + 1]
            assert answer == out, (r, row["id"], t)
            assert row["turn_finish_reasons"][t] == ("stop" if out[-1] == eos else "length")
            later_turns += t > 0
    return later_turns


def test_generations_equal_hf_generate_from_the_previous_checkpoint(rounds2, cached_run):
    """Greedy: every turn of every generated row = transformers ``generate`` from round r-1's final checkpoint, on
    the prompt built here (``conversation_inputs``) — the generator's spliced prompt must be exactly that."""
    run, _ = rounds2
    later = sum(hf_greedy_turns(run, r, gen, cached_run[2]) for r, gen in
                ((1, final_ckpt(run, "train_student")), (2, final_ckpt(run, "on_policy/round_1/train_student"))))
    assert later  # prompts holding the student's earlier answers as its ids


def test_round_cache_is_an_independent_teacher_forward_on_the_sampled_ids(rounds2, cached_run, tiny_teacher):
    """Every round cache's rows = a float32 teacher forward on the sequence built here from the student's ids
    (``conversation_inputs``): answer rows at the sampled ids' positions, top-k, log-probs, hidden states."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llavadi.schemas.teacher_cache import CacheReader

    run, _ = rounds2
    root = cached_run[2]
    proc = AutoProcessor.from_pretrained(tiny_teacher)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_teacher, dtype=torch.float32).eval()
    multi = truncated = 0
    for r in (1, 2):
        by_id = {row["id"]: row for row in rows(run, r)}
        samples = list(CacheReader(run / "on_policy" / f"round_{r}" / "cache_teacher"))
        assert sorted(s["sample_id"] for s in samples) == sorted(by_id)
        for s in samples:
            row = by_id[s["sample_id"]]
            multi += len(row["answer_token_ids"]) > 1
            truncated += sum(a[-1] != 2 for a in row["answer_token_ids"])
            inp, pos, ans = conversation_inputs(proc, root, row, len(row["answer_token_ids"]))
            with torch.no_grad():
                out = model(**inp, output_hidden_states=True)
            pred = torch.tensor(pos) - 1
            logp = torch.log_softmax(out.logits[0, pred].double(), -1).numpy()
            assert s["token_ids"].tolist() == ans  # the student's ids, as sampled
            assert s["position"].tolist() == pred.tolist()
            top = np.argsort(-logp, axis=-1, kind="stable")[:, :8]
            assert (s["topk_ids"] == top).all()
            np.testing.assert_allclose(s["topk_logprobs"], np.take_along_axis(logp, top, -1), atol=2e-5)
            np.testing.assert_allclose(s["hidden"], out.hidden_states[-1][0, pred].numpy(), atol=2e-3, rtol=1e-3)
    meta = json.loads((run / "on_policy" / "round_1" / "cache_teacher" / "index.json").read_text())["meta"]
    base = json.loads((run / "cache_teacher" / "index.json").read_text())["meta"]
    assert meta["source"] == "on_policy/round_1/generate"
    assert {k: v for k, v in meta.items() if k not in ("source", "stage_fingerprint", "image_rows")} == \
        {k: v for k, v in base.items() if k not in ("source", "stage_fingerprint", "image_rows")}
    assert multi and truncated  # multi-turn rows; answers cut at max_new_tokens keep the template's </s> after them


def test_two_rounds_equal_one_continued_run_over_the_same_batches(rounds2, tmp_path, monkeypatch):
    """Round 1 then round 2 (a new process state: the model, AdamW, scheduler, projector and RNG reloaded from
    round 1's final checkpoint) = one train() continuing train-student's checkpoint over round 1's batches then
    round 2's, bit for bit."""
    from llavadi.pipeline.config import fingerprint
    from llavadi.stages.on_policy.plan import round_start
    from llavadi.stages.on_policy.rounds import round_config
    from llavadi.stages.train_student import loop
    from llavadi.stages.train_student.continuation import Continuation
    from llavadi.stages.train_student.data import Source, StepDataset, student_tokens

    run, infos = rounds2
    cfg = config(run, "on_policy.rounds=2")
    recorded, valid = [], 0
    for info in infos:
        r = info["round"]
        prompts = json.loads((run / "on_policy" / f"round_{r}" / "prompts.json").read_text())
        sources = (Source(f"on_policy/round_{r}/cache_teacher"), Source("cache_teacher", frozenset(prompts["base"])))
        scan = json.loads((run / "on_policy" / f"round_{r}" / "train_student" / "scan.json").read_text())
        rc = round_config(cfg, info["seed"]).train_student
        ds = StepDataset(run, student_tokens(rc.student, rc.prompt_format), None, batch_size=rc.batch_size,
                         micro_batch_size=rc.micro_batch_size, rank=0, world=1, seed=rc.seed, epoch=0,
                         shuffle_buffer=rc.shuffle_buffer, sources=sources)
        batches = list(ds.global_batches())[: scan["valid"] // rc.batch_size]
        recorded += batches
        valid += len(batches) * rc.batch_size

    class Concatenated(StepDataset):
        def global_batches(self, rejects=None):
            yield from recorded

    monkeypatch.setattr(loop, "StepDataset", Concatenated)
    monkeypatch.setattr(loop, "scan_samples", lambda *a, **k: ({"valid": valid, "rejected": {}}, frozenset()))
    start = round_start(run, cfg, 1)
    rcfg = round_config(cfg, infos[0]["seed"])
    cont = Continuation((Source("on_policy/round_1/cache_teacher"),), start.init, fingerprint({}, None),
                        rcfg.train_student.lr, {"test": "concatenated"})
    res = loop.train(run, rcfg, progress=False, out_dir=tmp_path / "one_run", cont=cont)
    one = json.loads((Path(res["final_checkpoint"]) / "trainer_state.json").read_text())
    two = json.loads((Path(infos[1]["final_checkpoint"]) / "trainer_state.json").read_text())
    assert one["global_step"] == two["global_step"] == infos[1]["steps"] == len(recorded) + 2
    wa, wb = weights(Path(res["final_checkpoint"])), weights(Path(infos[1]["final_checkpoint"]))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ta = torch.load(Path(res["final_checkpoint"]) / "training_state.pt", weights_only=False)
    tb = torch.load(Path(infos[1]["final_checkpoint"]) / "training_state.pt", weights_only=False)
    assert all(torch.equal(ta["projector"][k], tb["projector"][k]) for k in ta["projector"])
    assert ta["scheduler"]["last_epoch"] == tb["scheduler"]["last_epoch"] and torch.equal(ta["rng_torch"], tb["rng_torch"])
    la = [json.loads(l) for l in (tmp_path / "one_run" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l) for r in (1, 2) for l in
          (run / "on_policy" / f"round_{r}" / "train_student" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["loss"], m["lr"]) for m in la] == [(m["step"], m["loss"], m["lr"]) for m in lb]


def test_sigkill_in_each_part_then_rerun_equals_the_uninterrupted_round(rounds2, base, tmp_path):
    ref, _ = rounds2
    run = tmp_path / "run"
    shutil.copytree(base, run)
    args = ["on-policy", run, "--rounds", "1", "--executor", "local", *TRAIN, *ROUNDS]
    rd = run / "on_policy" / "round_1"
    for part, cond in (("generate", lambda: len(list((rd / "generate" / "_done").glob("*.json"))) >= 1),
                       ("cache_teacher", lambda: len(list((rd / "cache_teacher" / "_done").glob("*.json"))) >= 1),
                       ("train_student", lambda: any((rd / "train_student" / "checkpoints").glob("step_*/trainer_state.json")))):
        assert kill_when(args, cond) == -signal.SIGKILL, part
    p = cli(*args)
    assert "on-policy round 1:" in p.stdout
    for part in ("generate", "cache_teacher"):  # fingerprints, done markers, data and rejects, byte for byte
        assert tree_bytes(rd / part) == tree_bytes(ref / "on_policy" / "round_1" / part), part
    wa, wb = weights(final_ckpt(run, "on_policy/round_1/train_student")), \
        weights(final_ckpt(ref, "on_policy/round_1/train_student"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_changed_key_is_refused_naming_it(rounds2, tmp_path):
    from llavadi.pipeline.runner import StageError
    from llavadi.stages.on_policy.rounds import run_on_policy

    ref, _ = rounds2
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    with pytest.raises(StageError, match=r"changed: on_policy\.max_new_tokens"):
        run_on_policy(run, config(run, "on_policy.rounds=2", "on_policy.max_new_tokens=5"), progress=False)
    with pytest.raises(StageError, match=r"changed: .*train_student\.lr"):  # the train part names its key too
        run_on_policy(run, config(run, "on_policy.rounds=1", "on_policy.lr=1e-4"), progress=False)


# ------------------------------------------------------------------ the sampled-id splice (no training)


def test_splice_replaces_answer_spans_and_keeps_the_template_stop_after_a_cut_answer():
    from llavadi.models.answer_ids import splice, splice_inputs

    ids = [1, 9, 9, 10, 11, 2, 5, 6, 20, 2, 7]  # two answers: [10, 11, 2] and [20, 2] (2 = the stop token)
    spans = [(3, 6), (8, 10)]
    new, new_spans, edits = splice(ids, spans, [[100, 101, 2], [200]], {2})
    assert new == [1, 9, 9, 100, 101, 2, 5, 6, 200, 2, 7] and new_spans == [(3, 6), (8, 9)]
    new, new_spans, edits = splice(ids, spans, [[100]], {2})  # only the first answer given: the second shifts
    assert new == [1, 9, 9, 100, 2, 5, 6, 20, 2, 7] and new_spans == [(3, 4), (7, 9)] and edits == [(3, 5, 1)]
    mask = torch.ones(1, len(ids), dtype=torch.long)
    tt = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1]])
    out = splice_inputs({"input_ids": torch.tensor([ids]), "attention_mask": mask, "token_type_ids": tt}, edits)
    assert out["attention_mask"].tolist() == [[1] * 10] and out["token_type_ids"].tolist() == [[0, 0, 0, 1, 1, 1, 1, 1, 1, 1]]


@pytest.fixture(scope="module")
def student_adapter(cached_run):
    from llavadi.models.adapter import ModelAdapter

    return ModelAdapter(cached_run[1], "auto")


def test_turn_prompts_are_prefixes_of_the_spliced_conversation(student_adapter, cached_run):
    from PIL import Image

    from llavadi.models.answer_ids import answer_conversation, prompt_problem, turn_prompt

    ad = student_adapter
    tok = ad.tokenizer
    img = Image.new("RGB", (32, 32), (10, 200, 30))
    human = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "human", "value": "And now?"}]
    # answers that re-tokenise differently from their text: single characters, no stop token (truncated), then one
    answers = [tok.convert_tokens_to_ids(["▁g", "r", "e", "en"]), tok("Still green", add_special_tokens=False)["input_ids"] + [2]]
    turns, prompts = [], []
    for t, a in enumerate(answers):
        ids, inputs = turn_prompt(ad, turns + [human[t]], answers[:t], img)
        assert inputs["input_ids"].shape == inputs["attention_mask"].shape and inputs["pixel_values"].shape[0] == 1
        prompts.append(ids)
        turns += [human[t], {"from": "gpt", "value": tok.decode(a, skip_special_tokens=True).strip()}]
    conv = answer_conversation(ad, turns, answers, True)
    assert prompt_problem(conv, prompts) is None
    assert [conv.ids[s:e] for s, e in conv.spans] == answers
    assert conv.ids[conv.spans[0][1]] == 2  # the template's </s> after the truncated answer, outside its span
    enc = ad.encode(conv, img)
    assert enc.answer_ids == answers[0] + answers[1] and len(enc.ids) == enc.inputs["input_ids"].shape[1]
    assert enc.inputs["attention_mask"].shape == enc.inputs["input_ids"].shape


@pytest.mark.parametrize("ids,reason", [([], "empty_generation"),
                                        ([450, 32000, 2], "special_token_in_answer"),
                                        ([450, 1, 2], "special_token_in_answer"),
                                        ([450, 32050], "token_out_of_vocab")])
def test_answers_the_format_cannot_hold_are_rejected(student_adapter, ids, reason):
    """(An answer that is only its stop token is kept: ``test_an_answer_of_only_a_stop_token_is_kept``.)"""
    from llavadi.models.answer_ids import answer_text
    from llavadi.schemas.samples import Reject

    with pytest.raises(Reject) as e:
        answer_text(student_adapter, ids)
    assert e.value.reason == reason


def test_an_answer_of_only_a_stop_token_is_kept(student_adapter):
    from llavadi.models.answer_ids import answer_conversation, answer_text

    turns = [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": answer_text(student_adapter, [2])}]
    conv = answer_conversation(student_adapter, turns, [[2]], False)
    (s, e), = conv.spans
    assert conv.ids[s:e] == [2] and e == len(conv.ids)


def test_student_and_teacher_must_share_the_tokenizer(base, tmp_path):
    from llavadi.stages.demo.tiny_models import STUDENT, VICUNA_SYSTEM, build_tiny_llava
    from llavadi.stages.demo.vocab import build_demo_tokenizer
    from llavadi.stages.on_policy.rounds import tokenizer_problems

    other = build_tiny_llava(tmp_path / "other", STUDENT, tokenizer=build_demo_tokenizer(VICUNA_SYSTEM))
    cfg = config(base)
    (msg,) = tokenizer_problems(cfg, other)
    assert str(other) in msg and str(cfg.teacher.model) in msg and "one tokenizer" in msg
    assert tokenizer_problems(cfg, final_ckpt(base, "train_student")) == []


def test_a_vllm_round_answers_as_transformers_generate(base, cached_run, tmp_path):
    """on_policy.engine=vllm (through the CLI: vLLM's CPU backend pins the threads of the process that loads it),
    greedy, every drawn prompt re-answered: every turn = transformers ``generate`` from the generator (the spliced
    prompt goes to vLLM as text-level ids with the image; vLLM expands the placeholder)."""
    run = tmp_path / "run"
    shutil.copytree(base, run)
    cli("on-policy", run, "--rounds", "1", "--executor", "local", *TRAIN, *ROUNDS, "on_policy.engine=vllm",
        "on_policy.fraction=1.0")
    assert hf_greedy_turns(run, 1, final_ckpt(run, "train_student"), cached_run[2])  # later turns were checked
    assert json.loads(rows(run, 1)[0]["sampling"])["engine"] == "vllm"


def test_a_lora_student_continues_through_a_round(cached_run, tmp_path):
    """LoRA: round 1 answers with train-student's merged final student and continues its adapter state; the
    round's last checkpoint holds the adapter and the merged student again."""
    from llavadi.stages.on_policy.rounds import run_on_policy

    run = tmp_path / "run"
    shutil.copytree(cached_run[0], run)
    lora = ["train_student.lora.enabled=true", "train_student.lora.rank=4"]
    cli("train-student", run, "--student", cached_run[1], "--executor", "local", *TRAIN, *lora, "train_student.max_steps=1")
    (info,) = run_on_policy(run, config(run, *lora, "on_policy.prompts_per_round=8"), progress=False)
    final = Path(info["final_checkpoint"])
    assert info["steps"] == 1 + info["samples"] // 4
    assert (final / "adapter" / "adapter_model.safetensors").exists() and (final / "model.safetensors").exists()
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["round_start_step"] == 1 and state["global_step"] == info["steps"]
