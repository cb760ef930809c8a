"""Teacher engines: generation (``generate``: vLLM, the fast path, or HF transformers, the reference)
and teacher forcing (``forcing``), both over the family layer's ``ModelAdapter``; ``common`` holds
what they share. vLLM is imported inside the engines only (design §2)."""
