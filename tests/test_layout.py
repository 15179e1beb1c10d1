"""The package layout keeps its promises: plain nets and layers import no Lightning, and the LightningModules'
class paths resolve as the configs (and old run folders' config.yaml) name them."""

import subprocess
import sys

import pytest

from tests.conftest import ROOT

PROBE = """
import sys
import lightning_modules.layers, lightning_modules.nets
from lightning_modules.layers import KWinners
from lightning_modules.nets import DepthCNN
DepthCNN(depth=3)(__import__("torch").zeros(1, 1, 28, 28))
print(sorted(m for m in ("pytorch_lightning", "lightning", "lightning_fabric", "torchmetrics", "wandb") if m in sys.modules))
"""


@pytest.mark.subprocess
def test_nets_and_layers_import_no_lightning_in_a_fresh_process():
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_the_package_exports_resolve_on_first_use():
    import lightning_modules
    from lightning_modules.classifier import Classifier

    assert lightning_modules.Classifier is Classifier
    assert {"Classifier", "Student", "LearnedSize", "UserError"} <= set(dir(lightning_modules))
    with pytest.raises(AttributeError, match="no attribute 'Clasifier'"):
        lightning_modules.Clasifier  # noqa: B018
