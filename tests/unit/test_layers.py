"""Serving never imports training: loading the server's modules in a fresh interpreter
leaves the exit trainer and the exit report unimported (negative control: importing the
CLI's train-exits entry point does import it, so the check can see it)."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
{imports}
print(",".join(sorted(m for m in sys.modules if m.startswith("tandem.training"))))
"""


def loaded(imports: str) -> str:
    done = subprocess.run([sys.executable, "-c", CHECK.format(imports=imports)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_serving_does_not_import_training():
    serving = "import tandem.deploy.serve, tandem.deploy.models, tandem.deploy.exits, tandem.services.router, tandem.actors.engine"
    assert loaded(serving) == ""
    assert loaded("from tandem.training.train_exits import main") == "tandem.training,tandem.training.data,tandem.training.train_exits"


def test_light_exit_lookup_names_the_same_manifest_as_the_adapters():
    from tandem.actors.exit_adapters import MANIFEST
    from tandem.deploy import exits

    assert exits.MANIFEST == MANIFEST
