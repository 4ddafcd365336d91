"""``import doconv_core`` must not import any deep-learning framework.

A meta-path finder records every attempt to import one, so the test fails even in an
environment where the framework is not installed (where the import would fail anyway).
"""

import json
import pathlib
import subprocess
import sys

FRAMEWORKS = ("torch", "tensorflow", "keras", "mxnet", "jax", "jaxlib", "gluoncv")
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

PROBE = """
import json, sys
attempted = set()
class RecordFrameworkImports:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {frameworks!r}:
            attempted.add(name.split(".")[0])
        return None
sys.meta_path.insert(0, RecordFrameworkImports())
{imports}
print(json.dumps(sorted(attempted | {{m for m in {frameworks!r} if m in sys.modules}})))
"""


def attempted_imports(imports: str) -> list:
    code = PROBE.format(frameworks=FRAMEWORKS, imports=imports)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=REPO_ROOT)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_probe_detects_a_framework_import():
    assert attempted_imports("import importlib.util; importlib.util.find_spec('torch')") == ["torch"]


def test_core_imports_no_framework():
    assert attempted_imports("import doconv_core, doconv_core.testing.cases") == []


def test_sample_data_loading_imports_no_framework():
    assert attempted_imports("import samples.datasets") == []
