"""The layout holds: no import cycles (function-level imports included), the layers import only
downwards, the kernels' internals stay inside lcsm/kernels, and folder = import path."""

import ast
from pathlib import Path

import lcsm

ROOT = Path(lcsm.__file__).resolve().parent
# each layer may import only the layers listed after it (and itself)
ORDER = ["cli", "bench", "run", "parallel", "nn", "tasks", "kernels", "config"]
ALLOWED = {
    "cli": set(ORDER),
    "bench": set(ORDER) - {"cli"},
    "run": {"run", "parallel", "nn", "tasks", "kernels", "config"},
    "nn": {"nn", "parallel", "kernels", "config"},  # nn reads the sequence-parallel context
    "parallel": {"parallel", "kernels"},
    "tasks": {"tasks", "config"},
    "kernels": {"kernels"},
    "config": {"config", "tasks"},  # a recipe's task section is the task's own config class
}


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ["lcsm", *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every lcsm module `name` imports, anywhere in the file (resolved to known modules)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for t in targets:
            while t and t not in known:  # lcsm.kernels.decay.Decay -> lcsm.kernels.decay
                t = t.rpartition(".")[0]
            if t.startswith("lcsm") and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def test_no_import_cycles():
    g = graph()
    state, stack, cycles = {}, [], []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in g[n]:
            if state.get(m) == "open":
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = "done"

    for n in sorted(g):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def _layer(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else None


def test_layers_import_downwards():
    bad = []
    for name, deps in graph().items():
        layer = _layer(name)
        if layer is None:
            continue
        for d in deps:
            other = _layer(d)
            if other is not None and other not in ALLOWED[layer]:
                bad.append(f"{name} imports {d}")
    assert not bad, "\n".join(sorted(bad))


def test_kernel_internals_stay_in_the_kernels():
    """Outside lcsm/kernels only the public API is used: lcsm.kernels (recurrence, step, Decay,
    eos_*) and lcsm.kernels.decay; the backends' modules are the kernels' own business."""
    public = {"lcsm.kernels", "lcsm.kernels.decay", "lcsm.kernels.testing"}
    bad = [f"{name} imports {d}" for name, deps in graph().items() if not name.startswith("lcsm.kernels")
           and not name.startswith("lcsm.bench.kernels") for d in deps if d.startswith("lcsm.kernels") and d not in public]
    assert not bad, "\n".join(sorted(bad))


def test_every_folder_is_a_package_and_the_recipes_ship_inside():
    for folder in ROOT.rglob("*"):
        if folder.is_dir() and folder.name != "__pycache__" and any(folder.glob("*.py")):
            assert (folder / "__init__.py").exists(), f"{folder} holds modules but no __init__.py"
    assert (ROOT / "recipes" / "models").is_dir()
    assert not (ROOT.parent / "kernels").exists() and not (ROOT.parent / "recipes").exists()
