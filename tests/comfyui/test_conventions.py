"""ComfyUI conventions, checked on the nodes as ComfyUI loaded them: every FlowTrain node has
search aliases, a description and a tooltip on every input and output; the web extension is
registered once; the pyproject's ``requires-comfyui`` admits this ComfyUI and ComfyUI's own
parser reads it; the example workflows are listed as templates with their thumbnails."""
from __future__ import annotations

from pathlib import Path

import pytest
from test_workflows import env  # noqa: F401 (fixture)
from workflow_harness import comfy_path

pytestmark = pytest.mark.skipif(comfy_path() is None, reason="set COMFYUI_PATH to a ComfyUI checkout to run these")

ROOT = Path(__file__).resolve().parents[2]


def _flowtrain_nodes():
    import nodes

    return {k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items()  # not the tests' own pack (FlowTrain/testing)
            if k.startswith("FlowTrain") and not v.GET_SCHEMA().category.startswith("FlowTrain/testing")}


def test_every_node_has_aliases_a_description_and_tooltips(env):  # noqa: F811
    found = _flowtrain_nodes()
    assert len(found) >= 15  # 9 nodes + 6 settings nodes
    for node_id, cls in found.items():
        schema = cls.GET_SCHEMA()
        assert schema.search_aliases, node_id
        assert schema.description, node_id
        for item in schema.inputs:
            assert item.tooltip, f"{node_id}.{item.id} has no tooltip"
        for item in schema.outputs:
            assert item.tooltip, f"{node_id} output {item.display_name} has no tooltip"
        info = cls.GET_NODE_INFO_V1()
        assert info["search_aliases"] == schema.search_aliases  # what the frontend receives


def test_the_web_extension_is_registered_once(env):  # noqa: F811
    import nodes

    web = (ROOT / "web").resolve()
    names = [name for name, folder in nodes.EXTENSION_WEB_DIRS.items() if Path(folder).resolve() == web]
    assert len(names) == 1, f"web/ is served under {names}: the frontend would load flowtrain.js {len(names)} times"


def test_requires_comfyui_admits_this_comfyui():
    import comfyui_version
    from comfy_config import config_parser
    from packaging.specifiers import SpecifierSet

    config = config_parser.extract_node_configuration(str(ROOT))
    wanted = config.project.supported_comfyui_version
    assert wanted and comfyui_version.__version__ in SpecifierSet(wanted)


def test_templates_are_listed_with_thumbnails(env):  # noqa: F811
    import nodes

    pack = next(Path(d) for d in nodes.LOADED_MODULE_DIRS.values() if Path(d).resolve() == ROOT.resolve())
    listed = sorted(f.stem for f in (pack / "example_workflows").glob("*.json"))  # as /workflow_templates globs them
    assert listed and all((pack / "example_workflows" / f"{name}.jpg").is_file() for name in listed)
