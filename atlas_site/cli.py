"""The ``dnd-atlas site`` command. Importing this module imports nothing heavy:
the parser is built on every ``dnd-atlas`` invocation."""

from __future__ import annotations

import argparse
import shlex

from query.cli import Command


def add_site_arguments(p: argparse.ArgumentParser) -> None:
    """Declare ``dnd-atlas site ATLAS --out DIR [--no-build] [--site-name NAME] [--no-semantic]``."""
    p.add_argument("atlas", help="atlas directory (or its atlas.duckdb)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder: DIR/project (mkdocs.yml + docs/) and DIR/site (built); "
                        "new, empty, or made by an earlier `dnd-atlas site` (then regenerated)")
    p.add_argument("--no-build", dest="build", action="store_false",
                   help="only write the mkdocs project, do not run `mkdocs build`")
    p.add_argument("--site-name", metavar="NAME", help="site title (default: from the atlas name)")
    p.add_argument("--no-semantic", dest="semantic", action="store_false",
                   help="keyword search only: leave out the in-browser semantic search "
                        "(its embedder and runtime, ~90 MB loaded on the first search)")


def run_site(args: argparse.Namespace) -> int:
    """Generate (and build) the site, then say where it is and how to open or publish it."""
    from atlas_site.build import PROJECT_DIR, SITE_DIR, build_site

    path = build_site(args.atlas, args.out, site_name=args.site_name, build=args.build,
                      semantic=args.semantic)
    out = path.parent
    project = out / PROJECT_DIR
    print(f"mkdocs project: {project}")
    if args.build:
        print(f"site: {out / SITE_DIR}")
        print(f"open it: python -m http.server -d {shlex.quote(str(out / SITE_DIR))} "
              "then http://127.0.0.1:8000/")
    else:
        print(f"build it: cd {shlex.quote(str(project))} && mkdocs build")
    print(f"publish to GitHub Pages: cd {shlex.quote(str(project))} && mkdocs gh-deploy")
    return 0


SITE = Command("site", "render an atlas into an mkdocs-material site (GitHub Pages ready)",
               add_site_arguments, run_site, 80)
