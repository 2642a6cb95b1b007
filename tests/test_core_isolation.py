import subprocess
import sys


def test_import_packer_leaves_heavy_frameworks_out():
    code = ("import sys, packer; heavy = [m for m in ('tensorflow', 'apache_beam', 'pyarrow') if m in sys.modules];"
            "print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
