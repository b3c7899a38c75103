"""The synthetic world: procedural scenes with exact ground truth, and the
backends built on it. Importing this package registers the ``oracle``
captioner, the ``procedural`` generator and the ``planted``, ``demo-cnn`` and
``planted-mixed`` targets."""

from builder.synthetic import demo_cnn, generator, oracle, planted, planted_dictionary  # noqa: F401
