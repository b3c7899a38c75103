"""Evaluation protocols (``dnd-atlas eval``): ``synthetic`` (labels against
the synthetic world's planted concepts), ``final_layer`` (output units
against their class names), ``cosy`` (AUC on images generated from the
label) and ``classifier`` (neurons found by description, used as
classifiers); ``suite`` runs them and stores their results in the atlas,
``view`` is what they read of it."""
