"""The Describe-and-Dissect builder: probe sets, targets, the pipeline stages
and the writing of atlases. Heavy modules (torch) are imported by the stage
modules, never here, so the CLI can parse arguments without them."""
