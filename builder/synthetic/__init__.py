"""The synthetic worlds (``shapes``, the demo's, and ``marks``): procedural
scenes with exact ground truth, and the backends built on them (the
``oracle`` captioner, the ``procedural`` generator, the ``planted``,
``demo-cnn``, ``planted-marks``, ``marks-cnn`` and ``planted-mixed`` targets; named in
``builder.backends.builtin``)."""
