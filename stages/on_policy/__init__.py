"""On-policy distillation in offline rounds (issue #24): ``rounds.run_on_policy`` (the command),
``generate.GenerateStage`` (the student's answers as sampled ids), ``plan`` (directories, seeds, prompts,
starts, fingerprint chain)."""
