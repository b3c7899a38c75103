"""The synthetic world: procedural scenes with exact ground truth, and the
backends built on it. Importing this package registers the ``oracle``
captioner, the ``procedural`` generator and the ``planted`` and ``demo-cnn``
targets."""

from builder.synthetic import demo_cnn, generator, oracle, planted  # noqa: F401
