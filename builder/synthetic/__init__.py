"""The synthetic worlds (``shapes``, the demo's, and ``marks``): procedural
scenes with exact ground truth, and the backends built on them (the
``oracle`` captioner, the ``procedural`` generator, the ``planted``,
``demo-cnn``, ``planted-marks`` and ``marks-cnn`` targets; named in
``builder.backends.builtin``)."""
