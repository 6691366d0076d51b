"""trainer_core must stay importable and usable without ComfyUI."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_importing_trainer_core_imports_no_comfy_module():
    code = (
        "import sys, pkgutil, importlib, trainer_core\n"
        "for m in pkgutil.walk_packages(trainer_core.__path__, 'trainer_core.'):\n"
        "    if not m.name.endswith('__main__'):\n"
        "        importlib.import_module(m.name)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in "
        "{'comfy', 'comfy_api', 'comfy_extras', 'folder_paths', 'server', 'nodes', 'execution'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"trainer_core imported ComfyUI modules: {out.stdout}"


def test_pack_root_imports_without_comfyui():
    """ComfyUI imports the folder as a package; without ComfyUI that must still work and be cheap."""
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('flowtrain_pack', r'{ROOT / '__init__.py'}',"
            f" submodule_search_locations=[r'{ROOT}'])\n"
            "m = importlib.util.module_from_spec(spec); sys.modules['flowtrain_pack'] = m\n"
            "spec.loader.exec_module(m)\n"
            "print('torch' in sys.modules, hasattr(m, 'comfy_entrypoint'))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]
