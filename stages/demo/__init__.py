"""``llavadi demo``: the whole pipeline on tiny local models and a synthetic visual-QA task."""
