"""The ``on_policy`` section of the run configuration (``llavadi on-policy``, issue #24): its own module so
``pipeline/config.py`` stays readable; ``LlavadiConfig.on_policy`` holds it and the README's key table reads
the comments below like any other section's (``pipeline/config_doc.py``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional


@dataclass
class OnPolicyConfig:
    """``llavadi on-policy``: rounds of (the student answers → the teacher scores exactly those tokens → the
    student continues training), each round a set of resumable stages under ``RUN/on_policy/round_<r>/``."""

    rounds: int = 1  # rounds to run (--rounds); a later launch with more rounds continues after the finished ones
    # round 1's generator and starting state: trained = train-student's final checkpoint on the base cache
    # (weights, optimizer, scheduler, projector, RNG carried on); initial = train_student.student, a fresh start
    start: Literal["trained", "initial"] = "trained"
    # prompts drawn per round (seeded, without replacement within a round) from the base cache's samples; 0 = all
    prompts_per_round: int = 0
    # lambda: the share of a round's prompts the student re-answers (GKD's on-policy fraction); the others keep
    # the base cache's (teacher) answers
    fraction: float = 1.0
    # how a round trains: shuffle = the re-answered samples (round cache) and the other prompts' base-cache
    # samples shuffled together, one pass; on_policy_only = the round cache alone
    mix: Literal["shuffle", "on_policy_only"] = "shuffle"
    engine: Literal["hf", "vllm"] = "hf"  # what generates the student's answers (transformers generate, or vLLM)
    temperature: float = 1.0  # sampling temperature of the student's answers (0 = greedy; the study's align_on_policy: 1.0)
    max_new_tokens: int = 64  # per answer turn (the study's align_on_policy: 64)
    # round r's seed = a hash of (seed, r): its prompt draw, answer sampling and shuffle differ per round; recorded
    # in round_<r>/round.json and every generated row
    seed: int = 0
    # learning rate in the rounds, constant (a round's step count is known only once its answers are scored, so
    # no schedule can span the rounds); null = train_student.lr. The scheduler's step count carries on
    lr: Optional[float] = None

    def validate(self) -> list[str]:
        p = []
        if self.rounds < 1:
            p.append("on_policy.rounds must be >= 1")
        if self.prompts_per_round < 0:
            p.append("on_policy.prompts_per_round must be >= 0 (0 = all)")
        if not 0 < self.fraction <= 1:
            p.append("on_policy.fraction must be in (0, 1]")
        if self.temperature < 0:
            p.append("on_policy.temperature must be >= 0")
        if self.max_new_tokens < 1:
            p.append("on_policy.max_new_tokens must be >= 1")
        if self.lr is not None and not self.lr > 0:
            p.append("on_policy.lr must be > 0 (or null: train_student.lr)")
        return p
