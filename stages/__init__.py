"""One module per stage (ingest, regenerate, cache_teacher, train_student, eval, demo)."""
