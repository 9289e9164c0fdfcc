"""Prompt-to-prompt editing (Hertz et al. 2022) as attention controllers.

The source and the edited prompt are generated as one batch from the same noise. While the edited image is being
formed, its cross-attention maps (which pixel attends to which word) are taken from the source image, so the
layout stays and only what the words say changes (sec. 3.2):

- ``replace``: word swap, same token count: the edited prompt uses the source's maps token for token;
- ``refine``: words added: maps of tokens shared with the source (aligned by global sequence alignment) come
  from the source, new tokens keep their own;
- ``reweight``: the maps of chosen words are scaled (``equalizer={"word": 2.0}``) to strengthen or weaken them.

Cross-attention is edited for the first ``cross_replace_steps`` fraction of the steps and self-attention maps are
injected from the source for the first ``self_replace_steps`` fraction. ``local_blend`` words restrict the change
to where those words attend (sec. 3.3): after each step the edited latents are reset to the source's outside that
region. Only the conditional half of a classifier-free-guidance batch is edited, as in the authors' code.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from ldm.text import multi_vector_tokens, prompt_token_ids

EDITS = ("replace", "refine", "reweight")
# Self-attention is injected only in layers of at most 16 x 16 queries, as in the authors' code (for SD's 64 x 64
# latents: the two lowest resolutions; for the 16 x 16 shapes model: every layer).
SELF_REPLACE_MAX_QUERIES = 16 * 16


def token_maps(probs: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """Cross-attention ``(B, heads, queries, keys)`` of one layer as per-token maps ``(B, keys, h, w)`` at latent
    resolution (heads averaged; the layer's grid keeps the latent's aspect ratio)."""
    height, width = latent_size
    factor = round((height * width / probs.shape[2]) ** 0.5)
    maps = probs.mean(1).transpose(1, 2).reshape(probs.shape[0], -1, height // factor, width // factor)
    return F.interpolate(maps.float(), size=(height, width), mode="bilinear", align_corners=False)


def _number_in(value, low: float, high: float) -> bool:
    """Whether ``value`` is a real number (not a bool, not NaN) in ``[low, high]``."""
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and low <= value <= high


def word_tokens(tokenizer, prompt: str) -> list[tuple[str, list[int]]]:
    """The prompt's words with the positions (after BOS, so 1-based) of their BPE tokens; CLIP marks a word's last
    token with ``</w>``, so a word split into several tokens keeps all of them."""
    ids = tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]
    added, expansions = tokenizer.added_tokens_decoder, multi_vector_tokens(tokenizer)  # {id: ...}
    words, current, positions, position = [], "", [], 1
    for token_id, token in zip(ids, tokenizer.convert_ids_to_tokens(ids)):
        width = len(expansions.get(token_id, (token_id,)))  # a multi-vector embedding's token fills several places
        current += token.removesuffix("</w>")
        positions.extend(range(position, position + width))
        position += width
        if token.endswith("</w>") or token_id in added:  # textual-inversion tokens are words of their own
            words.append((current, positions))
            current, positions = "", []
    if positions:
        words.append((current, positions))
    return words


def token_positions(tokenizer, prompt: str, word: str) -> list[int]:
    """Token positions of every occurrence of ``word`` in ``prompt``; ValueError if it is not there."""
    wanted = "".join(tokenizer.convert_ids_to_tokens(
        tokenizer(word.lower(), add_special_tokens=False, verbose=False)["input_ids"])).replace("</w>", "")
    found = [p for text, positions in word_tokens(tokenizer, prompt) if text == wanted for p in positions]
    if not found:
        raise ValueError(f"the word {word!r} is not in the prompt {prompt!r}")
    return found


def align_tokens(source: list[int], target: list[int]) -> list[int]:
    """Global alignment (Needleman-Wunsch: match 1, mismatch -1, gap -1) of two token sequences. Returns, for each
    target token, the index of the source token it is aligned with, or -1 for tokens the edit adds."""
    n, m = len(source), len(target)
    score = torch.zeros(n + 1, m + 1)
    score[:, 0] = -torch.arange(n + 1)
    score[0, :] = -torch.arange(m + 1)
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            match = score[i - 1, j - 1] + (1 if source[i - 1] == target[j - 1] else -1)
            score[i, j] = max(match, score[i - 1, j] - 1, score[i, j - 1] - 1)
    mapping, i, j = [-1] * m, n, m
    while i > 0 and j > 0:
        if score[i, j] == score[i - 1, j - 1] + (1 if source[i - 1] == target[j - 1] else -1):
            mapping[j - 1] = i - 1 if source[i - 1] == target[j - 1] else -1
            i, j = i - 1, j - 1
        elif score[i, j] == score[i - 1, j] - 1:
            i -= 1
        else:
            j -= 1
    return mapping


class PromptToPrompt:
    """An attention controller for a batch ``[source, edited]`` (see the module docstring).

    ``num_steps``: sampler steps; ``guided``: whether the batch carries the unconditional half first (CFG).
    Call :meth:`step_callback` from the sampler's callback for local blending.
    """

    def __init__(self, tokenizer, source: str, target: str, num_steps: int, edit: str = "replace",
                 cross_replace_steps: float = 0.8, self_replace_steps: float = 0.4,
                 equalizer: dict[str, float] | None = None, local_blend: list[str] | None = None,
                 guided: bool = True, latent_size: tuple[int, int] = (16, 16), length: int = 77):
        if edit not in EDITS:
            raise ValueError(f"unknown edit {edit!r}; known: {', '.join(EDITS)}")
        for name, fraction in (("cross_replace_steps", cross_replace_steps), ("self_replace_steps", self_replace_steps)):
            if not _number_in(fraction, 0.0, 1.0):
                raise ValueError(f"{name} must be a fraction in [0, 1], got {fraction!r}")
        src_ids, tgt_ids = prompt_token_ids(tokenizer, source), prompt_token_ids(tokenizer, target)
        if max(len(src_ids), len(tgt_ids)) > length - 2:
            raise ValueError(f"prompt-to-prompt needs prompts of at most {length - 2} tokens")
        if edit != "refine" and len(src_ids) != len(tgt_ids):
            raise ValueError(f"a {edit!r} edit needs prompts with the same number of tokens ({len(src_ids)} vs "
                             f"{len(tgt_ids)}); use edit='refine' for prompts that add or remove words")
        self.edit, self.guided, self.length, self.latent_size = edit, guided, length, tuple(latent_size)
        self.cross_steps = int(cross_replace_steps * num_steps)
        self.self_steps = int(self_replace_steps * num_steps)
        self.mapping = self._mapping(src_ids, tgt_ids, edit)  # (L,) source index per target token, -1 = new
        self.scale = torch.ones(length)  # (L,) reweighting of the edited prompt's tokens
        if equalizer and edit != "reweight":
            raise ValueError(f"equalizer weights are used by edit='reweight' only, not edit={edit!r}")
        if edit == "reweight" and not equalizer:
            raise ValueError("edit='reweight' needs equalizer={word: weight} (without it, it is edit='replace')")
        for word, weight in (equalizer or {}).items():
            if not _number_in(weight, 0.0, 10.0):
                raise ValueError(f"equalizer weight of {word!r} must be a number in [0, 10], got {weight!r}")
            self.scale[token_positions(tokenizer, target, word)] = float(weight)
        self.blend_positions = None
        if isinstance(local_blend, str):
            local_blend = [local_blend]
        if local_blend:
            self.blend_positions = (
                sorted({p for w in local_blend for p in self._positions_if_any(tokenizer, source, w)}),
                sorted({p for w in local_blend for p in self._positions_if_any(tokenizer, target, w)}))
            missing = [w for w in local_blend if not self._positions_if_any(tokenizer, source, w)
                       and not self._positions_if_any(tokenizer, target, w)]
            if missing:
                raise ValueError(f"local_blend word {missing[0]!r} is in neither prompt")
        self.maps_sum, self.maps_count = None, 0

    @staticmethod
    def _positions_if_any(tokenizer, prompt, word) -> list[int]:
        try:
            return token_positions(tokenizer, prompt, word)
        except ValueError:
            return []

    def _mapping(self, src_ids, tgt_ids, edit) -> torch.Tensor:
        """Source position for every position of the edited prompt (BOS/EOS/padding map to themselves)."""
        mapping = torch.arange(self.length)
        if edit == "refine":
            aligned = align_tokens(src_ids, tgt_ids)
            for j, i in enumerate(aligned):
                mapping[j + 1] = i + 1 if i >= 0 else -1
            # tokens after the edited prompt's end (EOS, padding) follow the source's end
            shift = len(src_ids) - len(tgt_ids)
            for j in range(len(tgt_ids) + 1, self.length):
                mapping[j] = min(max(j + shift, 0), self.length - 1)
        return mapping

    def conditional(self, probs: torch.Tensor) -> slice:
        """The rows of the batch that hold the conditional [source, edited] pair."""
        return slice(probs.shape[0] // 2, None) if self.guided else slice(0, None)

    def __call__(self, probs: torch.Tensor, *, is_cross: bool, place: str, step: int) -> torch.Tensor:
        rows = self.conditional(probs)
        pair = probs[rows]  # (2, heads, queries, keys)
        if is_cross:
            if self.blend_positions is not None:
                self._store(pair[..., :self.length])
            if step >= self.cross_steps:
                return probs
            # keys past the prompt's window (a negative prompt longer than 75 tokens pads every row to more
            # windows) hold padding; the edited row keeps its own attention there
            edited = pair[1].clone()
            edited[..., :self.length] = self._edit_cross(pair[0][..., :self.length], pair[1][..., :self.length])
        elif step < self.self_steps and probs.shape[2] <= SELF_REPLACE_MAX_QUERIES:
            edited = pair[0]
        else:
            return probs
        probs = probs.clone()
        probs[rows.start + 1] = edited
        return probs

    def _edit_cross(self, source: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
        """Cross-attention of the edited prompt ``(heads, queries, keys)`` from the source's: the source's maps
        token for token (replace, reweight), or for the aligned tokens only (refine); reweight then scales them."""
        taken = source[..., self.mapping.clamp(min=0)]
        if self.edit == "refine":
            return torch.where((self.mapping >= 0).to(taken.device), taken, edited)
        if self.edit == "reweight":
            return taken * self.scale.to(taken.device, taken.dtype)
        return taken

    def _store(self, pair: torch.Tensor) -> None:
        """Accumulate the pair's cross-attention maps, averaged over heads, at latent resolution."""
        maps = token_maps(pair, self.latent_size)
        self.maps_sum = maps if self.maps_sum is None else self.maps_sum + maps
        self.maps_count += 1

    def blend_mask(self, threshold: float = 0.3) -> torch.Tensor:
        """Where the local-blend words attend, in the source or the edited image: ``(1, 1, h, w)`` in {0, 1}."""
        maps = self.maps_sum / self.maps_count  # (2, keys, h, w)
        word_maps = torch.stack([maps[k, positions].sum(0) if positions else torch.zeros_like(maps[0, 0])
                                 for k, positions in enumerate(self.blend_positions)])[:, None]  # (2, 1, h, w)
        word_maps = F.max_pool2d(word_maps, 3, stride=1, padding=1)
        word_maps = word_maps / word_maps.flatten(1).amax(1).clamp(min=1e-8).view(-1, 1, 1, 1)
        return (word_maps > threshold).any(0, keepdim=True).float()

    def step_callback(self, step: int, sigma, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Local blend: outside the mask the edited latents follow the source's (``x``: ``(2, C, h, w)``)."""
        if self.blend_positions is None or self.maps_count == 0:
            return x
        mask = self.blend_mask().to(x.device)
        x = x.clone()
        x[1] = x[0] + mask[0] * (x[1] - x[0])
        return x


class AttentionStore:
    """An observing controller: the average cross-attention map of every token over layers, heads and steps, at
    latent resolution (for per-word heatmaps)."""

    def __init__(self, guided: bool = True, latent_size: tuple[int, int] = (16, 16), length: int = 77):
        self.guided, self.latent_size, self.length = guided, tuple(latent_size), length
        self.maps_sum, self.maps_count = None, 0

    def __call__(self, probs: torch.Tensor, *, is_cross: bool, place: str, step: int) -> torch.Tensor:
        if is_cross:
            cond = probs[probs.shape[0] // 2:] if self.guided else probs
            maps = token_maps(cond[..., :self.length], self.latent_size)
            self.maps_sum = maps if self.maps_sum is None else self.maps_sum + maps
            self.maps_count += 1
        return probs

    def average(self) -> torch.Tensor:
        """``(B, keys, h, w)`` mean cross-attention per token."""
        return self.maps_sum / self.maps_count
