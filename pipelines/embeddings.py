"""Textual-inversion embeddings on a loaded pipeline: ``pipe.load_textual_inversion(path, token=None)``, several at
once, and unloading.

Textual inversion (Gal et al. 2022, "An Image is Worth One Word", eq. 2) learns the input embedding v* of a new
word with the text encoder and the denoiser frozen, so using one only takes the word in the tokenizer and its
vector(s) in the text encoder's token-embedding table. Files are read in the layouts users have:

* diffusers: ``{token: (D,) or (n, D)}`` (``learned_embeds.safetensors``, what diffusers' training script writes);
* A1111 web UI: ``.safetensors`` with ``emb_params`` ``(n, D)``, or ``.pt`` with ``string_to_param["*"]`` (a pickle:
  refused unless ``allow_pickle``, then read with ``weights_only=True``);
* SDXL (A1111, ComfyUI, kohya): ``clip_l`` ``(n, 768)`` and ``clip_g`` ``(n, 1280)``, one set per CLIP tower. SD3's
  two CLIP towers read the same files; its T5 reads the word as text.

An n-vector embedding is added as the tokens ``t``, ``t_1`` ... ``t_{n-1}``, and the word ``t`` in a prompt stands
for all n (diffusers' names, so a file behaves as after ``StableDiffusionPipeline.load_textual_inversion``). The word
is ``token`` if given, else the token a diffusers file stores, else the file's name without its suffix (the web UI's
rule: ``EasyNegative.safetensors`` is used as "EasyNegative").
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

EMBEDDING_FILE = "learned_embeds.safetensors"
SDXL_KEYS = ("clip_l", "clip_g")  # the file keys of SDXL's (and SD3's) two CLIP towers, in tower order


class EmbeddingError(ValueError):
    """A textual-inversion file that cannot be loaded into this model; the message says why."""


def read_embedding_file(path: str | os.PathLike, allow_pickle: bool = False) -> dict:
    """The contents of an embedding ``.safetensors`` file (or of ``learned_embeds.safetensors`` in a folder), or of
    a pickle file when ``allow_pickle`` (read with ``weights_only=True``)."""
    from safetensors.torch import load_file

    from ldm.loading import PICKLE_SUFFIXES

    path = Path(path)
    if path.is_dir():
        path = path / EMBEDDING_FILE
    if not path.is_file():
        raise EmbeddingError(f"embedding file not found: {path}")
    try:
        if path.suffix in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise EmbeddingError(f"{path} is a pickle file, which can run code when loaded; convert it to "
                                     "safetensors or pass allow_pickle=True to read it with weights_only=True")
            return torch.load(path, map_location="cpu", weights_only=True)
        return load_file(str(path))
    except EmbeddingError:
        raise
    except Exception as err:  # safetensors / torch raise their own types for truncated or foreign files
        raise EmbeddingError(f"cannot read embedding file {path}: {str(err).splitlines()[0]}") from None


def embedding_vectors(contents, source: str) -> tuple[str | None, dict[str, torch.Tensor]]:
    """The token a file stores (diffusers layout; None otherwise) and its vectors per tower: ``{"": (n, D)}`` for a
    single set, ``{"clip_l": (n, 768), "clip_g": (n, 1280)}`` for SDXL files."""
    if not isinstance(contents, dict):
        raise EmbeddingError(f"{source}: expected a dict of tensors, found {type(contents).__name__}")
    stored = None
    if "string_to_param" in contents:  # A1111 .pt
        params = contents["string_to_param"]
        vectors = {"": params.get("*") if isinstance(params, dict) else None}
    elif "emb_params" in contents:  # A1111 .safetensors
        vectors = {"": contents["emb_params"]}
    elif any(key in contents for key in SDXL_KEYS):
        vectors = {key: contents[key] for key in SDXL_KEYS if key in contents}
    elif len(contents) == 1:  # diffusers: {token: vectors}
        stored, tensor = next(iter(contents.items()))
        vectors = {"": tensor}
    else:
        raise EmbeddingError(f"{source}: unrecognised embedding layout (keys: {', '.join(map(str, contents))[:200]}); "
                             "expected diffusers' {token: vectors}, A1111's emb_params / string_to_param, or "
                             "SDXL's clip_l / clip_g")
    return stored, checked_vectors(vectors, source)


def checked_vectors(vectors: dict, source: str) -> dict[str, torch.Tensor]:
    """``vectors`` (per tower: ``(D,)`` or ``(n, D)``) as detached float copies ``(n, D)``; EmbeddingError for
    anything else or for NaN / infinite values."""
    checked = {}
    for key, tensor in vectors.items():
        if not isinstance(tensor, torch.Tensor) or tensor.dim() not in (1, 2) or not tensor.is_floating_point() \
                or tensor.numel() == 0:
            raise EmbeddingError(f"{source}: {key or 'the embedding'} is not a float tensor of shape (D,) or (n, D)")
        if not torch.isfinite(tensor).all():
            raise EmbeddingError(f"{source}: {key or 'the embedding'} holds NaN or infinite values")
        checked[key] = tensor.detach().reshape(-1, tensor.shape[-1]).clone()  # A1111 .pt tensors require grad
    return checked


def token_names(token: str, count: int) -> list[str]:
    """The tokens an embedding of ``count`` vectors is added as (diffusers' names)."""
    return [token] + [f"{token}_{k}" for k in range(1, count)]


def resize_token_table(encoder: torch.nn.Module, rows: int) -> torch.Tensor:
    """Give ``encoder`` a frozen token-embedding table of ``rows`` rows that keeps the first rows of the old one
    (new rows zero: every caller fills them); returns the table's weight ``(rows, D)``. Unlike transformers'
    ``resize_token_embeddings`` this draws no random numbers."""
    old = encoder.get_input_embeddings().weight  # (V, D)
    if old.shape[0] == rows:
        return old
    weight = torch.zeros(rows, old.shape[1], dtype=old.dtype, device=old.device)
    keep = min(rows, old.shape[0])
    weight[:keep] = old[:keep]
    encoder.set_input_embeddings(torch.nn.Embedding(rows, old.shape[1], _weight=weight, _freeze=True))
    encoder.config.vocab_size = rows
    return encoder.get_input_embeddings().weight


def pool_at_first_eos(encoder: torch.nn.Module, eos_token_id: int) -> None:
    """CLIP configs written before transformers PR #24773 say ``eos_token_id = 2``, and transformers then pools at
    the largest token id, which is an added token's once there are any. Pool at the first end-of-text token
    instead (what the largest id was before any were added; the A1111 web UI and ComfyUI pool there too)."""
    for module in encoder.modules():
        if getattr(module, "eos_token_id", None) == 2:
            module.eos_token_id = eos_token_id
    if encoder.config.eos_token_id == 2:
        encoder.config.eos_token_id = eos_token_id


class TextualInversionMixin:
    """``load_textual_inversion`` / ``unload_textual_inversion`` for :class:`TextToImagePipeline`."""

    @property
    def embeddings(self) -> dict[str, int]:
        """Loaded textual-inversion words and their numbers of vectors, in load order."""
        return {word: next(iter(counts.values())) for word, counts in self.__dict__.get("_embeddings", {}).items()}

    def embedding_towers(self) -> list[tuple[str, object, torch.nn.Module]]:
        """(file key, tokenizer, text encoder) of each CLIP tower an embedding fills: ``""`` for the one tower of
        SD 1.x / 2.x; ``clip_l`` and ``clip_g`` for SDXL and SD3 (the SDXL refiner has ``clip_g`` only)."""
        if self.text_encoder_2 is None:
            return [("", self.tokenizer, self.text_encoder)]
        towers = [] if self.text_encoder is None else [("clip_l", self.tokenizer, self.text_encoder)]
        return towers + [("clip_g", self.tokenizer_2, self.text_encoder_2)]

    def load_textual_inversion(self, path: str | os.PathLike, token: str | None = None,
                               allow_pickle: bool = False) -> str:
        """Load a textual-inversion embedding as the word ``token`` (default: the file's own token, else its name);
        returns the word. Nothing changes if the file does not fit this model."""
        stored, vectors = embedding_vectors(read_embedding_file(path, allow_pickle), str(path))
        return self.add_textual_inversion(token if token is not None else stored or Path(path).stem, vectors,
                                          str(path))

    def add_textual_inversion(self, word: str, vectors: torch.Tensor | dict[str, torch.Tensor],
                              source: str = "the embedding") -> str:
        """Add ``word`` with its ``vectors``: ``(n, D)`` for a one-tower model, else ``{"clip_l": (n, 768),
        "clip_g": (n, 1280)}`` (:meth:`embedding_towers`); returns the word. Nothing changes if they do not fit."""
        if not isinstance(word, str) or not word.strip() or word != word.strip():
            raise EmbeddingError(f"an embedding's word must be a non-empty string without outer spaces, got {word!r}")
        towers = self.embedding_towers()
        vectors = checked_vectors({"": vectors} if isinstance(vectors, torch.Tensor) else vectors, source)
        by_tower = self._vectors_by_tower(vectors, towers, source)
        for _, tokenizer, _ in towers:
            self._check_word_is_free(tokenizer, word, next(iter(by_tower.values())).shape[0])
        if "_embeddings_original" not in self.__dict__:
            self._embeddings_original = self._original_text_state(towers)
        self._add_embedding(word, by_tower)
        self.__dict__.setdefault("_embeddings", {})[word] = {key: v.shape[0] for key, v in by_tower.items()}
        return word

    def _check_word_is_free(self, tokenizer, word: str, count: int) -> None:
        """EmbeddingError if one of the word's token names is taken, or would make an existing multi-vector name
        ambiguous (``w_1`` beside a loaded ``w``, or ``w`` beside a loaded ``w_1``); the tokenizer matches words
        whatever their case, so names are compared in lower case."""
        vocabulary = {token.lower() for token in tokenizer.get_vocab()}
        added = {token.lower() for token in tokenizer.added_tokens_encoder}
        names = [name.lower() for name in token_names(word, count)]
        stem, _, number = word.lower().rpartition("_")
        clash = next((n for n in names if n in vocabulary), None) or \
            next((a for a in added if a.startswith(word.lower() + "_") and a[len(word) + 1:].isdigit()), None) or \
            (stem if number.isdigit() and stem in added else None)
        if clash is not None:
            loaded = " (an embedding of that name is loaded)" if clash in {w.lower() for w in self.embeddings} else ""
            raise EmbeddingError(f"{clash!r} is already a token of this model's vocabulary{loaded}; give the "
                                 f"embedding another word")

    def _original_text_state(self, towers: list) -> tuple:
        """What unloading restores: the tokenizers, each token table's row count, and the rows beyond the
        tokenizer's vocabulary that new words will overwrite (tables padded past the vocabulary)."""
        tables = [encoder.get_input_embeddings().weight for _, _, encoder in towers]
        return (copy.deepcopy(self.tokenizer), copy.deepcopy(self.tokenizer_2), self.tokenizer is self.tokenizer_2,
                [(len(table), len(tokenizer), table[len(tokenizer):].detach().clone())
                 for table, (_, tokenizer, _) in zip(tables, towers)])

    def _vectors_by_tower(self, vectors: dict[str, torch.Tensor], towers: list, source: str) -> dict:
        """The file's vectors keyed as :meth:`embedding_towers` names the towers; EmbeddingError where the file
        was made for another family or another width."""
        keys = [key for key, _, _ in towers]
        if keys == [""] and "" not in vectors:
            raise EmbeddingError(f"{source} holds {' and '.join(vectors)} vectors (an SDXL / SD3 embedding); "
                                 "this model has one CLIP text encoder")
        if keys != [""] and "" in vectors:
            raise EmbeddingError(f"{source} holds one set of vectors (width {vectors[''].shape[1]}); this model's "
                                 f"CLIP towers need {' and '.join(keys)} vectors (an SDXL / SD3 embedding)")
        missing = [key for key in keys if key not in vectors]
        if missing:
            raise EmbeddingError(f"{source} has no {' or '.join(missing)} vectors, which this model needs")
        chosen = {key: vectors[key] for key in keys}
        for key, _, encoder in towers:
            width = encoder.get_input_embeddings().weight.shape[1]
            if chosen[key].shape[1] != width:
                raise EmbeddingError(f"{source} does not fit this model: its {key or 'embedding'} vectors have width "
                                     f"{chosen[key].shape[1]}, the text encoder's token embeddings {width}")
        if len({v.shape[0] for v in chosen.values()}) > 1:
            raise EmbeddingError(f"{source} has different numbers of vectors per tower: "
                                 + ", ".join(f"{k} {v.shape[0]}" for k, v in chosen.items()))
        return chosen

    def _add_embedding(self, word: str, by_tower: dict[str, torch.Tensor]) -> None:
        """Add the word's tokens to each tower's tokenizer and their vectors as new rows of its token embeddings.
        The word is matched as a whole word, as the web UI matches it ("ring" does not match inside "string";
        diffusers' ``add_tokens`` would)."""
        from transformers import AddedToken

        for key, tokenizer, encoder in self.embedding_towers():
            names = token_names(word, by_tower[key].shape[0])
            tokenizer.add_tokens([AddedToken(name, single_word=True) for name in names])  # whole words only
            ids = tokenizer.convert_tokens_to_ids(names)
            table = resize_token_table(encoder, max(max(ids) + 1, encoder.get_input_embeddings().weight.shape[0]))
            with torch.no_grad():
                table[ids] = by_tower[key].to(table)
            pool_at_first_eos(encoder, tokenizer.eos_token_id)

    def unload_textual_inversion(self, token: str | None = None) -> None:
        """Remove one embedding's word (or all): tokenizers and token tables are restored to what they were
        before the first load, then the remaining words are added again with their current vectors."""
        loaded = self.__dict__.get("_embeddings", {})
        if token is not None and token not in loaded:
            raise EmbeddingError(f"no embedding {token!r} is loaded; loaded: {', '.join(loaded) or 'none'}")
        if not loaded:
            return
        remaining = {word: self._current_vectors(word, counts) for word, counts in loaded.items()
                     if token is not None and word != token}
        tokenizer, tokenizer_2, shared, tables = self._embeddings_original
        self.tokenizer = copy.deepcopy(tokenizer)
        self.tokenizer_2 = self.tokenizer if shared else copy.deepcopy(tokenizer_2)
        for (_, _, encoder), (rows, vocabulary, beyond) in zip(self.embedding_towers(), tables):
            table = resize_token_table(encoder, rows)
            with torch.no_grad():
                table[vocabulary:] = beyond
        self._embeddings = {}
        for word, by_tower in remaining.items():
            self._add_embedding(word, by_tower)
            self._embeddings[word] = {key: v.shape[0] for key, v in by_tower.items()}

    def _current_vectors(self, word: str, counts: dict[str, int]) -> dict[str, torch.Tensor]:
        """A loaded word's vectors as its towers' token tables hold them now (training may have changed them)."""
        vectors = {}
        for key, tokenizer, encoder in self.embedding_towers():
            ids = tokenizer.convert_tokens_to_ids(token_names(word, counts[key]))
            vectors[key] = encoder.get_input_embeddings().weight[ids].detach().clone()
        return vectors
