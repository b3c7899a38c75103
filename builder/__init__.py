"""The Describe-and-Dissect builder, by role:

- ``pipeline``: the method's stages in order and the run loop every labeler uses;
- ``backends``: what the stages call (captioners, summarizers, generators,
  similarities, targets), their interfaces and registry;
- ``evaluation``: the quality protocols of ``dnd-atlas eval`` and ``classify``;
- ``commands``: the ``dnd-atlas`` commands this package adds;
- ``synthetic``: the synthetic world, its models and backends;
- ``config``, ``probe``, ``cache``, ``errors``, ``progress``, ``data_files``:
  what they all share.

Heavy modules (torch) are imported by the stage modules, never here, so the
CLI can parse arguments without them.
"""
