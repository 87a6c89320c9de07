"""The shape of the code base: no import circles, no module importing another's private names.

Imports inside functions count too: a circle hidden in a function is still a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("builder", "verifier", "dirtylog")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """(module -> modules it imports, [(module, imported module, private name)])."""
    modules = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    private = []
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module
                targets = []
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    targets.append((sub, None) if sub in modules else (target, a.name))
            else:
                continue
            for target, name in targets:
                if target.split(".")[0] not in PACKAGES or target == mod:
                    continue
                edges[mod].add(target)
                if name and name.startswith("_") and not name.startswith("__"):
                    private.append((mod, target, name))
    return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == "open":
                found.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)
    return found


def test_the_graph_is_read():
    edges, _ = import_graph()
    assert "verifier.run.trial" in edges["verifier.run.verify"]
    assert "dirtylog.console" in edges["dirtylog.cli"]


FLOW = {  # verifier/'s folders, in the order a verification goes through them
    "run": "the trial flow, hosts, QEMU processes, migration policy, workload",
    "capture": "guest RAM and vCPU state from both sides",
    "analysis": "page comparison, page headers, diagnosis, known findings, expectations",
    "reports": "text, JSON, JUnit, HTML, merge",
    "matrix": "scenario files, host fit, execution, results",
}
SHARED = {"artifacts", "doctor", "errors", "fsutil", "units"}  # used across the flow


def test_verifier_folders_show_the_flow():
    """Every verifier module is in one folder of the flow, or one of the few shared ones at the top."""
    top = {p.stem for p in (ROOT / "verifier").glob("*.py")} - {"__init__"}
    assert top == SHARED
    folders = {p.name for p in (ROOT / "verifier").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(FLOW)
    for name in FLOW:
        assert (ROOT / "verifier" / name / "__init__.py").read_text().startswith('"""')
    edges, _ = import_graph()
    # the layers point one way: analysis and capture never import the matrix, reports never run QEMU
    for mod, targets in edges.items():
        if mod.startswith(("verifier.analysis", "verifier.capture")):
            assert not any(t.startswith("verifier.matrix") for t in targets), (mod, targets)
        if mod.startswith("verifier.reports"):
            assert not any(t.startswith("verifier.run") for t in targets), (mod, targets)


# Single-concern modules allowed to be longer, each for its reason.
LONG_MODULES = {
    "verifier/analysis/stream.py": "QEMU's stream format is one state machine (the main channel's) over one buffer",
    "verifier/run/tap.py": "one forwarding object: its threads share the channel state and the error handling",
}


def test_no_module_is_too_long_to_read():
    """matrix.py (975 lines) and remote.py (816) mixed concerns and were split; nothing else in
    verifier/ grows past 600 lines but the named single-concern modules (at most 1500)."""
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "verifier").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 600}
    assert set(long) <= set(LONG_MODULES), long
    assert all(n <= 1500 for n in long.values()), long


def test_no_import_circles():
    edges, _ = import_graph()
    assert _cycles(edges) == []


def test_a_planted_circle_is_found():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_module_imports_another_modules_private_names():
    _, private = import_graph()
    assert private == []


def test_one_machine_table():
    """The builder's per-architecture builds and the verifier's command lines read one table."""
    from builder.build import ARCH_BUILDS
    from builder.machines import MACHINES
    from verifier.run import qemu
    assert qemu.Machine is __import__("builder.machines", fromlist=["Machine"]).Machine
    for spec in ARCH_BUILDS.values():
        m = MACHINES[spec.machine]
        assert (m.arch, m.console) == (spec.arch, spec.console)
    assert not hasattr(MACHINES["q35"], "min_mem_mb")  # a fact of the kernel built, carried by the manifest


@pytest.mark.parametrize("rc, out, want", [
    (0, "QEMU emulator version 10.0.13 (v10.0.13-dirty)\nCopyright", (10, 0, 13)),
    (0, "QEMU emulator version 7.2 (Debian 1:7.2+dfsg-7+deb12u18)\n", (7, 2, 0)),
    (0, "QEMU emulator version 5.2.0\n", "needs QEMU 6.0 or newer"),
    (0, "GNU bash, version 5.2.15\n", "does not look like a QEMU"),
    (1, "QEMU emulator version 8.0.0\n", "does not look like a QEMU"),
    (0, "", "does not look like a QEMU"),
])
def test_one_judgement_of_qemu_version_output(rc, out, want):
    """verifier.qemu.identify_qemu: used by the local probe, the remote hosts and `dirtylog doctor`."""
    from verifier.errors import InputError
    from verifier.run.qemu import identify_qemu
    if isinstance(want, tuple):
        assert identify_qemu("/q", rc, out).version == want
    else:
        with pytest.raises(InputError, match=want):
            identify_qemu("/q", rc, out)


def test_qemu_error_carries_command_line_exit_status_and_output(tmp_path):
    """A QEMU that refuses its command line: the error's fields hold what the message says."""
    import shutil

    from verifier.errors import QemuError
    from verifier.run.qemu import QemuProcess, probe_qemu
    if shutil.which("qemu-system-arm") is None:
        pytest.fail("qemu-system-arm is part of the test setup (scripts/setup-host.sh)")
    qemu = probe_qemu("qemu-system-arm")
    with pytest.raises(QemuError) as e:
        with QemuProcess(qemu, ["-machine", "no-such-board", "-nographic"], tmp_path, "src"):
            pass
    err = e.value
    assert err.cmdline[0] == qemu.path and "no-such-board" in err.cmdline
    assert err.exit_status == 1
    assert "unsupported machine type" in err.output_tail and err.output_tail in str(err)


def _documented_manifest_keys() -> set[str]:
    import re
    rows = [line for line in (ROOT / "docs" / "manifest.md").read_text().splitlines() if line.startswith("| `")]
    return {k for row in rows for k in re.findall(r"`([^`]+)`", row.split("|")[1])}


def _flat_keys(obj, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in obj.items():
        name = prefix + k
        keys.add(name)
        if isinstance(v, dict):
            keys |= _flat_keys(v, name + ".")
        elif isinstance(v, list) and v and all(isinstance(e, dict) for e in v):
            keys.add(name + "[]")
            for e in v:
                keys |= _flat_keys(e, name + "[].")
    return keys


def _undocumented(manifest: dict, documented: set[str]) -> list[str]:
    def covered(key):
        parts = key.split(".")
        if any(d.startswith(key + ".") for d in documented):  # an object whose keys are listed
            return True
        return any(".".join(parts[:i]) in documented or ".".join(parts[:i]) + "[]" in documented
                   for i in range(1, len(parts) + 1))
    return sorted(k for k in _flat_keys(manifest) if not covered(k))


def test_manifest_doc_names_every_key_of_a_real_build(artifacts):
    """docs/manifest.md is the contract: a key the builder writes and the doc does not name fails."""
    import json
    manifest = json.loads((artifacts / "manifest.json").read_text())
    documented = _documented_manifest_keys()
    assert {"schema", "guest.machine", "files[].sha256", "qemu.path"} <= documented
    assert _undocumented(manifest, documented) == []
    assert _undocumented({**manifest, "guest": {**manifest["guest"], "new_key": 1}}, documented) == ["guest.new_key"]


def test_readme_synopsis_names_every_option_of_every_command():
    """The README's command synopsis is checked against the click options, so it cannot go stale."""
    import re

    from dirtylog.cli import cli
    text = (ROOT / "README.md").read_text()
    synopsis = text[text.index("## Commands"):text.index("## Documentation")]
    missing = []
    for name in ("build", "verify", "compare"):
        for p in cli.commands[name].params:
            longs = [o for o in p.opts if o.startswith("--")]
            if longs and p.name != "help" and not any(re.search(re.escape(o) + r"\b", synopsis) for o in longs):
                missing.append(f"{name} {longs[0]}")
    assert missing == []


def test_one_manifest_writer():
    """Only builder/manifest.py serialises a manifest: no other code names the schema, and the
    Buildroot post-image script hands its facts to it instead of printing JSON itself."""
    import subprocess
    files = subprocess.run(["git", "ls-files", "*.py", "*.sh"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    naming = [f for f in files if not f.startswith("tests/") and "dirtylog-artifacts/1" in (ROOT / f).read_text()]
    assert naming == ["builder/manifest.py"]
    post_image = (ROOT / "buildroot-external" / "board" / "dirtylog" / "post-image.sh").read_text()
    assert "python3 -m builder.manifest buildroot" in post_image and "printf '{" not in post_image
