"""Helpers for the data tests: independent references, hypothesis strategies, dataset file writers.

The references here do not use the code under test: chat templates are
re-derived in plain Python from their Jinja sources' layout, and a token's
characters come from its byte-level BPE string (GPT-2's byte <-> unicode table),
never from the tokenizer's offset mapping.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import strategies as st

from jaxrlhf.data import asset_path, load_tokenizer

TOKENIZER_DIR = str(asset_path("tokenizer"))
TEMPLATES = (None, "chatml_generation", "llama3")
DEFAULT_SYSTEM = "You are a helpful assistant."


def tokenizer():
    return load_tokenizer(TOKENIZER_DIR)


# --- Expected renderings, written from the templates' layout --------------------------------------


def expected_chatml(messages) -> tuple[str, list[tuple[int, int]]]:
    """ChatML text and the assistant spans (content + <|im_end|>), for both ChatML templates."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else DEFAULT_SYSTEM
    text = f"<|im_start|>system\n{system}<|im_end|>\n"
    spans = []
    for i, m in enumerate(messages):
        if i == 0 and m["role"] == "system":
            continue
        text += f"<|im_start|>{m['role']}\n"
        start = len(text)
        text += m["content"] + "<|im_end|>"
        if m["role"] == "assistant":
            spans.append((start, len(text)))
        text += "\n"
    return text, spans


def expected_llama3(messages) -> tuple[str, list[tuple[int, int]]]:
    """Llama-3 text (contents trimmed) and the assistant spans (trimmed content + <|eot_id|>)."""
    text = "<|begin_of_text|>"
    spans = []
    for m in messages:
        text += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
        start = len(text)
        text += m["content"].strip() + "<|eot_id|>"
        if m["role"] == "assistant":
            spans.append((start, len(text)))
    return text, spans


def expected_rendering(template, messages):
    return expected_llama3(messages) if template == "llama3" else expected_chatml(messages)


def end_of_turn(template) -> str:
    return "<|eot_id|>" if template == "llama3" else "<|im_end|>"


# --- A token's bytes and characters without the offset mapping -----------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = dict(zip(printable, map(chr, printable))), 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_OF_CHAR = {c: b for b, c in _bytes_to_unicode().items()}


def token_bytes(tok, ids) -> list[bytes]:
    """Each token's bytes: added tokens spell themselves, BPE tokens through the byte-level table."""
    added = set(tok.get_added_vocab())
    out = []
    for piece in tok.convert_ids_to_tokens([int(i) for i in ids]):
        out.append(piece.encode() if piece in added else bytes(_BYTE_OF_CHAR[c] for c in piece))
    return out


def byte_spans(tok, ids) -> np.ndarray:
    """[n, 2] byte offsets of each token in the concatenated bytes."""
    lengths = np.array([len(b) for b in token_bytes(tok, ids)], np.int64)
    ends = np.cumsum(lengths)
    return np.stack([ends - lengths, ends], axis=1)


def char_of_byte(text: str) -> np.ndarray:
    """Index of the character each UTF-8 byte of ``text`` belongs to (one extra entry for the end)."""
    sizes = [len(c.encode()) for c in text]
    return np.append(np.repeat(np.arange(len(text)), sizes), len(text))


def rule_mask(tok, ids, text: str, spans, *, skip: int = 0) -> np.ndarray:
    """The documented rule: trained iff the token's first character is in a span; 0 at position 0.

    ``skip`` leading tokens carry no characters of ``text`` (a post-processor BOS).
    """
    offsets = byte_spans(tok, ids[skip:])
    owner = char_of_byte(text)
    mask = np.zeros(len(ids), np.int32)
    for k, (start, end) in enumerate(offsets):
        first = owner[start]
        mask[skip + k] = end > start and any(a <= first < b for a, b in spans)
    mask[0] = 0
    return mask


def straddles(tok, ids, text: str, spans) -> bool:
    """Whether some token's bytes cross a span edge (a BPE merge across the boundary)."""
    edges = [len(text[:i].encode()) for span in spans for i in span]
    return any(start < e < end for start, end in byte_spans(tok, ids) for e in edges)


def decoded_spans(tok, ids, mask) -> list[str]:
    """The text of each run of consecutive trained tokens."""
    runs, current = [], []
    for piece, m in zip(token_bytes(tok, ids), mask):
        if m:
            current.append(piece)
        elif current:
            runs.append(b"".join(current).decode())
            current = []
    if current:
        runs.append(b"".join(current).decode())
    return runs


# --- Strategies -----------------------------------------------------------------------------------

_CHARS = st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="<>") | st.sampled_from("\n\t ")
_WHITESPACE = st.text(alphabet=" \n\t", max_size=3)


@st.composite
def contents(draw, *, nonblank: bool = True):
    """Text with unicode, and whitespace (newlines included) at both ends."""
    core = draw(st.text(alphabet=_CHARS, min_size=1, max_size=24))
    if nonblank and not core.strip():
        core = core + draw(st.sampled_from(["ok", "é", "日本", "🙂", "x y"]))
    return draw(_WHITESPACE) + core + draw(_WHITESPACE)


@st.composite
def conversations(draw, *, min_turns: int = 1, max_turns: int = 4):
    """Optional system turn, then 1-4 user/assistant exchanges."""
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(contents())})
    for _ in range(draw(st.integers(min_turns, max_turns))):
        messages.append({"role": "user", "content": draw(contents())})
        messages.append({"role": "assistant", "content": draw(contents())})
    return messages


# --- Dataset files ----------------------------------------------------------------------------------


def write_jsonl(path: pathlib.Path, records) -> pathlib.Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def write_parquet(path: pathlib.Path, records, *, row_group_size: int = 7) -> pathlib.Path:
    pq.write_table(pa.Table.from_pylist(list(records)), path, row_group_size=row_group_size)
    return path


def write_save_to_disk(folder: pathlib.Path, records, *, files: int = 2) -> pathlib.Path:
    """The layout ``datasets.Dataset.save_to_disk`` writes: Arrow stream shards + state.json."""
    folder.mkdir(parents=True)
    table = pa.Table.from_pylist(list(records))
    bounds = np.linspace(0, len(table), files + 1).astype(int)
    names = []
    for k in range(files):
        name = f"data-{k:05d}-of-{files:05d}.arrow"
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table.slice(bounds[k], bounds[k + 1] - bounds[k]), max_chunksize=5)
        names.append(name)
    state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": "test", "_split": None}
    (folder / "state.json").write_text(json.dumps(state))
    (folder / "dataset_info.json").write_text("{}")
    return folder


def write_dataset_dict(folder: pathlib.Path, splits: dict[str, list]) -> pathlib.Path:
    folder.mkdir(parents=True)
    for name, records in splits.items():
        write_save_to_disk(folder / name, records, files=1)
    (folder / "dataset_dict.json").write_text(json.dumps({"splits": list(splits)}))
    return folder


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in pathlib.Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
