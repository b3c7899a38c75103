"""The synthetic world: procedural scenes with exact ground truth, and the
backends built on it (the ``oracle`` captioner, the ``procedural``
generator, the ``planted`` and ``demo-cnn`` targets; named in
``builder.backends.builtin``)."""
