"""Where the teacher's signal comes from, so the teacher need not be in training memory.

``teacher.source``: ``live`` — the teacher model in the training process (hidden states and LM
head, the fused dense loss); ``cache`` — its top-k log-probabilities read from disk
(:mod:`potstill.teachers.cache`, written by ``potstill cache``), no teacher model loaded at all.
"""
