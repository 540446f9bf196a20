"""The package: its public API, and the import graph of its modules."""





def test_library_modules_import_without_cycles():
    """The module-level imports between hf_tract's modules form a DAG (config at the bottom, trainer/hub on top)."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "hf_tract"
    graph = {}
    for path in package.glob("*.py"):
        tree = ast.parse(path.read_text())
        graph[path.stem] = {
            node.module.split(".")[0]
            for node in tree.body  # module level only: lazy imports inside functions may point anywhere
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module
        }
    visiting, done = set(), set()

    def visit(name, chain):
        assert name not in visiting, f"import cycle: {' -> '.join(chain + [name])}"
        if name in done or name not in graph:
            return
        visiting.add(name)
        for dependency in graph[name]:
            visit(dependency, chain + [name])
        visiting.discard(name)
        done.add(name)

    for name in graph:
        visit(name, [])
    assert graph["config"] == set()  # everything may build on the config
