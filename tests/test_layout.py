"""The estimator core never imports the training product or the evaluation tools (issue 15's
import direction), so `import ulr` stays light and the core can change on its own."""

import subprocess
import sys

CORE = ["ulr", "ulr.estimator", "ulr.noise", "ulr.samplers", "ulr.sites", "ulr.plans",
        "ulr.baselines", "ulr.functional", "ulr.parallel", "ulr.allocator", "ulr.hybrid",
        "ulr.schedules", "ulr.transforms", "ulr.contract"]
ABOVE = ["ulr.train", "ulr.cli", "ulr.evaluate",
         "ulr.finetune", "ulr.data", "ulr.models", "ulr.peers", "ulr.distributed"]


def test_the_core_imports_nothing_above_it():
    code = (f"import importlib, sys\nfor m in {CORE!r}: importlib.import_module(m)\n"
            f"print(sorted(m for m in {ABOVE!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]", f"the core pulled in {out}"


# Sizes a reader can hold (issue 15): a module, a class and a function each fit in one sitting.
MAX_LINES = {"module": 700, "class": 350, "function": 100}


def _too_big() -> list[str]:
    import ast
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src" / "ulr"
    found = []
    for path in sorted(src.rglob("*.py")):
        text = path.read_text()
        name = path.relative_to(src.parent).as_posix()
        if text.count("\n") > MAX_LINES["module"]:
            found.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            kind = ("class" if isinstance(node, ast.ClassDef) else "function"
                    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None)
            if kind and node.end_lineno - node.lineno + 1 > MAX_LINES[kind]:
                found.append(f"{name}:{node.lineno} {kind} {node.name}: "
                             f"{node.end_lineno - node.lineno + 1} lines")
    return found


def test_modules_classes_and_functions_stay_small():
    assert _too_big() == [], (f"over {MAX_LINES} lines; split by responsibility:\n"
                              + "\n".join(_too_big()))
