"""The layout the design promises (docs/design.md): imports point one way and form no cycle, muP is entered from the
optimizer side only through the factory, and bundled recipes are found by name from any working directory."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hf_optim", "mup_integration")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str) -> set[str]:
    """Every module of the two packages that ``path`` imports, at module level or inside a function."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names = [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in PACKAGES)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for module, path in files.items():
        # `from pkg import name` names a module only if that module exists; a package import means its __init__
        graph[module] = {m for m in _imports(path, module) if m in files and m != module}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_module_imports_form_no_cycle():
    graph = _graph()
    # package __init__ files re-export lazily; a submodule importing its own package's __init__ (`from . import x`
    # names the package first) is not a cycle of logic
    graph = {m: {d for d in deps if d not in PACKAGES and not m.startswith(d + ".")} for m, deps in graph.items()}
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_mup_is_entered_only_from_the_factory_and_the_application_layer():
    graph = _graph()
    allowed = {"hf_optim.factory", "hf_optim.cli"}
    vocabulary = {"mup_integration", "mup_integration.vocabulary"}  # the leaf of names the core may read
    for module, deps in graph.items():
        if not module.startswith("hf_optim") or module in allowed or module.startswith("hf_optim.runner"):
            continue
        upward = {d for d in deps if d.startswith("mup_integration")} - vocabulary
        assert not upward, f"{module} imports {upward}"
    assert {d for d in graph["hf_optim.factory"] if d.startswith("mup_integration")} - vocabulary == {
        "mup_integration.policy"
    }
    assert graph["mup_integration.vocabulary"] == set(), "the vocabulary must stay a leaf"
    # and mup_integration uses only the optimizer core of hf_optim, never its entry points
    for module, deps in graph.items():
        if module.startswith("mup_integration"):
            upward = {d for d in deps if _layer(d) in (DOOR, APPS)}
            assert not upward, f"{module} imports {upward}"


#: The compatibility names of the flat layout (docs/design.md): each is the module it names, not a copy.
SHIMS = {
    "hf_optim.adam": "hf_optim.optim.adam.optimizers",
    "hf_optim.adafactor": "hf_optim.optim.adafactor.optimizer",
    "hf_optim.sgd": "hf_optim.optim.sgd",
    "hf_optim.adagrad": "hf_optim.optim.adagrad",
    "hf_optim.rmsprop": "hf_optim.optim.rmsprop",
    "hf_optim.muon": "hf_optim.optim.muon.optimizer",
    "hf_optim.qk_clip": "hf_optim.optim.muon.qk_clip",
    "hf_optim.trainer": "hf_optim.integrations.transformers.trainer",
    "hf_optim._autoload": "hf_optim.integrations.transformers.autoload",
}
CORE, FAMILIES, DOOR, APPS = range(4)
#: The one import that goes up a layer, and why.
UPWARD_EXEMPT = {
    ("hf_optim._interop", "hf_optim.optim.adafactor.presets"): "torch's / transformers' Adafactor state dicts map "
    "onto a preset: plain data of the family, not its classes",
}


def _layer(module: str) -> int | None:
    """core (top-level modules) < families (hf_optim.optim) < the door and the Trainer integration (factory,
    hf_optim.integrations) < applications (cli, runner, bench); the package faces and the shims belong to none."""
    if module in ("hf_optim", "hf_optim.__main__", *SHIMS) or not module.startswith("hf_optim."):
        return None
    top = module.split(".")[1]
    if top in ("cli", "runner", "bench"):
        return APPS
    if top in ("factory", "integrations"):
        return DOOR
    return FAMILIES if top == "optim" else CORE


def test_imports_point_down_the_layers():
    graph = _graph()
    upward = {
        (module, dep)
        for module, deps in graph.items()
        for dep in deps
        if _layer(module) is not None and _layer(dep) is not None and _layer(dep) > _layer(module)
    }
    assert upward == set(UPWARD_EXEMPT), f"imports up a layer: {sorted(upward - set(UPWARD_EXEMPT))}"
    assert {m for m in graph if _layer(m) == FAMILIES} >= {"hf_optim.optim.adam.optimizers", "hf_optim.optim.sgd"}


def test_the_flat_names_are_the_modules_they_name():
    import importlib

    for old, new in SHIMS.items():
        assert importlib.import_module(old) is importlib.import_module(new), old
    from hf_optim.adafactor import Adafactor
    from hf_optim.trainer import register_all

    assert Adafactor.__module__ == "hf_optim.optim.adafactor.optimizer" and callable(register_all)
    # every top-level module that only aliases another is listed above, and nothing else aliases
    aliasing = {_module_name(p) for p in (ROOT / "hf_optim").glob("*.py") if "sys.modules[__name__]" in p.read_text()}
    assert aliasing == set(SHIMS)


def test_bundled_recipes_are_found_from_any_directory(tmp_path):
    exe = Path(sys.executable).with_name("hf-optim")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "hf_optim"]
    listing = subprocess.run([*command, "list", "--recipes"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr
    names = {line.split()[1] for line in listing.stdout.splitlines() if line.strip()}
    assert {"llm/llama2", "demo/shakespeare_mup_llama_adafactor", "quick", "full_width_transfer"} <= names
    code = "from hf_optim.runner import schema; print(schema.load('llm/llama2')['name'])"
    loaded = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0 and loaded.stdout.strip() == "llama2", loaded.stderr


FLOAT_DTYPES = {"bfloat16", "float16", "half", "float32", "float", "float64", "double"}
#: Modules that compare dtypes for another reason than choosing the optimizer's precision (and why).
DTYPE_EXEMPT = {
    "hf_optim.precision": "the one place that decides",
    "hf_optim.optim.adafactor.native": "the dtypes the C kernel's ABI accepts",
    "hf_optim._compiled": "the dtypes Inductor compiles correctly",
    "hf_optim.optim.muon.orthogonalize": "the Newton-Schulz iteration dtype is a knob (ns_dtype) of Muon",
}


def _dtype_decisions(tree: ast.AST) -> list[str]:
    """Nodes that choose a floating dtype: a conditional whose branches or test name one, a comparison of a ``.dtype``
    against one (or against ``LOW_PRECISION``), a definition of ``LOW_PRECISION``."""

    def is_dtype(node: ast.AST) -> bool:
        return (
            isinstance(node, ast.Attribute)
            and node.attr in FLOAT_DTYPES
            and isinstance(node.value, ast.Name)
            and node.value.id == "torch"
        ) or (isinstance(node, ast.Name) and node.id == "LOW_PRECISION")

    def names_dtype(node: ast.AST) -> bool:
        return any(is_dtype(n) for n in ast.walk(node))

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.IfExp) and names_dtype(node):
            found.append(ast.unparse(node))
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            reads_dtype = any(isinstance(n, ast.Attribute) and n.attr == "dtype" for n in sides)
            if reads_dtype and any(names_dtype(n) for n in sides):
                found.append(ast.unparse(node))
        elif isinstance(node, ast.Assign) and any(names_dtype(t) for t in node.targets):
            found.append(ast.unparse(node))
    return found


def test_no_module_outside_the_precision_module_decides_a_dtype():
    files = {_module_name(p): p for p in (ROOT / "hf_optim").rglob("*.py")}
    assert "hf_optim.precision" in files
    offenders = {
        module: found
        for module, path in files.items()
        if module not in DTYPE_EXEMPT and (found := _dtype_decisions(ast.parse(path.read_text())))
    }
    assert not offenders, f"dtype decisions outside hf_optim.precision: {offenders}"
    # the check itself finds what it is meant to find
    probe = "x = torch.float32 if p.dtype in LOW_PRECISION else p.dtype\nok = g.dtype == torch.bfloat16\n"
    assert len(_dtype_decisions(ast.parse(probe))) == 3


def _vocabulary_literals(tree: ast.AST) -> list[str]:
    """Tuple/list/set literals that spell out two or more names of one muP vocabulary (a second definition)."""
    from mup_integration import vocabulary

    sets = [set(vocabulary.FAMILIES), set(vocabulary.WD_RULES), set(vocabulary.KINDS)]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            strings = {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
            if any(len(strings & names) >= 2 for names in sets):
                found.append(ast.unparse(node))
    return found


def test_the_mup_vocabulary_is_defined_in_one_module():
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    offenders = {
        module: found
        for module, path in files.items()
        if module != "mup_integration.vocabulary" and (found := _vocabulary_literals(ast.parse(path.read_text())))
    }
    assert not offenders, f"muP names spelled out outside mup_integration.vocabulary: {offenders}"
    assert _vocabulary_literals(ast.parse((ROOT / "mup_integration" / "vocabulary.py").read_text()))


def test_the_optimizer_core_imports_without_the_mup_machinery():
    code = (
        "import sys, hf_optim, hf_optim.registry, hf_optim._optim_args\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('mup_integration'))\n"
        "assert loaded == ['mup_integration', 'mup_integration.vocabulary'], loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
