"""The package's import structure: layers that only import downwards, no circles, light config files.

Layers, bottom to top (a module may import its own layer and the layers below it):
  base      fileio, tokenization, checkpointing, metrics
  models    models/, sampling, mesh (sharded placement of the models' params)
  data      data/ and artifacts (what stages leave in a workdir, and its readers)
  graph, search
  rl        the RL machinery every task shares: GRPO loss, rewards, rollouts
  tasks     one module per task (prompts, parser, rewards, scoring, SFT rows), looked up by name
  eval
  train     the stages and their loop
  main      the CLI and its start-up validation
Imports are read from the source (every `import` statement, including those inside functions), so a lazy
import cannot hide an upward edge.
"""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "graphgrpo_jax"

LAYERS = (
    ("base", ("graphgrpo_jax", "graphgrpo_jax.fileio", "graphgrpo_jax.tokenization", "graphgrpo_jax.checkpointing",
              "graphgrpo_jax.metrics")),
    ("models", ("graphgrpo_jax.models", "graphgrpo_jax.sampling", "graphgrpo_jax.mesh")),
    ("data", ("graphgrpo_jax.data", "graphgrpo_jax.artifacts")),
    ("graph/search", ("graphgrpo_jax.graph", "graphgrpo_jax.search")),
    ("rl", ("graphgrpo_jax.rl",)),
    ("tasks", ("graphgrpo_jax.tasks",)),
    ("eval", ("graphgrpo_jax.eval",)),
    ("train", ("graphgrpo_jax.train",)),
    ("main", ("graphgrpo_jax.main", "graphgrpo_jax.config_validation")),
)

def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (`from a import b` counts as importing `a.b` when that is a
    module, else `a`)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                           for alias in node.names]
            else:
                continue
            edges |= {target for target in targets if target in modules and target != name}
        graph[name] = edges
    return graph


def layer_of(module: str) -> int:
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    if best is None:
        raise AssertionError(f"{module} belongs to no layer of tests/test_architecture.py: add it to LAYERS")
    return best[0]


def test_every_module_has_a_layer_and_imports_only_downwards():
    graph = import_graph()
    upward = {(source, target) for source, targets in graph.items() for target in targets
              if layer_of(target) > layer_of(source)}
    assert not upward, "upward imports: " + "; ".join(
        f"{s} ({LAYERS[layer_of(s)][0]}) -> {t} ({LAYERS[layer_of(t)][0]})" for s, t in sorted(upward))


def test_no_import_cycles():
    graph = import_graph()
    # Package __init__ files import nothing of their own here; a cycle is any strongly connected pair of modules.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


STAGES = ("graphgrpo_jax.train.sft", "graphgrpo_jax.train.rl", "graphgrpo_jax.train.evaluate",
          "graphgrpo_jax.train.distill", "graphgrpo_jax.train.rewrite", "graphgrpo_jax.train.smoke",
          "graphgrpo_jax.train.export", "graphgrpo_jax.data.prepare", "graphgrpo_jax.eval.report")


def test_no_stage_imports_another_stage():
    graph = import_graph()
    # data/prepare.py is the `data` stage and also the data layer's `load_world`, which every stage reads the
    # synthetic world through; importing it for that is reading data, not running a stage.
    edges = {(stage, target) for stage in STAGES for target in graph[stage]
             if target in STAGES and target != "graphgrpo_jax.data.prepare"}
    assert not edges, f"stages importing stages: {sorted(edges)}"


@pytest.mark.parametrize("config_file", sorted(p.stem for p in (ROOT / "configs").glob("*.py")
                                                if p.stem not in ("__init__",)))
def test_loading_a_config_loads_no_stage_and_no_heavy_library(config_file):
    """A fresh interpreter, so what other tests imported does not count."""
    probe = (f"import sys; import configs.{config_file} as c; c.get_config() if hasattr(c, 'get_config') else None; "
             f"print(' '.join(sorted(m for m in sys.modules if m.startswith(('graphgrpo_jax', 'tantivy', "
             f"'orbax', 'transformers', 'tensorflow_datasets', 'tokenizers', 'safetensors')))))")
    loaded = set(subprocess.run([sys.executable, "-c", probe], cwd=ROOT, check=True, capture_output=True,
                                text=True).stdout.split())
    assert not loaded & set(STAGES)
    assert not {m for m in loaded if m.split(".")[0] in ("orbax", "transformers", "tensorflow_datasets",
                                                         "tokenizers", "safetensors")}
    if config_file != "ab_test":  # the A/B config names the simulation's own sections (search/ab.py)
        assert "tantivy" not in loaded


def test_rule_defaults_of_the_rewrite_config_are_the_reward_functions_defaults():
    import inspect

    from configs import defaults
    from graphgrpo_jax.rl import rewards

    signature = inspect.signature(rewards.rule_violations)
    assert dict(defaults.rewrite().rule) == {name: signature.parameters[name].default
                                             for name in defaults.rewrite().rule}
