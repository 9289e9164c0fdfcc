"""Offline CLIP tokenization and prompt encoding.

The tokenizer is transformers' ``CLIPTokenizer``. A model folder's own ``tokenizer/`` is used when present;
otherwise the vocabulary is rebuilt from the BPE merges file that open-clip-torch ships
(``bpe_simple_vocab_16e6.txt.gz``, the same file OpenAI's CLIP uses), so tokenization never needs the network.

Prompts longer than the encoder's window (77 tokens = BOS + 75 + EOS) are never cut silently: the tokens are
split into windows of 75, each window is wrapped in BOS/EOS, padded and encoded on its own, and the hidden states
are concatenated along the sequence (the A1111 web UI's rule). The negative prompt is padded to the same number
of windows.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import math
import os
import re
import tempfile
from pathlib import Path

import torch

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
OPENCLIP_PAD = "!"  # OpenCLIP-based encoders (SD 2.x, SDXL's second encoder) pad with token 0, which is "!"
T5_TOKENS = 256  # SD3's T5 sequence (diffusers' max_sequence_length); all zeros when the model has no T5


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table (Radford et al. 2019)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def open_clip_bpe_path() -> Path:
    """The BPE merges file shipped inside open-clip-torch, found without importing the package."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("no tokenizer/ in the model folder and open-clip-torch is not installed; "
                                "install it (`pip install --no-deps open-clip-torch`) for the CLIP vocabulary")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"open-clip-torch is installed but lacks its vocabulary file {path}")
    return path


@functools.lru_cache(maxsize=1)
def clip_vocab_files() -> tuple[str, str]:
    """Write ``vocab.json`` and ``merges.txt`` for transformers' CLIPTokenizer from open-clip's merges: the
    vocabulary is the 256 byte symbols, the same with ``</w>``, one token per merge (48 894), then BOS, EOS
    (49 408 in all, ids identical to openai/clip-vit-large-patch14)."""
    lines = gzip.open(open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    folder = Path(tempfile.mkdtemp(prefix="ldm-clip-vocab-"))
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return str(folder / "vocab.json"), str(folder / "merges.txt")


def load_tokenizer(folder: str | os.PathLike | None = None, pad_token: str = EOS):
    """A CLIPTokenizer from ``folder`` (a diffusers ``tokenizer/`` folder) if given and present, else the
    standard CLIP BPE from open-clip-torch with ``pad_token`` (``<|endoftext|>`` as SD 1.x, ``!`` as OpenCLIP)."""
    from transformers import CLIPTokenizer

    if folder is not None and Path(folder).is_dir():
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    vocab, merges = clip_vocab_files()
    return CLIPTokenizer(vocab, merges, pad_token=pad_token, model_max_length=77)


def save_tokenizer(tokenizer, folder: str | os.PathLike) -> None:
    """Save a tokenizer in the layout diffusers' pipelines load (``vocab.json``, ``merges.txt``, configs)."""
    tokenizer.save_pretrained(str(folder))


def multi_vector_tokens(tokenizer) -> dict[int, list[int]]:
    """The ids each multi-vector textual-inversion token stands for: an added token ``t`` with added tokens
    ``t_1`` ... ``t_{n-1}`` (diffusers' names for an n-vector embedding) maps to the ids of all n."""
    added = tokenizer.added_tokens_encoder  # {token: id}, BOS and EOS included
    expansions = {}
    for token, first in added.items():
        ids, k = [first], 1
        while f"{token}_{k}" in added:
            ids.append(added[f"{token}_{k}"])
            k += 1
        if k > 1:
            expansions[first] = ids
    return expansions


def prompt_token_groups(tokenizer, text: str) -> list[list[int]]:
    """BPE ids of ``text`` without BOS / EOS, one group per token: a multi-vector textual-inversion word's group
    holds the ids of all its vectors (what diffusers' ``maybe_convert_prompt`` does to the prompt's text), every
    other group one id."""
    ids = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    expansions = multi_vector_tokens(tokenizer)
    return [list(expansions.get(i, (i,))) for i in ids]


def prompt_token_ids(tokenizer, text: str) -> list[int]:
    """:func:`prompt_token_groups` flattened."""
    return [i for group in prompt_token_groups(tokenizer, text) for i in group]


def pack_windows(groups: list[list], body: int, windows: list[list] | None = None) -> list[list]:
    """Append the items of ``groups`` to ``windows`` (default: one empty window), at most ``body`` per window. A
    group that does not fit in what is left of a window starts the next one whole, as the A1111 web UI moves a
    textual-inversion embedding to the next chunk (only a group longer than a window is split)."""
    windows = [[]] if windows is None else windows
    for group in groups:
        if windows[-1] and len(windows[-1]) + len(group) > body and len(group) <= body:
            windows.append([])
        for item in group:
            if len(windows[-1]) == body:
                windows.append([])
            windows[-1].append(item)
    return windows


def token_windows(tokenizer, prompt: str, window: int | None = None) -> list[list[int]]:
    """Token ids of ``prompt`` split into windows of ``model_max_length - 2`` tokens (:func:`pack_windows`), each
    wrapped as ``[BOS] + tokens + [EOS] + pad`` to the full length. An empty prompt gives one window."""
    length = window or tokenizer.model_max_length
    chunks = pack_windows(prompt_token_groups(tokenizer, prompt), length - 2)
    return [_window(tokenizer, c, length) for c in chunks]


def _window(tokenizer, tokens: list[int], length: int) -> list[int]:
    """``[BOS] + tokens + [EOS] + pad`` to ``length``."""
    padding = [tokenizer.pad_token_id] * (length - 2 - len(tokens))
    return [tokenizer.bos_token_id] + tokens + [tokenizer.eos_token_id] + padding


def tokenize_batch(tokenizer, prompts: list[str], min_windows: int = 1) -> torch.Tensor:
    """Token ids ``(B, W, L)`` for a list of prompts, all padded to the same number of windows W (padding
    windows are empty prompts)."""
    windows = [token_windows(tokenizer, p) for p in prompts]
    count = max(min_windows, *(len(w) for w in windows))
    empty = token_windows(tokenizer, "")[0]
    return torch.tensor([w + [empty] * (count - len(w)) for w in windows])  # (B, W, L)


EMPHASIS_SYNTAXES = ("none", "a1111")
"""How a prompt's syntax is read: ``none``, literally (diffusers); ``a1111``, as the A1111 web UI reads it: emphasis
brackets and ``BREAK`` (:func:`parse_emphasis`) and ``AND`` between sub-prompts (:func:`split_conjunction`)."""
BREAK = -1.0  # the weight that marks an A1111 ``BREAK`` (start a new window)
_EMPHASIS_TOKEN = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """The A1111 web UI's emphasis syntax: ``(words)`` multiplies their weight by 1.1, ``[words]`` divides it by
    1.1, ``(words:1.5)`` multiplies it by 1.5; brackets nest (their factors multiply), an unclosed bracket applies
    to the rest of the prompt, ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are literal characters and the word
    ``BREAK`` ends a 75-token window (a piece ``("BREAK", BREAK)``). Returns ``(text, weight)`` pieces with
    neighbours of equal weight merged."""
    pieces: list[list] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if piece[1] != BREAK:  # (A1111 multiplies a BREAK's marker too, and then no longer sees the BREAK)
                piece[1] *= factor

    for match in _EMPHASIS_TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(pieces))
        elif token == "[":
            open_square.append(len(pieces))
        elif weight is not None and open_round:
            multiply_from(open_round.pop(), float(weight))
        elif token == ")" and open_round:
            multiply_from(open_round.pop(), 1.1)
        elif token == "]" and open_square:
            multiply_from(open_square.pop(), 1 / 1.1)
        else:
            for k, part in enumerate(_BREAK_WORD.split(token)):
                if k:
                    pieces.append(["BREAK", BREAK])
                pieces.append([part, 1.0])
    for start in open_round:
        multiply_from(start, 1.1)
    for start in open_square:
        multiply_from(start, 1 / 1.1)
    merged: list[list] = []
    for piece in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == piece[1] and piece[1] != BREAK:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(text, weight) for text, weight in merged]


def weighted_token_windows(tokenizer, prompt: str) -> tuple[list[list[int]], list[list[float]]]:
    """:func:`token_windows` of a prompt in A1111 emphasis syntax (:func:`parse_emphasis`), and each token's weight
    (1 for BOS, EOS and padding). Each piece is tokenized on its own, as A1111 does; ``BREAK`` closes a window."""
    body = tokenizer.model_max_length - 2
    windows: list[list[tuple[int, float]]] = [[]]
    for text, weight in parse_emphasis(prompt):
        if weight == BREAK:
            windows.append([])
            continue
        groups = [[(token, weight) for token in group] for group in prompt_token_groups(tokenizer, text)]
        pack_windows(groups, body, windows)
    ids = [_window(tokenizer, [t for t, _ in w], body + 2) for w in windows]
    weights = [[1.0] + [x for _, x in w] + [1.0] * (body + 1 - len(w)) for w in windows]
    return ids, weights


def tokenize_weighted_batch(tokenizer, prompts: list[str], min_windows: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`tokenize_batch` for prompts in A1111 emphasis syntax: token ids and weights, both ``(B, W, L)``."""
    pairs = [weighted_token_windows(tokenizer, p) for p in prompts]
    count = max(min_windows, *(len(ids) for ids, _ in pairs))
    empty = token_windows(tokenizer, "")[0]
    ids = [w + [empty] * (count - len(w)) for w, _ in pairs]
    weights = [x + [[1.0] * len(empty)] * (count - len(x)) for _, x in pairs]
    return torch.tensor(ids), torch.tensor(weights)


def emphasize(hidden: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The A1111 web UI's emphasis ("Original"): each token's states ``(B, W * L, D)`` times its weight ``(B, W, L)``,
    then each window rescaled so that the mean of all its states is what it was before weighting. ``weights=None``
    (prompts read literally) returns ``hidden`` as it is."""
    if weights is None:
        return hidden
    batch, windows, length = weights.shape
    states = hidden.float().reshape(batch, windows, length, -1)
    weighted = states * weights.to(states)[..., None]
    before, after = states.mean(dim=(2, 3), keepdim=True), weighted.mean(dim=(2, 3), keepdim=True)
    scale = torch.where(after == 0, torch.ones_like(after), before / after)  # a zero-mean window keeps its scale
    return (weighted * scale).reshape(hidden.shape)  # float32


_AND_WORD = re.compile(r"\bAND\b")
_PART_WEIGHT = re.compile(r"^(.*?)\s*:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*$", re.S)


def split_conjunction(prompt: str) -> list[tuple[str, float]]:
    """The A1111 web UI's composable-diffusion syntax (Liu et al. 2022, sec. 4.1, the conjunction of eq. 10):
    the upper-case word ``AND`` separates sub-prompts, each of which may end in ``:weight`` (default 1). Returns
    ``(sub-prompt, weight)`` pairs; a prompt without ``AND`` or a trailing weight is one pair of weight 1. A
    weight inside brackets, ``(word:1.2)``, is emphasis (:func:`parse_emphasis`), not a sub-prompt weight; any
    other trailing ``:number`` is one ("a poster, 16:9" is "a poster, 16" weighted 9, as in the web UI)."""
    parts = []
    for part in _AND_WORD.split(prompt):
        match = _PART_WEIGHT.match(part)
        parts.append((match.group(1).strip(), float(match.group(2))) if match else (part.strip(), 1.0))
        if not math.isfinite(parts[-1][1]):
            raise ValueError(f"sub-prompt weight must be finite, got {match.group(2)[:20]}... in {part[:40]!r}")
    return parts


class _Unparsed(Exception):
    """A bracket that does not close as a construct; at the top level the web UI then reads it as a character."""


def _parse_prompt(text: str, i: int, stops: str) -> tuple[list, int]:
    """Nodes of ``text`` from ``i`` up to an unescaped character of ``stops`` at this depth: strings (emphasis
    brackets and escapes kept for :func:`parse_emphasis`), ``("edit", before, after, when)`` and
    ``("alternate", options)``, where before / after / options are node lists. At the top level (no ``stops``)
    a bracket that does not close is a plain character, as in the web UI's grammar."""
    nodes, plain = [], []
    while i < len(text) and text[i] not in stops:
        char = text[i]
        if char == "\\" and i + 1 < len(text):
            plain.append(text[i:i + 2])
            i += 2
            continue
        if char in "([":
            try:
                construct, after = _parse_round(text, i + 1) if char == "(" else _parse_square(text, i + 1)
            except _Unparsed:
                if stops:
                    raise
                plain.append(char)
                i += 1
                continue
            nodes += ["".join(plain), *construct]
            plain, i = [], after
        elif char in ")]" and stops:
            raise _Unparsed
        else:
            plain.append(char)
            i += 1
    return nodes + ["".join(plain)], i


def _parse_round(text: str, i: int) -> tuple[list, int]:
    """After a ``(``: emphasis, kept as text around its parsed inside."""
    inner, i = _parse_prompt(text, i, ")")
    if i >= len(text):
        raise _Unparsed
    return ["(", *inner, ")"], i + 1


_WHEN = re.compile(r"\s*[+-]?(\d+(\.\d*)?|\.\d+)\s*")


def _parse_square(text: str, i: int) -> tuple[list, int]:
    """After a ``[``: ``[before:after:when]`` / ``[after:when]`` editing, ``[a|b|...]`` alternation, or ``[text]``
    (de-emphasis, kept as text). In an edit, ``|`` is a plain character (the web UI's reading of
    ``[{b|d{:.5]``)."""
    parts, separators = [], []
    while True:
        part, i = _parse_prompt(text, i, ":|]")
        parts.append(part)
        if i >= len(text):
            raise _Unparsed
        if text[i] == "]":
            break
        separators.append(text[i])
        i += 1
    if ":" in separators:
        merged = [parts[0]]
        for separator, part in zip(separators, parts[1:]):
            if separator == "|":
                merged[-1] = [*merged[-1], "|", *part]
            else:
                merged.append(part)
        when = parts[-1]
        if len(merged) > 3 or any(not isinstance(node, str) for node in when) or \
                not _WHEN.fullmatch("".join(when)):
            raise _Unparsed
        return [("edit", merged[0] if len(merged) == 3 else [], merged[-2], "".join(when).strip())], i + 1
    if separators:
        return [("alternate", parts)], i + 1
    return ["[", *parts[0], "]"], i + 1


def _edit_step(when: str, steps: int, first_pass_steps: int | None) -> int:
    """The step of ``[a:b:when]`` in the web UI's (1.6+) reading: a number with a point is a fraction of the
    steps, one without a step count; in a hires fix's second pass (``first_pass_steps`` given), 1.5 is half-way
    through it and 25 the fifth step after 20 first-pass ones. At most ``steps``."""
    value = float(when)
    if "." in when:
        value = (value - (first_pass_steps is not None)) * steps
    elif first_pass_steps is not None:
        value -= first_pass_steps
    return min(steps, int(value))


def _text_at(nodes: list, step: int, when_of) -> str:
    """The prompt ``nodes`` say at 1-based ``step``: an edit's ``before`` up to and including its step, then
    ``after``; option ``(step - 1) mod n`` of an alternation."""
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif node[0] == "edit":
            _, before, after, when = node
            out.append(_text_at(before if step <= when_of(when) else after, step, when_of))
        else:
            options = node[1]
            out.append(_text_at(options[(step - 1) % len(options)], step, when_of))
    return "".join(out)


def _edit_steps(nodes: list, steps: int, when_of) -> set[int]:
    """The steps after which the prompt ``nodes`` describe may change."""
    found = set()
    for node in nodes:
        if isinstance(node, tuple) and node[0] == "edit":
            step = when_of(node[3])
            found |= {step} if step >= 1 else set()
            found |= _edit_steps(node[1], steps, when_of) | _edit_steps(node[2], steps, when_of)
        elif isinstance(node, tuple):
            found |= set(range(1, steps + 1))
            for option in node[1]:
                found |= _edit_steps(option, steps, when_of)
    return found


def prompt_schedule(prompt: str, steps: int, first_pass_steps: int | None = None) -> list[tuple[int, str]]:
    """The A1111 web UI's prompt editing (``modules/prompt_parser.py``): ``[before:after:when]`` says ``before``
    up to step ``when`` and ``after`` from then on (``when`` with a point: a fraction of the steps); ``[after:when]``
    adds, ``[before::when]`` removes; ``[a|b|c]`` alternates every step; they nest, emphasis brackets are kept, and
    a bracket that does not close is text. ``first_pass_steps``: these are a hires fix's second-pass steps (see
    :func:`_edit_step`). Returns the web UI's schedule ``[(last_step, text), ...]`` (sorted, the last at
    ``steps``); sampler step k (0-based) uses the first entry with ``last_step >= k``, as the web UI reads it."""
    try:
        nodes, _ = _parse_prompt(prompt, 0, "")
    except RecursionError:
        return [(steps, prompt)]

    def when_of(when: str) -> int:
        return _edit_step(when, steps, first_pass_steps)

    return [(step, _text_at(nodes, step, when_of)) for step in sorted(_edit_steps(nodes, steps, when_of) | {steps})]


def plain_text(prompt: str) -> str:
    """A prompt in A1111 emphasis syntax with its brackets, weights and ``BREAK`` words taken out (for encoders
    that do not weigh tokens, such as SD3's T5)."""
    return " ".join("".join(" " if weight == BREAK else text for text, weight in parse_emphasis(prompt)).split())


@torch.no_grad()
def encode_tokens(text_encoder, token_ids: torch.Tensor, hidden_layer: int | None = None,
                  final_norm: bool = False) -> torch.Tensor:
    """Encode ``(B, W, L)`` token windows with a CLIP text model and concatenate the windows' hidden states:
    ``(B, W * L, D)``. ``hidden_layer=None`` takes the final (layer-normed) states, as SD 1.x/2.x; ``-2`` the
    penultimate layer's, as SDXL; ``final_norm`` passes an earlier layer's states through the final layer norm,
    as SD 1.x/2.x do with clip skip."""
    hidden = _encode(text_encoder, token_ids, hidden_layer)[0]
    if not final_norm or hidden_layer is None:
        return hidden
    text_model = getattr(text_encoder, "text_model", text_encoder)  # transformers 5 has no text_model level
    return text_model.final_layer_norm(hidden)


@torch.no_grad()
def encode_tokens_and_pooled(text_encoder, token_ids: torch.Tensor, hidden_layer: int | None = None):
    """:func:`encode_tokens` and, from the same pass, each prompt's pooled embedding ``(B, P)`` of its first window
    (CLIPTextModelWithProjection's projected ``text_embeds``, SDXL's and SD3's pooled condition; a plain
    CLIPTextModel's ``pooler_output``)."""
    hidden, out, windows = _encode(text_encoder, token_ids, hidden_layer)
    pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output  # (B * W, P)
    return hidden, pooled[::windows]


def _encode(text_encoder, token_ids: torch.Tensor, hidden_layer: int | None):
    """One pass over all windows: ``(hidden (B, W * L, D), the model output, W)``."""
    batch, windows, length = token_ids.shape
    flat = token_ids.reshape(batch * windows, length).to(text_encoder.device)
    if hidden_layer is None:
        out = text_encoder(flat)
        hidden = out[0]  # (B * W, L, D)
    else:
        out = text_encoder(flat, output_hidden_states=True)
        hidden = out.hidden_states[hidden_layer]
    return hidden.reshape(batch, windows * length, hidden.shape[-1]), out, windows


def sd3_context(clip_states: list[torch.Tensor], width: int, t5: torch.Tensor | None = None) -> torch.Tensor:
    """SD3's joint-attention context (Esser et al. 2024, sec. 5.1), as diffusers builds it: the CLIP towers'
    states ``(B, L, D_i)`` side by side, zero-padded to ``width``, then T5's states ``(B, T5_TOKENS, width)``;
    without a T5, ONE zero token that the joint attention processors count ``T5_TOKENS`` times
    (``ldm.attention.JointControlledAttnProcessor``, exact). Returns ``(B, L + tail, width)``."""
    clip = torch.cat(clip_states, dim=-1)
    clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1]))
    tail = t5 if t5 is not None else clip.new_zeros(len(clip), 1, width)
    return torch.cat([clip, tail], dim=1)
