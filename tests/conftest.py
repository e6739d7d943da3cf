import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


import pytest  # noqa: E402


@pytest.fixture(params=["swap", "hooks"])
def backward_path(request, monkeypatch):
    """Both ways a stage's backward reaches past weights: copied into the parameters (small
    stages, the default for the test models) and through the saved-tensor hooks (large
    stages): a test taking this fixture runs once on each."""
    if request.param == "hooks":
        import layerpipe.engine.stage as stage_module

        monkeypatch.setattr(stage_module, "SWAP_BYTES", 0)
    return request.param
