"""The Colab notebooks run top to bottom (nbclient, a kernel of this interpreter) on the micro configs.

They are committed without outputs; each run here starts in a fresh temporary folder.
"""

import json
import pathlib
import sys

import jax
import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "notebooks"
KERNEL = "graphgrpo-tests"
CELL_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def kernel_of_this_interpreter(tmp_path_factory):
    """A kernelspec whose kernel runs `sys.executable` (the test environment), found first on JUPYTER_PATH."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "graphgrpo_jax tests", "language": "python"}))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PATH", str(root))
        # The kernel shares this session's XLA compilation cache (tests/conftest.py): the notebooks' micro runs
        # compile the programs of the in-process micro runs. Same programs, so same results; the kernel runs
        # while this process waits, so no two processes write the cache at once.
        patch.setenv("JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir)
        patch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                     str(jax.config.jax_persistent_cache_min_compile_time_secs))
        patch.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
        yield KERNEL


def execute(name: str, kernel: str, workdir: pathlib.Path) -> nbformat.NotebookNode:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(notebook, kernel_name=kernel, timeout=CELL_TIMEOUT_S,
                   resources={"metadata": {"path": str(workdir)}}).execute()
    return notebook


def outputs(notebook: nbformat.NotebookNode, kind: str) -> list:
    """Every output of the code cells with data of MIME type `kind` (e.g. image/png)."""
    return [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs
            if kind in out.get("data", {})]


def printed(notebook: nbformat.NotebookNode) -> str:
    return "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for out in cell.outputs if out.output_type == "stream")


@pytest.mark.parametrize("name", ["relevance_quickstart.ipynb", "rewrite_quickstart.ipynb"])
def test_notebooks_are_committed_without_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


def test_relevance_quickstart_runs(kernel_of_this_interpreter, tmp_path):
    notebook = execute("relevance_quickstart.ipynb", kernel_of_this_interpreter, tmp_path)
    assert len(outputs(notebook, "image/png")) == 2  # curves + φ figure, credit heat map
    report = outputs(notebook, "text/markdown")
    assert len(report) == 1 and "plots/rl_reward_accuracy.png" in report[0]["data"]["text/markdown"]
    accuracies = json.loads(printed(notebook).strip().splitlines()[-1])
    assert sorted(accuracies) == ["rl/ood", "rl/test", "sft/ood", "sft/test"]
    assert all(0.0 <= value <= 1.0 for value in accuracies.values())


def test_rewrite_quickstart_runs(kernel_of_this_interpreter, tmp_path):
    notebook = execute("rewrite_quickstart.ipynb", kernel_of_this_interpreter, tmp_path)
    text = printed(notebook)
    table = [line.split() for line in text.splitlines() if line.startswith(("raw/", "gold/", "sft/", "rl/"))]
    assert sorted(row[0] for row in table) == sorted(f"{p}/{s}" for p in ("raw", "gold", "sft", "rl")
                                                     for s in ("test", "ood"))
    for name, accuracy, recall, relevance in table:  # relevance@k is a mean grade, 0 (Irrelevant) to 3 (Exact)
        assert 0 <= float(accuracy) <= 1 and 0 <= float(recall) <= 1 and 0 <= float(relevance) <= 3, name
    assert text.count("rewrite: ") == 6
