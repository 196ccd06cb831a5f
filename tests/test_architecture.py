"""ARCHITECTURE.md's dependency direction, enforced by scanning imports (no code is executed)."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
STDLIB_OK = None


def _imports(folder: str):
    for path in sorted((ROOT / folder).rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    yield path, a.name
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                yield path, node.module


def test_kernels_import_only_torch_triton_and_stdlib():
    import sys
    allowed_roots = {"torch", "triton", "numpy", "__future__"} | set(sys.stdlib_module_names)
    bad = [(p.name, m) for p, m in _imports("kernels")
           if m.split(".")[0] not in allowed_roots]
    assert not bad, f"kernels/ must import torch and triton only (plus relative imports): {bad}"


def test_verifier_engine_never_imports_alphagrpo():
    bad = [(p.name, m) for p, m in _imports("verifier_engine") if m.split(".")[0] == "alphagrpo"]
    assert not bad, f"verifier_engine must stay standalone: {bad}"


def test_no_top_level_kernels_package_is_installed_or_imported():
    bad = [(p.name, m) for folder in ("alphagrpo", "verifier_engine", "kernels", "bench")
           for p, m in _imports(folder) if m.split(".")[0] == "kernels"]
    assert not bad, f"import alphagrpo.kernels, never a top-level 'kernels': {bad}"
    import importlib.util
    spec = importlib.util.find_spec("alphagrpo.kernels")
    assert spec is not None and pathlib.Path(spec.origin).parent == ROOT / "kernels"


def test_heavy_dependencies_are_not_imported_at_module_level():
    heavy = {"transformers", "diffusers", "peft", "tensorrt_llm", "pynvml", "liger_kernel", "fastapi", "uvicorn"}
    bad = []
    for folder in ("alphagrpo", "verifier_engine", "kernels"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text())
            for node in tree.body:  # module level only; lazy imports inside functions are the rule
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                bad += [(path.name, n) for n in names if n.split(".")[0] in heavy]
    assert not bad, f"import heavy optional dependencies lazily, inside the code that needs them: {bad}"


def test_a_plain_source_checkout_imports_alphagrpo_kernels():
    """Without the install's mapping (a copied checkout run from its root), kernels/ still loads as alphagrpo.kernels
    and the package's modules that use it import."""
    import subprocess
    import sys
    code = ("import sys\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, '__module__', '').startswith('__editable__')]\n"
            "import alphagrpo\n"
            "from alphagrpo.kernels.dispatch import backend_for\n"
            "import alphagrpo.train.trainer\n"
            "print(alphagrpo.kernels.__file__)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert pathlib.Path(out.stdout.strip()) == ROOT / "kernels" / "__init__.py"


LAYERS = {  # package prefix -> layer; an import may only point to the same or a lower layer
    "alphagrpo.kernels": 0,
    "alphagrpo.sampler": 1, "alphagrpo.advantages": 1, "alphagrpo.rewards": 1, "alphagrpo.models": 1,
    "alphagrpo.worlds": 1, "alphagrpo.verifiers": 1, "alphagrpo._deps": 1, "alphagrpo._files": 1,
    "alphagrpo.decompose": 1,
    "alphagrpo.train": 2, "alphagrpo.eval": 2, "alphagrpo.testing": 2,
    "alphagrpo.commands": 3, "alphagrpo.cli": 3,
}


def _layer(module: str):
    best = None
    for prefix, layer in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, layer)
    return best[1] if best else None


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def test_no_arrow_points_up_the_layers():
    """kernels <- recipe core (sampler, advantages, rewards, models, worlds, verifiers) <- library (train, eval) <-
    commands: the library never imports a command, the core never imports the library."""
    bad = []
    for path, imported in _imports("alphagrpo"):
        me, them = _layer(_module_name(path)), _layer(imported)
        if me is not None and them is not None and them > me:
            bad.append((_module_name(path), imported))
    assert not bad, f"imports that point up the layers: {bad}"


def test_the_training_library_has_no_import_cycle():
    """Within alphagrpo.train and alphagrpo.eval, module imports form a DAG (the trainer -> evaluate -> common ->
    trainer cycle must not come back)."""
    graph = {}
    for path, imported in _imports("alphagrpo"):
        me = _module_name(path)
        if me.startswith(("alphagrpo.train", "alphagrpo.eval")) and imported.startswith(("alphagrpo.train",
                                                                                        "alphagrpo.eval")):
            graph.setdefault(me, set()).add(imported)
    state = {}

    def visit(n, stack):
        if state.get(n) == 1:
            raise AssertionError(f"import cycle: {' -> '.join(stack + [n])}")
        if state.get(n) == 2:
            return
        state[n] = 1
        for m in graph.get(n, ()):
            visit(m, stack + [n])
        state[n] = 2

    for n in list(graph):
        visit(n, [])
