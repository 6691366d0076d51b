"""Differential Output Preservation: captions, scheduling, the no-op when off, PCGrad, and
the measured effect on a tiny FLUX-layout model (drift on no-trigger prompts vs trigger loss)."""
from __future__ import annotations

import contextlib
import logging

import pytest
import torch
from tiny_run import make_config, one_thread, tiny_model, train, write_data  # noqa: F401 (fixture)

from trainer_core import assemble, dop
from trainer_core.config import ConfigError, TrainingConfig, ValidationConfig
from trainer_core.data.dataset import prepare_dataset
from trainer_core.demo.codec import DctCodec
from trainer_core.demo.text import HashTextEncoder
from trainer_core.flow import interpolate, step_generator
from trainer_core.loop import Callback
from trainer_core.lora.network import LoraNetwork
from trainer_core.types import TextBatch
from trainer_core.validation import ValidationSet

pytestmark = pytest.mark.usefixtures("one_thread")



# ------------------------------------------------------------------ config and captions
def test_dop_is_refused_without_a_trigger_or_class_word():
    with pytest.raises(ConfigError, match="trigger_word.*nothing to preserve"):
        TrainingConfig.from_dict({"dop": {"enabled": True, "class_word": "man"}})
    with pytest.raises(ConfigError, match="class word"):
        TrainingConfig.from_dict({"dop": {"enabled": True}, "data": {"captions": {"trigger_word": "sks"}}})
    TrainingConfig.from_dict({"dop": {"enabled": True}, "data": {"captions": {"trigger_word": "sks", "class_word": "man"}}})


def test_class_captions_replace_the_trigger_whole_word(tmp_path):
    cfg = make_config(tmp_path, dop={"enabled": True, "class_word": "man"})
    fn = assemble.extra_captions(cfg)[dop.CLASS_TEXT]
    assert fn("sks, a sksx sks-like photo of sks") == "man, a sksx man-like photo of man"
    assert fn("a photo") == "a photo"
    assert dop.class_word(make_config(tmp_path, dop={"enabled": True})) == "object"  # falls back to captions.class_word
    assert assemble.extra_captions(make_config(tmp_path)) == {}


def test_dataset_caches_class_captions_and_maps_dropped_captions_to_the_class_word(tmp_path):
    write_data(tmp_path / "data", count=2)
    cfg = make_config(tmp_path / "data", dop={"enabled": True}, data={"captions": {"caption_dropout": 0.5}})
    ds = prepare_dataset(cfg.data, DctCodec(), HashTextEncoder(), cache_dir=tmp_path / "cache", pixel_multiple=16,
                         seed=0, extra_captions=assemble.extra_captions(cfg))
    table = ds.extras[dop.CLASS_TEXT]
    assert table[ds.dropped_base] == "object"  # a dropped caption's class caption is the class word alone
    for main, cls in table.items():
        assert "sks" not in cls.split(", ") and cls == main.replace("sks", "object")
        assert cls in ds.embeddings
    seen = set()
    for i in range(8):
        b = ds.batch(i, step_generator(0, i))
        for caption, cls_ctx in zip(b.captions, b.extras[dop.CLASS_TEXT].context):
            want = "object" if caption == "" else caption.replace("sks", "object")
            assert torch.equal(cls_ctx[: ds.embeddings[want].context.shape[0]], ds.embeddings[want].context)
            seen.add(caption == "")
    assert seen == {True, False}


def test_captions_without_the_trigger_are_listed_once(tmp_path, caplog):
    paths = write_data(tmp_path / "data", count=3)
    raw = sorted((tmp_path / "data").rglob("*.txt"))
    raw[1].write_text("a red ring object, no trigger here, sksx\n")
    cfg = make_config(tmp_path / "data", dop={"enabled": True})
    with caplog.at_level(logging.WARNING, logger="trainer_core.dop"):
        assemble.extra_captions(cfg)
    warnings = [r for r in caplog.records if "do not contain the trigger" in r.getMessage()]
    assert len(warnings) == 1 and str(raw[1]) in warnings[0].getMessage()
    assert str(raw[0]) not in warnings[0].getMessage() and paths


# ------------------------------------------------------------------ scheduling and no-op
class _Terms(Callback):
    def __init__(self):
        self.per_step: list[set] = []

    def on_step_end(self, state, logs):
        self.per_step.append(set(logs["terms"]))


def test_prior_pass_runs_exactly_on_every_kth_step(tmp_path, monkeypatch):
    write_data(tmp_path / "data", count=2)
    calls: list[int] = []
    original = LoraNetwork.disabled

    @contextlib.contextmanager
    def counting(self):
        calls.append(len(recorder.per_step) + 1)  # 1-based step being trained
        with original(self):
            yield

    monkeypatch.setattr(LoraNetwork, "disabled", counting)
    recorder = _Terms()
    cfg = make_config(tmp_path / "data", steps=7, dop={"enabled": True, "every_n_steps": 3}, optim={"grad_accum": 2})
    train(cfg, tmp_path / "run", callbacks=[recorder])
    assert calls == [3, 3, 6, 6]  # two micro-batches on steps 3 and 6, nothing else
    assert [("dop" in t) for t in recorder.per_step] == [s in (3, 6) for s in range(1, 8)]


def test_disabled_dop_changes_nothing(tmp_path):
    write_data(tmp_path / "data", count=2)
    plain = make_config(tmp_path / "data", steps=4)
    off = make_config(tmp_path / "data", steps=4, dop={"enabled": False, "class_word": "man", "multiplier": 3.0,
                                                       "every_n_steps": 2, "gradient_surgery": True})
    a, _ = train(plain, tmp_path / "a")
    b, _ = train(off, tmp_path / "b")
    sa, sb = a.network.state_dict(), b.network.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    on, _ = train(make_config(tmp_path / "data", steps=4, dop={"enabled": True}), tmp_path / "c")
    assert not all(torch.equal(sa[k], v) for k, v in on.network.state_dict().items())  # the test can fail


# ------------------------------------------------------------------ PCGrad
def test_pcgrad_projects_conflicting_gradients_only():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])  # conflict: g1·g2 = -1
    out = dop.pcgrad_combine([g1, g2])
    p1 = g1 - (-1.0 / 2.0) * g2  # g1 onto the normal plane of g2
    p2 = g2 - (-1.0 / 1.0) * g1
    assert torch.allclose(out, p1 + p2)
    assert abs(float(torch.dot(p1, g2))) < 1e-6 and abs(float(torch.dot(p2, g1))) < 1e-6
    h1, h2 = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])  # h1·h2 = 1 > 0: no surgery
    assert torch.equal(dop.pcgrad_combine([h1, h2]), h1 + h2)


def test_pcgrad_backward_writes_and_accumulates_the_combined_gradient():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    b = torch.nn.Parameter(torch.tensor([0.5]))

    def values():
        return {"main": (w[0] + 2 * w[1] + b[0]) ** 2, "keep": (w[0] + w[1] + 3) ** 2 + b[0]}

    grads = []
    for v in values().values():
        gw, gb = torch.autograd.grad(v * 0.5, [w, b])
        grads.append(torch.cat([gw, gb]))
    assert torch.dot(grads[0], grads[1]) < 0  # these two do conflict
    want = dop.pcgrad_combine(grads)
    dop.pcgrad_backward(values(), [w, b], 0.5)
    assert torch.allclose(torch.cat([w.grad, b.grad]), want)
    dop.pcgrad_backward(values(), [w, b], 0.5)  # a second micro-step adds to .grad
    assert torch.allclose(torch.cat([w.grad, b.grad]), 2 * want)
    w.grad = b.grad = None
    dop.pcgrad_backward({"main": values()["main"]}, [w, b], 0.5)  # one term: a plain backward
    assert torch.allclose(torch.cat([w.grad, b.grad]), grads[0])


# ------------------------------------------------------------------ measured effect
SIGMAS = (0.2, 0.4, 0.6, 0.8)
STEPS, LR = 40, 1.5e-2
PLAIN = ["a red ring object on a blue background", "a red ring object on a green gradient background"]
CLASS = [f"object, {p}" for p in PLAIN]  # what DOP trains on: the training captions with sks → object
OTHER = ["a photo of a cat", "a green tree in a field"]  # unrelated: reported, not asserted


@torch.no_grad()
def drift(model, network, latents: list[torch.Tensor], prompts: list[str]) -> float:
    """Mean over images × prompts × σ of mean((v_lora - v_base)²) at fixed noise."""
    enc, g, total = HashTextEncoder(), step_generator(5, 0, 3), 0.0
    sigma = torch.tensor(SIGMAS)
    for x0 in latents:
        noise = torch.randn((len(SIGMAS), *x0.shape), generator=g)
        x_t = interpolate(x0.float().expand_as(noise), noise, sigma)
        for p in prompts:
            text = TextBatch.collate(enc.encode([p]) * len(SIGMAS))
            with network.disabled():
                base = model.velocity(x_t, sigma, text)
            total += float(((model.velocity(x_t, sigma, text) - base) ** 2).mean())
    return total / (len(latents) * len(prompts))


def _measure(tmp_path, name: str, **dop_cfg) -> dict:
    cfg = make_config(tmp_path / "data", steps=STEPS, optim={"lr": LR}, dop=dop_cfg)
    result, model = train(cfg, tmp_path / name)
    model.module.eval()
    ds = prepare_dataset(cfg.data, DctCodec(), HashTextEncoder(), cache_dir=tmp_path / name / ".latent_cache",
                         pixel_multiple=16, seed=0)
    latents = [e.latent for e in ds.entries]
    vset = ValidationSet(ds, ValidationConfig(sigmas=SIGMAS, images=len(latents)))
    with result.network.disabled():
        base_loss = float(vset.loss(model, 1.0).mean())
    return {"drift": drift(model, result.network, latents, CLASS + PLAIN),
            "drift_other": drift(model, result.network, latents, OTHER),
            "trigger_loss": float(vset.loss(model, 1.0).mean()), "base_trigger_loss": base_loss}


def test_dop_cuts_no_trigger_drift_and_keeps_the_trigger_loss(tmp_path, capsys):
    write_data(tmp_path / "data", count=4)
    off = _measure(tmp_path, "off", enabled=False)
    on = _measure(tmp_path, "on", enabled=True)
    pc = _measure(tmp_path, "pcgrad", enabled=True, gradient_surgery=True)
    with capsys.disabled():
        print(f"\nDOP measured effect (tiny FLUX.1, {STEPS} steps, lr {LR:g}, σ {SIGMAS}); base-model trigger loss "
              f"{off['base_trigger_loss']:.4f}")
        for name, r in (("no DOP", off), ("DOP", on), ("DOP+PCGrad", pc)):
            print(f"  {name:11s} drift(no-trigger) {r['drift']:.5f} ({r['drift'] / off['drift']:6.1%})  "
                  f"drift(unrelated) {r['drift_other']:.5f} ({r['drift_other'] / off['drift_other']:6.1%})  "
                  f"trigger loss {r['trigger_loss']:.4f} ({r['trigger_loss'] / off['trigger_loss'] - 1:+.1%})")
    assert off["trigger_loss"] < 0.95 * off["base_trigger_loss"]  # the LoRA did learn the concept
    assert on["drift"] <= 0.5 * off["drift"]
    assert abs(on["trigger_loss"] - off["trigger_loss"]) <= 0.15 * off["trigger_loss"]
