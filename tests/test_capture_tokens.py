"""Token and vision transformers: keyword (dict) probes, attention masks, nested tensors,
ModelOutput fields, layout-checked reductions. Every stored value is compared with a direct
forward pass written out in the test."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ibscope.capture import capture, plan_layers
from ibscope.capture.probe import ModelInput, load_probe
from ibscope.cli.main import app
from ibscope.errors import DataError, UsageError
from ibscope.store import open_store

SRC = textwrap.dedent('''
    import dataclasses
    from collections import OrderedDict

    import torch
    import torch.nn as nn


    class ViTish(nn.Module):
        """cls token + 16 patch tokens (16x16 image, 4x4 patches), pre-norm encoder blocks, dim 32."""

        def __init__(self, dim=32, depth=2):
            super().__init__()
            self.patch = nn.Conv2d(3, dim, 4, 4)
            self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
            self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.5)
            self.blocks = nn.Sequential(*[nn.TransformerEncoderLayer(dim, 4, 64, batch_first=True, norm_first=True)
                                          for _ in range(depth)])
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, 10)

        def tokens(self, x):
            t = self.patch(x).flatten(2).transpose(1, 2)
            return torch.cat([self.cls.expand(len(t), -1, -1), t], 1) + self.pos

        def forward(self, pixel_values):
            return self.head(self.norm(self.blocks(self.tokens(pixel_values)))[:, 0])


    class TokenEncoder(nn.Module):
        """Stands in for a BERT-style encoder: forward(input_ids, attention_mask, token_type_ids)."""

        def __init__(self, vocab=50, dim=32, nested=False):
            super().__init__()
            self.emb = nn.Embedding(vocab, dim)
            self.typ = nn.Embedding(2, dim)
            self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(dim, 4, 64, batch_first=True), 2,
                                                 enable_nested_tensor=nested)
            self.head = nn.Linear(dim, 2)

        def embed(self, input_ids, token_type_ids=None):
            return self.emb(input_ids) + (0 if token_type_ids is None else self.typ(token_type_ids))

        def forward(self, input_ids, attention_mask=None, token_type_ids=None):
            pad = None if attention_mask is None else attention_mask == 0
            h = self.encoder(self.embed(input_ids, token_type_ids), src_key_padding_mask=pad)
            return self.head(h[:, 0])


    def nested():
        return TokenEncoder(nested=True)


    class Packed(TokenEncoder):
        """ids and mask packed into one tensor x (N, 2, T), nested fast path on."""

        def __init__(self):
            super().__init__(nested=True)

        def forward(self, x):
            return super().forward(x[:, 0], x[:, 1])


    class IdsOnly(TokenEncoder):
        def forward(self, input_ids):
            return super().forward(input_ids)


    class Output(OrderedDict):
        """Like transformers' ModelOutput: a mapping whose fields are also attributes."""

        def __getattr__(self, k):
            try:
                return self[k]
            except KeyError:
                raise AttributeError(k) from None


    @dataclasses.dataclass
    class Plain:
        hidden: torch.Tensor
        pooled: torch.Tensor


    class WithOutputs(TokenEncoder):
        def forward(self, input_ids, attention_mask=None):
            pad = attention_mask == 0
            h = self.encoder(self.embed(input_ids), src_key_padding_mask=pad)
            return Output(last_hidden_state=h, pooler_output=torch.tanh(self.head(h[:, 0])))


    class DataclassOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(6, 4)

        def forward(self, x):
            h = self.inner(x)
            return Plain(hidden=h, pooled=h.sum(1, keepdim=True))


    class Conv1dBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm1d(8)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.bn(self.conv(x)))


    class Signal(nn.Module):
        """(N, 3, 20) signals: a custom conv block whose (N, 8, 20) output is a map, not a sequence."""

        def __init__(self):
            super().__init__()
            self.block = Conv1dBlock()
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.block(x).mean(2))
''')


@pytest.fixture()
def mods(tmp_path):
    from ibscope.capture.loading import _import_file

    p = tmp_path / "tok_models.py"
    p.write_text(SRC)
    return _import_file(p)


def spec(tmp_path, name):
    return f"{tmp_path / 'tok_models.py'}:{name}"


def token_probe(n=24, t=10, seed=0, left=()):
    """ids / mask / token types with right padding (rows in ``left``: left padding)."""
    g = np.random.default_rng(seed)
    lens = g.integers(2, t + 1, n)
    lens[0] = t
    mask = (np.arange(t)[None] < lens[:, None]).astype(np.int64)
    for i in left:
        mask[i] = mask[i][::-1]
    ids = g.integers(1, 50, (n, t)) * mask
    types = (np.arange(t)[None] >= (lens[:, None] // 2)).astype(np.int64) * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "y": np.arange(n) % 2}


def reference_layers(model, p):
    """Each encoder layer's output run by hand on the padded batch (padding masked in attention)."""
    ids = torch.as_tensor(p["input_ids"])
    mask = torch.as_tensor(p["attention_mask"]) != 0
    types = torch.as_tensor(p["token_type_ids"]) if "token_type_ids" in p else None
    outs = []
    with torch.no_grad():
        h = model.embed(ids, types)
        for layer in model.encoder.layers:
            h = layer(h, src_key_padding_mask=~mask)
            outs.append(h)
    return outs, mask


def masked(h, mask, op):
    m = mask.to(h.dtype)
    if op == "mean":
        return (h * m[..., None]).sum(1) / m.sum(1, keepdim=True)
    rows = torch.arange(len(h))
    real = [torch.nonzero(r).reshape(-1) for r in mask]
    idx = torch.tensor([int(r[0]) if op == "first" else int(r[-1]) for r in real])
    return h[rows, idx]


def save_ckpt(model, path):
    torch.save({"epoch": 3, "state_dict": model.state_dict()}, path)
    return str(path)


def test_token_model_keyword_inputs_and_masked_reductions(tmp_path, mods):
    torch.manual_seed(1)
    model = mods.TokenEncoder().eval()
    ck = save_ckpt(model, tmp_path / "tok.pt")
    p = token_probe(left=(3, 7))  # two left-padded rows: first/last real token are not positions 0/-1
    np.savez(tmp_path / "tok.npz", **p)
    store = capture(spec(tmp_path, "TokenEncoder"), ck, str(tmp_path / "tok.npz"),
                    ["encoder.layers.*", "encoder.layers.1=first1", "encoder.layers.1=last1"], tmp_path / "acts",
                    reduce={"encoder.layers.*": "mean", "first1": "first", "last1": "last"}, batch_size=7,
                    progress=False)
    st = open_store(store)
    outs, mask = reference_layers(model, p)
    for i in range(2):
        np.testing.assert_allclose(st.activations(0, f"encoder.layers.{i}"), masked(outs[i], mask, "mean").numpy(),
                                   rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(st.activations(0, "first1"), masked(outs[1], mask, "first").numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(st.activations(0, "last1"), masked(outs[1], mask, "last").numpy(), rtol=1e-5, atol=1e-5)
    # the padding really is excluded: the unmasked mean differs
    assert not np.allclose(st.activations(0, "encoder.layers.1"), outs[1].mean(1).numpy(), atol=1e-3)
    meta = st.layer_meta("encoder.layers.0")
    assert meta["masked"] is True and meta["reduction"] == "mean"
    cfg = st.config
    assert cfg["input_key"] == "input_ids"
    assert [(e["name"], e["passed"]) for e in cfg["probe_inputs"]] == [
        ("input_ids", "keyword input_ids="), ("attention_mask", "keyword attention_mask="),
        ("token_type_ids", "keyword token_type_ids=")]
    # the stored inputs are the primary array, the ids
    np.testing.assert_array_equal(st.inputs(), p["input_ids"].astype(np.float32))
    # another mask is another probe: --resume refuses it
    p2 = dict(p, attention_mask=np.ones_like(p["attention_mask"]))
    np.savez(tmp_path / "tok2.npz", **p2)
    with pytest.raises(DataError, match="probe_inputs"):
        capture(spec(tmp_path, "TokenEncoder"), ck, str(tmp_path / "tok2.npz"),
                ["encoder.layers.*", "encoder.layers.1=first1", "encoder.layers.1=last1"], tmp_path / "acts",
                reduce={"encoder.layers.*": "mean", "first1": "first", "last1": "last"}, batch_size=7, resume=True,
                progress=False)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_nested_tensor_fast_path_gives_the_masked_values(tmp_path, mods):
    torch.manual_seed(2)
    plain = mods.TokenEncoder().eval()
    ck = save_ckpt(plain, tmp_path / "tok.pt")
    p = token_probe(n=16)  # right padding: what the nested fast path needs
    np.savez(tmp_path / "tok.npz", **p)
    layers = ["encoder.layers.*", "encoder.layers.1=first1", "encoder.layers.0=flat0"]
    red = {"encoder.layers.*": "mean", "first1": "first", "flat0": "flatten"}
    # the fast path is really taken: the hooks see nested tensors
    nested = mods.nested().eval()
    nested.load_state_dict(plain.state_dict())
    seen = []
    h = nested.encoder.layers[0].register_forward_hook(lambda m, a, o: seen.append(o.is_nested))
    with torch.no_grad():
        nested(torch.as_tensor(p["input_ids"]), torch.as_tensor(p["attention_mask"]))
    h.remove()
    assert seen == [True]
    st = open_store(capture(spec(tmp_path, "nested"), ck, str(tmp_path / "tok.npz"), layers, tmp_path / "acts",
                            reduce=red, batch_size=5, progress=False))
    outs, mask = reference_layers(plain, p)
    np.testing.assert_allclose(st.activations(0, "encoder.layers.0"), masked(outs[0], mask, "mean").numpy(),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(st.activations(0, "first1"), masked(outs[1], mask, "first").numpy(), rtol=1e-5, atol=1e-5)
    # flatten pads each sequence back to the probe's length with zeros (what nn.TransformerEncoder returns)
    flat = st.activations(0, "flat0").reshape(16, 10, 32)
    real = mask.numpy()
    np.testing.assert_allclose(flat[real], outs[0].numpy()[real], rtol=1e-5, atol=1e-5)
    assert (flat[~real] == 0).all()
    assert st.layer_meta("encoder.layers.0")["nested"] is True and st.layer_meta("flat0")["raw_shape"] == [10, 32]


def test_nested_tensors_without_a_mask_array_name_the_actual_cause(tmp_path, mods):
    torch.manual_seed(3)
    model = mods.Packed().eval()
    ck = save_ckpt(model, tmp_path / "p.pt")
    p = token_probe(n=12)
    np.savez(tmp_path / "packed.npz", x=np.stack([p["input_ids"], p["attention_mask"]], 1), y=p["y"])
    # mean/first/last reduce each packed sequence over its real tokens: works
    st = open_store(capture(spec(tmp_path, "Packed"), ck, str(tmp_path / "packed.npz"), ["encoder.layers.1"],
                            tmp_path / "ok", reduce="first", progress=False))
    outs, mask = reference_layers(model, {k: p[k] for k in ("input_ids", "attention_mask")})
    np.testing.assert_allclose(st.activations(0, "encoder.layers.1"), masked(outs[1], mask, "first").numpy(),
                               rtol=1e-5, atol=1e-5)
    # flatten needs the sequence length, which only an attention_mask array gives: the error says so
    with pytest.raises(DataError, match="nested tensor") as ei:
        capture(spec(tmp_path, "Packed"), ck, str(tmp_path / "packed.npz"), ["encoder.layers.1"], tmp_path / "bad",
                reduce="flatten", progress=False)
    assert "attention_mask" in ei.value.hint and "probe shape" not in str(ei.value)


def test_vit_blocks_match_direct_forward(tmp_path, mods):
    torch.manual_seed(4)
    vit = mods.ViTish().eval()
    ck = save_ckpt(vit, tmp_path / "vit.pt")
    x = torch.randn(20, 3, 16, 16)
    np.savez(tmp_path / "img.npz", pixel_values=x.numpy(), y=np.arange(20) % 10)
    st = open_store(capture(spec(tmp_path, "ViTish"), ck, str(tmp_path / "img.npz"),
                            ["blocks.*", "blocks.1=last1", "norm", "patch", "output"], tmp_path / "acts",
                            reduce={"blocks.*": "first", "last1": "last", "norm": "mean"}, batch_size=8,
                            progress=False))
    with torch.no_grad():
        t = vit.tokens(x)
        b0 = vit.blocks[0](t)
        b1 = vit.blocks[1](b0)
        n = vit.norm(b1)
        logits = vit.head(n[:, 0])
        patch = vit.patch(x)
    for name, ref in (("blocks.0", b0[:, 0]), ("blocks.1", b1[:, 0]), ("last1", b1[:, -1]), ("norm", n.mean(1)),
                      ("patch", patch.mean((2, 3))), ("output", logits)):
        np.testing.assert_allclose(st.activations(0, name), ref.numpy(), rtol=1e-5, atol=1e-5, err_msg=name)
    assert st.layer_meta("patch")["reduction"] == "gap"  # a conv map: auto -> gap


def test_sequence_reductions_are_checked_against_the_layout(tmp_path, mods):
    torch.manual_seed(5)
    vit = mods.ViTish().eval()
    x = torch.randn(4, 3, 16, 16)
    inp = ModelInput({"pixel_values": x}, "pixel_values")
    # auto on sequences: one error naming every layer the glob matched, the hint uses the glob
    with pytest.raises(UsageError) as ei:
        plan_layers(vit, inp, ["blocks.*"])
    msg = str(ei.value)
    assert "'blocks.0', 'blocks.1' (from 'blocks.*')" in msg and "(batch, 17, 32)" in msg
    assert "--reduce 'blocks.*=mean'" in ei.value.hint and "--reduce 'blocks.*=first'" in ei.value.hint
    # gap on a sequence would average the 32 features of each of the 17 tokens: refused, with mean as the fix
    with pytest.raises(UsageError) as ei:
        plan_layers(vit, inp, ["blocks.*"], {"blocks.*": "gap"})
    assert "'blocks.0', 'blocks.1'" in str(ei.value) and "one value per position" in str(ei.value)
    assert "--reduce 'blocks.*=mean' averages over positions and keeps the 32 features" in ei.value.hint
    # a glob whose matches are only partly at fault: each faulty layer by name
    with pytest.raises(UsageError) as ei:
        plan_layers(vit, inp, ["blocks.*", "patch"], {"blocks.0": "first", "*": "auto"})
    assert "Layer 'blocks.1' (from 'blocks.*')" in str(ei.value) and "--reduce 'blocks.1=mean'" in ei.value.hint
    # mean/first/last on a channels-first map would average over the channels: refused, gap suggested
    with pytest.raises(UsageError) as ei:
        plan_layers(vit, inp, ["patch"], "mean")
    assert "channels-first map (batch, 32, 4, 4)" in str(ei.value) and "--reduce 'patch=gap'" in ei.value.hint
    # a custom Conv1d block's (N, 8, 20) output is a map (its last module is BatchNorm1d -> ReLU): auto is gap
    sig = mods.Signal().eval()
    xs = torch.randn(4, 3, 20)
    _, red, meta, _ = plan_layers(sig, xs, ["block", "block.conv"])
    assert meta["block"]["reduction"] == "gap" and meta["block"]["dims"] == 8
    with torch.no_grad():
        np.testing.assert_allclose(red["block"](sig.block(xs)).numpy(), sig.block(xs).mean(2).numpy(), rtol=1e-6)
    with pytest.raises(UsageError, match="would average over the 8 channels"):
        plan_layers(sig, xs, ["block"], "mean")


def test_cli_reduction_errors_exit_2_and_write_nothing(tmp_path, mods):
    vit = mods.ViTish().eval()
    ck = save_ckpt(vit, tmp_path / "vit.pt")
    np.savez(tmp_path / "img.npz", x=np.random.default_rng(0).normal(size=(6, 3, 16, 16)).astype("float32"))
    base = ["capture", "-m", spec(tmp_path, "ViTish"), "-c", ck, "-p", str(tmp_path / "img.npz"), "-l", "blocks.*",
            "-o", str(tmp_path / "acts"), "-q"]
    res = CliRunner().invoke(app, base)
    assert res.exit_code == 2 and "'blocks.0', 'blocks.1' (from 'blocks.*')" in res.output, res.output
    res = CliRunner().invoke(app, base + ["-r", "blocks.*=gap"])
    assert res.exit_code == 2 and "--reduce 'blocks.*=mean'" in res.output, res.output
    assert not (tmp_path / "acts").exists()
    res = CliRunner().invoke(app, base + ["-r", "blocks.*=mean"])
    assert res.exit_code == 0, res.output
    assert open_store(tmp_path / "acts").layer_meta("blocks.1")["dims"] == 32


def test_probe_arrays_must_fit_forward_and_masks_are_checked(tmp_path, mods):
    p = token_probe(n=8)
    ck = save_ckpt(mods.TokenEncoder(), tmp_path / "t.pt")
    np.savez(tmp_path / "ids_mask.npz", x=p["input_ids"], attention_mask=p["attention_mask"], y=p["y"])
    with pytest.raises(DataError) as ei:  # before any work: no store
        capture(spec(tmp_path, "IdsOnly"), ck, str(tmp_path / "ids_mask.npz"), ["encoder.layers.0"], tmp_path / "a",
                reduce="mean", progress=False)
    assert "'attention_mask' is passed as attention_mask=..., but forward() has no parameter 'attention_mask'" in str(ei.value)
    assert "IdsOnly.forward(input_ids)" in str(ei.value) and not (tmp_path / "a").exists()
    np.savez(tmp_path / "dup.npz", x=p["input_ids"], input_ids=p["input_ids"])
    with pytest.raises(DataError, match="'x' already fills forward\\(\\)'s first argument 'input_ids'"):
        capture(spec(tmp_path, "TokenEncoder"), ck, str(tmp_path / "dup.npz"), ["encoder.layers.0"], tmp_path / "a",
                reduce="mean", progress=False)
    # x positionally + attention_mask by keyword fits forward(input_ids, attention_mask=None)
    st = open_store(capture(spec(tmp_path, "TokenEncoder"), ck, str(tmp_path / "ids_mask.npz"), ["encoder.layers.0"],
                            tmp_path / "ok", reduce="mean", progress=False))
    assert st.layer_meta("encoder.layers.0")["masked"] is True and st.config["input_key"] == "x"
    bad = dict(p)
    bad["attention_mask"] = p["attention_mask"].copy()
    bad["attention_mask"][[2, 5]] = 0
    np.savez(tmp_path / "empty_rows.npz", **bad)
    with pytest.raises(DataError, match="Probe rows 2, 5 have no real token"):
        load_probe(str(tmp_path / "empty_rows.npz"))
    np.savez(tmp_path / "twos.npz", input_ids=p["input_ids"], attention_mask=p["attention_mask"] * 2)
    with pytest.raises(DataError, match="must hold 0 \\(padding\\) and 1 \\(real token\\) only; it holds 0, 2"):
        load_probe(str(tmp_path / "twos.npz"))
    np.savez(tmp_path / "short.npz", input_ids=p["input_ids"], attention_mask=p["attention_mask"][:, :5])
    with pytest.raises(DataError, match="differ in length"):
        load_probe(str(tmp_path / "short.npz"))
    # a left-padded mask cut short has all-0 rows: the length is named first, not "no real token"
    left = np.zeros_like(p["attention_mask"])
    left[:, -3:] = 1
    np.savez(tmp_path / "left_short.npz", input_ids=p["input_ids"], attention_mask=left[:, :5])
    with pytest.raises(DataError, match="differ in length"):
        load_probe(str(tmp_path / "left_short.npz"))
    np.savez(tmp_path / "rows.npz", input_ids=p["input_ids"], attention_mask=p["attention_mask"][:5])
    with pytest.raises(DataError, match="different numbers of samples: 'input_ids' 8, 'attention_mask' 5"):
        load_probe(str(tmp_path / "rows.npz"))


def test_dict_probes_from_pt_h5_and_datasets_agree(tmp_path):
    import h5py

    p = token_probe(n=9)
    torch.save({k: torch.as_tensor(v) for k, v in p.items()}, tmp_path / "p.pt")
    with h5py.File(tmp_path / "p.h5", "w") as f:
        for k, v in p.items():
            f[k] = v
    (tmp_path / "ds.py").write_text(textwrap.dedent('''
        import numpy as np
        class DS:
            def __init__(self):
                self.d = dict(np.load(__file__.replace("ds.py", "p.npz")))
            def __len__(self):
                return len(self.d["y"])
            def __getitem__(self, i):
                return {k: v[i] for k, v in self.d.items()}
        '''))
    np.savez(tmp_path / "p.npz", **p)
    for src in (str(tmp_path / "p.pt"), str(tmp_path / "p.h5"), f"{tmp_path / 'ds.py'}:DS", str(tmp_path / "p.npz")):
        pr = load_probe(src, max_samples=6)
        assert sorted(pr.inputs) == ["attention_mask", "input_ids", "token_type_ids"], src
        assert pr.primary == "input_ids" and pr.keyword == sorted(pr.keyword, key=list(pr.inputs).index)
        for k in pr.inputs:
            np.testing.assert_array_equal(pr.inputs[k].numpy(), p[k][:6])
        np.testing.assert_array_equal(pr.y, p["y"][:6])
        b = pr.batch(2, 5)
        assert b.n == 3 and b.mask.dtype == torch.bool and b.mask.shape == (3, 10)


def test_model_output_fields_by_name(tmp_path, mods):
    torch.manual_seed(6)
    model = mods.WithOutputs().eval()
    ck = save_ckpt(model, tmp_path / "w.pt")
    p = token_probe(n=10)
    del p["token_type_ids"]
    np.savez(tmp_path / "p.npz", **p)
    st = open_store(capture(spec(tmp_path, "WithOutputs"), ck, str(tmp_path / "p.npz"),
                            ["output['last_hidden_state']", "output['pooler_output']"], tmp_path / "acts",
                            reduce={"output['last_hidden_state']": "mean"}, progress=False))
    ids, mask = torch.as_tensor(p["input_ids"]), torch.as_tensor(p["attention_mask"])
    with torch.no_grad():
        out = model(ids, mask)
    np.testing.assert_allclose(st.activations(0, "output['last_hidden_state']"),
                               masked(out.last_hidden_state, mask != 0, "mean").numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(st.activations(0, "output['pooler_output']"), out.pooler_output.numpy(), rtol=1e-6)
    # a dataclass output (no __getitem__): fields by name too
    dc = mods.DataclassOut().eval()
    xs = torch.randn(5, 6)
    _, red, meta, _ = plan_layers(dc, xs, ["output['pooled']", "output[hidden]"])
    assert meta["output['pooled']"]["dims"] == 1 and meta["output['hidden']"]["dims"] == 4


def test_cli_layers_lists_the_probe_inputs(tmp_path, mods):
    p = token_probe(n=6)
    np.savez(tmp_path / "p.npz", **p)
    res = CliRunner().invoke(app, ["layers", "-m", spec(tmp_path, "TokenEncoder"), "-p", str(tmp_path / "p.npz"),
                                   "-l", "encoder.layers.*", "-r", "mean", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    assert [(e["name"], e["passed"]) for e in got["inputs"]] == [
        ("input_ids", "keyword input_ids="), ("attention_mask", "keyword attention_mask="),
        ("token_type_ids", "keyword token_type_ids=")]
    assert got["inputs"][1]["shape"] == [10] and got["inputs"][1]["dtype"] == "int64"
    assert "padding mask" in got["inputs"][1]["role"] and got["selected"]["encoder.layers.0"]["masked"] is True
    res = CliRunner().invoke(app, ["layers", "-m", spec(tmp_path, "TokenEncoder"), "-p", str(tmp_path / "p.npz")])
    assert res.exit_code == 0 and "Probe inputs" in res.output, res.output
    row = next(ln for ln in res.output.splitlines() if ln.startswith("│ attention_mask"))
    assert "│ 10 " in row and "int64" in row and "keyword" in row


def test_jacobians_refused_for_token_ids_before_any_work(tmp_path, mods):
    p = token_probe(n=6)
    np.savez(tmp_path / "p.npz", **p)
    ck = save_ckpt(mods.TokenEncoder(), tmp_path / "t.pt")
    with pytest.raises(UsageError, match="floating-point probe input; 'input_ids' is int64"):
        capture(spec(tmp_path, "TokenEncoder"), ck, str(tmp_path / "p.npz"), ["encoder.layers.0"], tmp_path / "a",
                reduce="mean", jacobian_samples=4, progress=False)
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_hugging_face_bert_with_padding(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=16)
    torch.manual_seed(7)
    bert = transformers.BertModel(cfg).eval()
    (tmp_path / "hfm.py").write_text(textwrap.dedent(f'''
        import transformers
        def make():
            return transformers.BertModel(transformers.BertConfig(**{cfg.to_diff_dict()!r}))
        '''))
    ck = save_ckpt(bert, tmp_path / "bert.pt")
    p = token_probe(n=12)
    np.savez(tmp_path / "p.npz", **p)
    st = open_store(capture(f"{tmp_path / 'hfm.py'}:make", ck, str(tmp_path / "p.npz"),
                            ["encoder.layer.*", "output['last_hidden_state']", "output['pooler_output']"],
                            tmp_path / "acts", reduce={"encoder.layer.*": "mean", "output['last_hidden_state']": "first"},
                            batch_size=5, progress=False))
    t = {k: torch.as_tensor(v) for k, v in p.items() if k != "y"}
    with torch.no_grad():
        out = bert(**t, output_hidden_states=True)
    mask = t["attention_mask"] != 0
    for i in range(2):
        np.testing.assert_allclose(st.activations(0, f"encoder.layer.{i}"),
                                   masked(out.hidden_states[i + 1], mask, "mean").numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(st.activations(0, "output['last_hidden_state']"), out.last_hidden_state[:, 0].numpy(),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(st.activations(0, "output['pooler_output']"), out.pooler_output.numpy(), rtol=1e-4,
                               atol=1e-5)


def test_hugging_face_gpt2_decoder_left_padded(tmp_path):
    transformers = pytest.importorskip("transformers")
    kw = dict(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=16, bos_token_id=0, eos_token_id=0,
              pad_token_id=0, use_cache=False)
    torch.manual_seed(8)
    gpt = transformers.GPT2Model(transformers.GPT2Config(**kw)).eval()
    (tmp_path / "hfd.py").write_text(f"import transformers\ndef make():\n"
                                     f"    return transformers.GPT2Model(transformers.GPT2Config(**{kw!r}))\n")
    ck = save_ckpt(gpt, tmp_path / "gpt.pt")
    p = token_probe(n=10, left=range(10))  # decoders pad on the left: the last real token is the last position
    del p["token_type_ids"]
    np.savez(tmp_path / "p.npz", **p)
    st = open_store(capture(f"{tmp_path / 'hfd.py'}:make", ck, str(tmp_path / "p.npz"),
                            ["h.*", "ln_f", "h.1=first1"], tmp_path / "acts",
                            reduce={"h.*": "last", "ln_f": "mean", "first1": "first"}, batch_size=4, progress=False))
    t = {k: torch.as_tensor(v) for k, v in p.items() if k != "y"}
    blocks = []  # the blocks' own outputs (hidden_states ends with ln_f's output instead of the last block's)
    hooks = [b.register_forward_hook(lambda m, a, o: blocks.append(o)) for b in gpt.h]
    with torch.no_grad():
        hs = gpt(**t, output_hidden_states=True).hidden_states
    for h in hooks:
        h.remove()
    mask = t["attention_mask"] != 0
    torch.testing.assert_close(blocks[0], hs[1])
    for i in range(2):
        np.testing.assert_allclose(st.activations(0, f"h.{i}"), masked(blocks[i], mask, "last").numpy(), rtol=1e-4,
                                   atol=1e-5)
        np.testing.assert_allclose(st.activations(0, f"h.{i}"), blocks[i][:, -1].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(st.activations(0, "ln_f"), masked(hs[-1], mask, "mean").numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(st.activations(0, "first1"), masked(blocks[1], mask, "first").numpy(), rtol=1e-4,
                               atol=1e-5)
