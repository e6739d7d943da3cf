import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


import pytest  # noqa: E402


@pytest.fixture(params=["swap", "hooks"])
def backward_path(request, monkeypatch):
    """Both ways a stage's backward reaches past weights: the version's storage swapped into the
    parameters (the default where torch can swap storages) and the saved-tensor hooks (older
    torch, autocast, tied parameters): a test taking this fixture runs once on each."""
    if request.param == "hooks":
        import layerpipe.engine.stage as stage_module

        monkeypatch.setattr(stage_module, "swap_storages", None)
    return request.param
