"""The synthetic worlds (``shapes``, the demo's, and ``marks``): procedural
scenes with exact ground truth, and the backends built on them. Importing
this package registers the ``oracle`` captioner, the ``procedural``
generator and the ``planted``, ``demo-cnn``, ``planted-marks`` and
``marks-cnn`` targets."""

from builder.synthetic import demo_cnn, generator, marks_cnn, oracle, planted, planted_marks  # noqa: F401
