"""The Describe-and-Dissect pipeline, one module per stage, in method order
(DESIGN.md section 2):

- ``record``: step 0, hooks over the probe set, a streaming top-K per neuron;
- ``crops``: step 1, attention crops re-ranked into each neuron's evidence;
- ``describe``: step 2, captions of the evidence, candidate concepts;
- ``dissect`` (+ ``scoring``): step 3, generated images recorded and scored;
- ``labels``: step 4, labels, polysemantic multi-labels, interpretability;
- ``write``: step 5, thumbnails, rows and label vectors for the atlas.

``run`` is the loop every labeler uses (``run.build``); ``dnd`` and
``clip_dissect`` are the labelers (``labeler.Labeler``), ``records`` the
records the stages pass, ``neurons`` which neurons a run covers, ``resume``
what a resumed build must agree with, ``plan`` the dry run and ``shards``
the scale-out over Ray.
"""
