"""notebooks/registry_tour.ipynb runs, top to bottom, against a store this test builds."""

from __future__ import annotations

import pytest

from tests.conftest import ROOT, TINY_RECIPE, run_kiln

pytestmark = pytest.mark.integration


def test_registry_tour_notebook_runs(tiny_run, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for overrides in ([], ["--set", "quantize.method=none"]):
        run_kiln("run", str(TINY_RECIPE), *overrides, artifacts=tiny_run["artifacts"], env={"MLFLOW_TRACKING_URI": store}, check=True)
    run_kiln("promote", "tiny-llama-int4", "1", "--to", "staging", artifacts=tiny_run["artifacts"],
             env={"MLFLOW_TRACKING_URI": store}, check=True)

    # the kernel inherits this process's environment; like `kiln`, the notebook finds the embedded
    # store through KILN_ARTIFACTS alone
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("KILN_ARTIFACTS", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    nb = nbformat.read(ROOT / "notebooks" / "registry_tour.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    tables = [o["data"]["text/plain"] for o in outputs if o.output_type == "execute_result" and "text/plain" in o.get("data", {})]
    assert any("tiny-llama-int4" in t and "rtn" in t and "none" in t for t in tables), tables  # both versions tabulated
    assert any("@staging" in t for t in tables)
    assert any("promote" in t and "accepted" in t for t in tables)  # the audit log
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the accuracy vs speed plot
