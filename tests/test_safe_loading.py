"""Safe loading: no code path of the package unpickles untrusted files, and nothing listens on
all interfaces. The source is parsed (not grepped), so docstrings that mention the rules pass.

Offenders: importing pickle / cPickle / dill / joblib / cloudpickle / shelve / marshal,
``torch.load`` without ``weights_only=True``, ``np.load`` with ``allow_pickle`` other than False,
``pandas.read_pickle``, ``yaml.load`` without a safe loader (or ``yaml.unsafe_load``),
``trust_remote_code=True``, and a server address of ``0.0.0.0`` / ``::`` (bind 127.0.0.1).
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("flowrl", "rewards", "bench", "examples")
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "cloudpickle", "shelve", "marshal"}
ALL_INTERFACES = {"0.0.0.0", "::", "[::]"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _kw(call: ast.Call, name: str):
    """The keyword's value node, or None when the call does not pass it."""
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def offenders(source: str, filename: str = "<string>") -> list[str]:
    """``file:line: what`` for every unsafe load or open bind in ``source``."""
    found = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in UNSAFE_MODULES:
                    found.append(f"{where}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in UNSAFE_MODULES:
                found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in ("torch.load", "th.load") and not _is_const(_kw(node, "weights_only"), True):
                found.append(f"{where}: {name}(...) without weights_only=True")
            elif name in ("np.load", "numpy.load") and not (
                _kw(node, "allow_pickle") is None or _is_const(_kw(node, "allow_pickle"), False)
            ):
                found.append(f"{where}: {name}(..., allow_pickle=...) may unpickle")
            elif name.endswith("read_pickle") or name in ("yaml.unsafe_load", "yaml.full_load"):
                found.append(f"{where}: {name}(...)")
            elif name == "yaml.load":
                loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
                if loader is None or "Safe" not in _dotted(loader):
                    found.append(f"{where}: yaml.load without yaml.SafeLoader (use yaml.safe_load)")
            if _is_const(_kw(node, "trust_remote_code"), True):
                found.append(f"{where}: trust_remote_code=True runs downloaded code")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in ALL_INTERFACES:
            found.append(f"{where}: {node.value!r} listens on all interfaces; bind 127.0.0.1 by default")
    return found


def _package_files() -> list[Path]:
    return sorted(p for d in SCANNED for p in (REPO / d).rglob("*.py") if ".venv" not in p.parts)


def test_the_package_loads_only_safely():
    files = _package_files()
    assert len(files) > 20 and any(p.name == "checkpoint.py" for p in files)
    bad = [o for p in files for o in offenders(p.read_text(), str(p.relative_to(REPO)))]
    assert not bad, "unsafe loading or binding:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "source",
    [
        "import pickle",
        "from joblib import load",
        "import dill as d",
        "torch.load(path)",
        "torch.load(path, weights_only=False)",
        "torch.load(path, map_location='cpu', weights_only=flag)",
        "np.load(path, allow_pickle=True)",
        "numpy.load(path, allow_pickle=flag)",
        "pd.read_pickle(path)",
        "yaml.load(text)",
        "yaml.load(text, Loader=yaml.Loader)",
        "yaml.unsafe_load(text)",
        "AutoModel.from_pretrained(name, trust_remote_code=True)",
        "server.run(host='0.0.0.0', port=8000)",
    ],
)
def test_the_scanner_catches(source):
    assert offenders(source), source


@pytest.mark.parametrize(
    "source",
    [
        "torch.load(path, map_location='cpu', weights_only=True)",
        "np.load(path)",
        "np.load(path, allow_pickle=False)",
        "yaml.safe_load(text)",
        "yaml.load(text, Loader=yaml.SafeLoader)",
        "server.run(host='127.0.0.1')",
        '"""Checkpoints load with ``torch.load(weights_only=True)``, never pickle."""',
    ],
)
def test_the_scanner_passes(source):
    assert not offenders(source), source
