"""`moeinf pull GGUF --upcycle`: every step shows progress, and an interrupted pull resumes after the
last finished step (the GGUF conversion and the upcycling are not done again)."""

from __future__ import annotations

import pytest
from gguf_testlib import write_gguf
from tiny_models import make_tiny_model, make_tokenizer
from typer.testing import CliRunner

import engine.upcycle.checkpoint as checkpoint
from engine.store.paths import moeinf_home
from engine.store.pull import PullProgress, pull_model
from engine.store.verify import verify_model
from engine.upcycle import Upcycle


class Recorder(PullProgress):
    """Every task with its total and the amounts advanced; messages; optionally Ctrl+C at one task."""

    def __init__(self, interrupt_at: str | None = None):
        self.tasks: dict[str, list] = {}
        self.messages: list[str] = []
        self.interrupt_at = interrupt_at

    def message(self, text):
        self.messages.append(text)

    def task(self, description, total, *, done=0, unit="B"):
        if self.interrupt_at and description.startswith(self.interrupt_at):
            raise KeyboardInterrupt
        entry = self.tasks.setdefault(description, [total, done, unit])

        def advance(n):
            entry[1] += n

        return advance


@pytest.fixture()
def dense_gguf(tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    make_tokenizer(tok)
    return write_gguf(make_tiny_model("llama"), "llama", tok, tmp_path / "Tiny-Dense.gguf")


def test_every_step_reports_progress_to_its_total(dense_gguf):
    rec = Recorder()
    r = pull_model(str(dense_gguf), transform=Upcycle(4, 2, max_new_tokens=6), progress=rec)
    assert r.name == "tiny-dense-moe4" and verify_model(r.path).ok
    steps = list(rec.tasks)
    assert steps[0] == "reading Tiny-Dense.gguf"
    assert steps[1] == "calibration text from the dense model"
    assert steps[2].startswith("routers from ") and steps[3] == "writing 4 experts per layer"
    assert steps[4] == "converting"
    for description, (total, done, _unit) in rec.tasks.items():
        assert total and done == total, description
    assert rec.tasks["routers from " + steps[2].split("routers from ")[1]][2] == "layers"
    assert "upcycling into 4 experts, top-2" in rec.messages
    assert not (moeinf_home() / "tmp" / r.name).exists()


def test_interrupted_pull_resumes_after_the_last_finished_step(dense_gguf, monkeypatch):
    with pytest.raises(KeyboardInterrupt):
        pull_model(str(dense_gguf), transform=Upcycle(4, 2, max_new_tokens=6), progress=Recorder("converting"))
    assert (moeinf_home() / "tmp" / "tiny-dense-moe4" / "transform").is_dir()  # kept for the next pull

    calls = []
    real = checkpoint.upcycle_checkpoint
    monkeypatch.setattr(checkpoint, "upcycle_checkpoint", lambda *a, **k: calls.append(a) or real(*a, **k))
    rec = Recorder()
    r = pull_model(str(dense_gguf), transform=Upcycle(4, 2, max_new_tokens=6), progress=rec)
    assert calls == [] and "reading Tiny-Dense.gguf" not in rec.tasks  # neither step ran again
    assert "resuming: the GGUF conversion: done by an earlier pull" in rec.messages
    assert "resuming: upcycling into 4 experts, top-2: done by an earlier pull" in rec.messages
    assert verify_model(r.path).ok and r.manifest["num_experts"] == 4
    assert not (moeinf_home() / "tmp" / r.name).exists()


def test_other_options_do_not_reuse_an_interrupted_step(dense_gguf):
    with pytest.raises(KeyboardInterrupt):
        pull_model(str(dense_gguf), transform=Upcycle(4, 2, max_new_tokens=6), progress=Recorder("converting"),
                   name="x")
    rec = Recorder()
    r = pull_model(str(dense_gguf), transform=Upcycle(4, 1, max_new_tokens=6), progress=rec, name="x")
    assert not any(m.startswith("resuming") for m in rec.messages)
    assert r.manifest["top_k"] == 1


def test_cli_says_that_pulling_again_resumes(monkeypatch):
    import engine.store.pull as pull
    from moeinf_cli.app import app

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pull, "pull_model", interrupted)
    r = CliRunner().invoke(app, ["pull", "some.gguf", "--upcycle", "4"])
    assert r.exit_code == 130
    assert "run the same `moeinf pull` again to resume" in r.stderr


def test_cli_refuses_bad_upcycle_options_before_any_work():
    from moeinf_cli.app import app

    for args, what in ((["--upcycle", "1"], "at least 2 experts"), (["--upcycle", "4", "--top-k", "5"], "--top-k"),
                       (["--top-k", "2"], "only applies with --upcycle")):
        r = CliRunner().invoke(app, ["pull", "missing.gguf", *args])
        assert r.exit_code != 0 and what in str(r.exception), (args, r.exception)


def test_upcycling_a_quantised_gguf_copies_its_blocks(tmp_path):
    """A Q8_0 GGUF pulled with --upcycle: every expert holds the dense FFN's Q8_0 blocks as they are
    (the demo's path: its Q4_1 is kept), equal to the GGUF reader's dequantisation once unpacked."""
    import torch

    from engine.formats.tensor import QuantTensor
    from engine.model.experts import load_expert
    from engine.store.gguf import gguf_to_checkpoint
    from engine.store.opened import as_store_model

    tok = tmp_path / "tok"
    tok.mkdir()
    make_tokenizer(tok)
    path = write_gguf(make_tiny_model("llama"), "llama", tok, tmp_path / "Tiny-Q8.gguf",
                      quantize=("ffn_gate",))
    r = pull_model(str(path), transform=Upcycle(4, 2, max_new_tokens=6), progress=Recorder())
    assert r.manifest["formats"]["experts"]["gate_proj.weight"] == "q8_0"
    from safetensors.torch import load_file

    dense = load_file(str(gguf_to_checkpoint(path, tmp_path / "ref", "float32") / "model.safetensors"))
    gate = dense["model.layers.0.mlp.gate_proj.weight"]
    for e in range(4):
        w, _ = load_expert(as_store_model(r.path), 0, e, torch.float32, torch.device("cpu"))
        assert isinstance(w.gate, QuantTensor) and w.gate.shape == tuple(gate.shape)
        assert torch.equal(w.gate.dequantize(torch.float32), gate)
