"""The settings nodes (``nodes/settings.py`` ``GROUPS``): one ComfyUI node per group, its
widgets generated from the config fields' metadata. Each chains: an optional ``settings``
input from another settings node, a ``settings`` output for the next one or the Trainer."""
from __future__ import annotations

from comfy_api.latest import io

from . import settings as groups
from .common import CATEGORY, SettingsType

_INPUTS = {
    "BOOLEAN": lambda w: io.Boolean.Input(w.name, default=w.default, tooltip=w.tooltip),
    "INT": lambda w: io.Int.Input(w.name, default=w.default, tooltip=w.tooltip, control_after_generate=False,
                                  **dict(w.bounds)),
    "FLOAT": lambda w: io.Float.Input(w.name, default=w.default, tooltip=w.tooltip, **dict(w.bounds)),
    "COMBO": lambda w: io.Combo.Input(w.name, options=list(w.options), default=w.default, tooltip=w.tooltip),
    "STRING": lambda w: io.String.Input(w.name, default=w.default, tooltip=w.tooltip),
}


def widget_input(spec: groups.WidgetSpec):
    return _INPUTS[spec.kind](spec)


def settings_node(group: groups.Group) -> type[io.ComfyNode]:
    """The ComfyUI node class of ``group``."""

    def define_schema(cls):
        return io.Schema(
            node_id=group.node_id, display_name=group.title, category=f"{CATEGORY}/settings",
            description=group.description + " A widget left at its default changes nothing (a model preset may "
                                            "fill it); chain several settings nodes through 'settings'.",
            search_aliases=["flowtrain", *group.aliases],
            inputs=[SettingsType.Input("settings", optional=True, tooltip=(
                        "Optional: another FlowTrain settings node's output; this node's values are added to it "
                        "(on a field both set, this node wins)."))]
                   + [widget_input(w) for w in groups.widget_specs(group)],
            outputs=[SettingsType.Output(display_name="settings", tooltip=(
                "These settings (plus those chained in): connect to the Trainer's settings input or to another "
                "settings node."))],
        )

    def execute(cls, settings=None, **widgets) -> io.NodeOutput:
        return io.NodeOutput(groups.settings_values(group, widgets, settings))

    return type(group.node_id, (io.ComfyNode,), {
        "define_schema": classmethod(define_schema), "execute": classmethod(execute), "__module__": __name__,
        "__doc__": group.description})


SETTINGS_NODES: list[type[io.ComfyNode]] = [settings_node(g) for g in groups.GROUPS]
