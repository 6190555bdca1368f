"""Coconut: a causal LM whose latent positions receive the last hidden state of the position before them.

Same computation as the original ``coconut.py`` (Hao et al., 2024): the ``<|latent|>`` positions of a
batch are filled one pass at a time, pass ``i`` feeding thought ``i`` of every row that has one, with the
KV cache of earlier positions reused. What changes is how it is computed:

* latent embeddings are written with tensor ops (``torch.where`` on one column per pass), not by
  rebuilding ``inputs_embeds`` as a batch x length Python list, and with no ``.item()`` per latent;
* the KV cache is one :class:`~transformers.DynamicCache` extended pass by pass, never rebuilt;
* when only the loss is needed, the LM head runs only at labelled positions;
* generation is batched (rows of any length and latent count) with the KV cache through the latent
  passes and the decoding, instead of batch size 1 recomputing the whole prefix for every token; the
  decoding cache is preallocated for all the new tokens and written in place, not concatenated per token;
* besides the original's greedy decoding, tokens may be sampled (temperature, top-k, top-p) from a
  seeded generator; the continuous thoughts stay deterministic either way.

The wrapper owns no parameters of its own: its state_dict keys are ``base_causallm.*`` as in the
original, so checkpoints move between the two (the original additionally stored a duplicate
``embedding.weight``; the checkpoint loader drops it).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import Cache, DynamicLayer

from noblankslate.model.latent import LatentLayout, align_prompts, latent_layout

IGNORE_INDEX = -100


class Outputs(NamedTuple):
    """Same fields, in the same order, as the original's ``Outputs`` namedtuple."""

    loss: Tensor | None
    inputs_embeds: Tensor
    logits: Tensor | None


@dataclass
class GenerationOutput:
    """Result of :meth:`Coconut.generate`.

    Attributes:
        tokens: (B, T) generated token ids after the prompt, eos excluded, right-padded with eos.
        lengths: (B,) number of generated tokens per row.
        forward_passes: (B,) forward passes each row needed, as if run alone: its latent passes plus
            the prompt pass plus one pass per further generated token (eos included).
        latent_counts: (B,) continuous thoughts per row.
        thoughts: (B, max_count, D) the continuous thoughts fed to each row (rows with fewer thoughts
            hold token embeddings past their count), when requested.
        thoughts_used: (B,) thoughts each row fed (its latent count unless a controller stopped it).
    """

    tokens: Tensor
    lengths: Tensor
    forward_passes: Tensor
    latent_counts: Tensor
    thoughts: Tensor | None = None
    thoughts_used: Tensor | None = None

    def sequences(self) -> list[list[int]]:
        """The generated tokens of each row as Python lists (eos excluded)."""
        return [row[:n] for row, n in zip(self.tokens.tolist(), self.lengths.tolist())]


@dataclass(frozen=True)
class Sampling:
    """How :meth:`Coconut.generate` draws tokens when it does not decode greedily.

    Only the token decoding samples: the continuous thoughts are hidden states and stay deterministic.
    Draws come from ``generator`` (a seeded ``torch.Generator`` on the model's device), so a call
    repeated with the same inputs and a generator in the same state gives the same tokens. Several
    samples of one question are drawn by repeating its row in the batch.

    Attributes:
        temperature: logits are divided by it (> 0; toward 0 the draw becomes the argmax).
        top_k: keep only the ``top_k`` most likely tokens (0: all; tokens tied with the k-th are kept).
        top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p``
            (nucleus sampling; 1.0: all). The most likely token is always kept.
        generator: the random source; None draws from torch's global generator.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def draw(self, logits: Tensor) -> Tensor:
        """One token per row from (B, V) logits; returns (B,) ids."""
        scores = logits.float() / self.temperature  # (B, V)
        if self.top_k > 0 and self.top_k < scores.shape[-1]:
            kth = torch.topk(scores, self.top_k, dim=-1).values[:, -1:]  # (B, 1)
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:
            ordered, order = torch.sort(scores, dim=-1, descending=True)  # (B, V)
            probs = ordered.softmax(dim=-1)
            # drop a token when the tokens more likely than it already reach top_p (the first never is)
            drop = probs.cumsum(dim=-1) - probs >= self.top_p  # (B, V)
            scores = scores.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
        probs = scores.softmax(dim=-1)  # (B, V)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)  # (B,)


class ThoughtController(Protocol):
    """Sees every continuous thought of a generation before it is fed (the No Blank Slate memory).

    Called with ``step`` = thoughts fed so far (0: ``thought`` is the hidden state at
    ``<|start-latent|>``, the question's anchor), ``thought`` (B, D) and ``thinking`` (B,), the rows that
    will feed it. Returns the thought to feed instead (B, D) and for which rows it is the last one (B,)
    bool: their ``<|end-latent|>`` follows it, and the thoughts they would have had are skipped.
    """

    def __call__(self, step: int, thought: Tensor, thinking: Tensor) -> tuple[Tensor, Tensor]: ...


@dataclass
class PassResult:
    """What the latent passes computed.

    Attributes:
        hidden: (B, L, D) last hidden states of every position.
        fed: (B, n, D) inputs at the latent columns (thoughts where a row fed one).
        cache: the KV cache over all L positions (None when one pass ran without ``keep_cache``).
        used: (B,) thoughts each row fed (fewer than its latent count if a controller stopped it).
        forwards: transformer calls made.
    """

    hidden: Tensor
    fed: Tensor
    cache: DynamicCache | None
    used: Tensor
    forwards: int


def _cache_keyword(backbone: nn.Module) -> str:
    # transformers 5.24 renamed the cache argument of the base models from past_key_values to cache.
    parameters = inspect.signature(backbone.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


class Coconut(nn.Module):
    """A Hugging Face causal LM that reasons with continuous thoughts at ``<|latent|>`` positions.

    Args:
        base_causallm: any ``*ForCausalLM`` model (tested with GPT-2 and Llama).
        latent_token_id, start_latent_id, end_latent_id: ids of the three Coconut tokens.
        eos_token_id: ends generation; also used as padding, as the original sets pad = eos.
        feed_thoughts: False treats ``<|latent|>`` as an ordinary (learned) token: the paper's "pause as
            thought" and pause-token baselines, one pass, no hidden-state feedback.
    """

    def __init__(
        self,
        base_causallm: PreTrainedModel,
        latent_token_id: int,
        start_latent_id: int,
        end_latent_id: int,
        eos_token_id: int,
        feed_thoughts: bool = True,
    ):
        super().__init__()
        self.feed_thoughts = feed_thoughts
        self.base_causallm = base_causallm
        self.latent_token_id = latent_token_id
        self.start_latent_id = start_latent_id
        self.end_latent_id = end_latent_id
        self.eos_token_id = eos_token_id
        config = base_causallm.config
        for attribute in ("final_logit_softcapping", "logit_scale"):
            if getattr(config, attribute, None) not in (None, 1.0):
                raise NotImplementedError(
                    f"{type(base_causallm).__name__} transforms its logits ({attribute}); Coconut applies the "
                    "output embeddings directly to the last hidden state"
                )
        self._cache_keyword = _cache_keyword(base_causallm.base_model)

    def _layout(self, input_ids: Tensor) -> LatentLayout:
        if not self.feed_thoughts:
            return LatentLayout(counts=input_ids.new_zeros(input_ids.shape[0]), start=0, max_count=0)
        return latent_layout(input_ids, self.latent_token_id)

    @property
    def embedding(self) -> nn.Module:
        """The input embeddings (a property, so it adds no duplicate state_dict entry)."""
        return self.base_causallm.get_input_embeddings()

    @property
    def lm_head(self) -> nn.Module:
        return self.base_causallm.get_output_embeddings()

    def _backbone(
        self, embeds: Tensor, attention_mask: Tensor, position_ids: Tensor, cache: DynamicCache | None,
        compiled: bool = False,
    ) -> Tensor:
        """One forward of the transformer body; returns the last (final-norm) hidden states (B, T, D).

        ``compiled`` runs it through ``torch.compile`` of the body (see :meth:`generate`)."""
        kwargs = {self._cache_keyword: cache} if cache is not None else {}
        body = self._compiled_body() if compiled else self.base_causallm.base_model
        out = body(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=cache is not None,
            **kwargs,
        )
        return out.last_hidden_state

    def _compiled_body(self) -> nn.Module:
        """The body under ``torch.compile`` with dynamic shapes (one graph serves every cache length), built
        on first use and kept outside the module tree so that it adds nothing to the state_dict."""
        body = self.base_causallm.base_model
        held = self.__dict__.get("_compiled")
        if held is None or held[0] is not body:
            held = (body, torch.compile(body, dynamic=True))
            self.__dict__["_compiled"] = held
        return held[1]

    def _latent_passes(
        self,
        embeds: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor,
        layout: LatentLayout,
        keep_cache: bool = False,
        passes: int | None = None,
        controller: ThoughtController | None = None,
    ) -> PassResult:
        """The multi-pass computation over an aligned batch.

        Pass 0 runs the prefix before the first latent column ``s``; pass ``i`` (1 <= i < n) runs the
        single column ``s + i - 1`` whose input is thought ``i - 1``; the last pass runs the rest. After
        each pass the last hidden state becomes the input at the next latent column for the rows that
        still have thoughts; other rows keep their token embedding there.

        A ``controller`` sees each thought before it is fed: it may replace it (the
        memory's nudge) and mark it as a row's last. A row that stops after ``j`` thoughts gets its
        remaining latent slots masked and the positions after them shifted down, so it computes exactly
        what it would alone with ``j`` thoughts, in the same ``j + 1`` passes; ``attention_mask`` and
        ``position_ids`` are then changed in place (pass clones). Once no row has another thought to
        feed, the rest runs as one pass.

        Args:
            embeds: (B, L, D) token embeddings.
            attention_mask, position_ids: (B, L).
            passes: run this many thought passes (>= the batch's largest latent count); the extra ones
                process further columns one at a time, which computes the same thing. Used to keep FSDP
                ranks in step when their batches hold different latent counts.
            controller: see :class:`ThoughtController`.
        """
        count = layout.max_count if passes is None else passes
        if count < layout.max_count:
            raise ValueError(f"passes={count} is fewer than the batch's {layout.max_count} thoughts")
        length = embeds.shape[1]
        start = layout.start if layout.max_count > 0 else length - count
        if count > 0 and (start < 1 or start + count > length):
            raise ValueError(f"a batch of {length} columns cannot run {count} thought passes")
        if count == 0:
            cache = DynamicCache(config=self.base_causallm.config) if keep_cache else None
            hidden = self._backbone(embeds, attention_mask, position_ids, cache)
            return PassResult(hidden, embeds[:, :0], cache, layout.counts, 1)

        cache = DynamicCache(config=self.base_causallm.config)
        chunks = [self._backbone(embeds[:, :start], attention_mask[:, :start], position_ids[:, :start], cache)]
        fed = []
        thinking = layout.counts > 0  # (B,) rows whose next latent slot receives a thought
        used = torch.zeros_like(layout.counts)  # (B,) thoughts fed so far
        for i in range(count):
            column = start + i
            thought = chunks[-1][:, -1]  # (B, D) hidden state of the position before `column`
            thinking = thinking & (layout.counts > i)
            last = torch.zeros_like(thinking)
            if controller is not None and bool(thinking.any()):
                thought, last = controller(i, thought, thinking)
                last = last & thinking & (layout.counts > i + 1)  # a row's final thought needs no stop
                if bool(last.any()):
                    self._skip_remaining_slots(last, i + 1, start, layout.counts, attention_mask, position_ids)
            fed.append(torch.where(thinking[:, None], thought, embeds[:, column]))  # (B, D)
            used += thinking.long()
            thinking = thinking & ~last
            more = i + 1 < count and (controller is None or bool((thinking & (layout.counts > i + 1)).any()))
            if more:
                step_input = fed[-1][:, None]  # (B, 1, D)
                end = column + 1
            else:
                step_input = torch.cat([fed[-1][:, None], embeds[:, column + 1 :]], dim=1)  # (B, L - column, D)
                end = length
            chunks.append(self._backbone(step_input, attention_mask[:, :end], position_ids[:, column:end], cache))
            if not more:
                break
        return PassResult(torch.cat(chunks, dim=1), torch.stack(fed, dim=1)[:, : layout.max_count], cache, used, len(chunks))

    def _compacted_passes(
        self, embeds: Tensor, attention_mask: Tensor, position_ids: Tensor, layout: LatentLayout,
        controller: ThoughtController | None = None, decode_room: int | None = None,
    ) -> PassResult:
        """Generation's latent passes, each run only on the rows that still have a thought to feed.

        The same computation as :meth:`_latent_passes` row by row, but a row leaves the serial passes as
        soon as it has fed its last thought (its latent count is reached, or the controller stopped it): it
        feeds that thought in the pass's one-token call with the others, and the later thought passes run
        on the remaining rows only, with their KV cache rows compacted. What a row still has of its prompt
        after its last thought runs at the end, in one call with the rows of the last pass wherever the
        columns line up (every row whose prompt has nothing real between its last thought and the last
        pass's column: the usual case, equal latent counts). A stopped row's skipped slots are masked, so
        they are never computed: its cache holds zeros there, which the mask hides. So an early exit adds
        no transformer call in the usual case and saves the compute of every pass it skips. The per-group
        caches are merged into one cache of every row for the batched decoding; with ``decode_room`` the
        merge writes them straight into buffers with that many free positions per row (see
        :func:`_preallocate`), so the cache is copied once, not merged and then copied again.

        Every row still computes exactly what it computes alone; the transformer calls are not the same
        as :meth:`_latent_passes`'s (narrower passes, and a row whose prompt goes on between its last
        thought and the last pass's column has a call of its own for the rest), so FSDP lockstep
        generation uses that method instead.
        """
        batch, length, width = embeds.shape
        start = layout.start
        if layout.max_count == 0:
            cache = DynamicCache(config=self.base_causallm.config)
            hidden = self._backbone(embeds, attention_mask, position_ids, cache)
            if decode_room is not None:
                cache = _preallocate(cache, decode_room)
            return PassResult(hidden, embeds[:, :0], cache, layout.counts, 1)
        device, config = embeds.device, self.base_causallm.config
        counts = layout.counts
        hidden = embeds.new_zeros(batch, length, width)  # (B, L, D)
        fed = embeds[:, start : start + layout.max_count].clone()  # (B, n, D): thoughts where fed
        used = torch.zeros_like(counts)
        left: list[tuple[Tensor, DynamicCache, int]] = []  # (rows, cache through column c, c): rows that left
        rows = torch.arange(batch, device=device)  # rows still in the serial passes
        cache = DynamicCache(config=config)
        out = self._backbone(embeds[:, :start], attention_mask[:, :start], position_ids[:, :start], cache)
        hidden[:, :start] = out
        forwards = 1
        for i in range(layout.max_count):
            column = start + i
            feeding = counts[rows] > i  # (b,) rows of `rows` that feed thought i
            column_input = embeds[rows, column]  # (b, D)
            continuing = feeding & (counts[rows] > i + 1)
            if bool(feeding.any()):
                thought = out[:, -1]  # (b, D) hidden state before `column`
                if controller is not None:
                    full_thought = embeds.new_zeros(batch, width)
                    full_thinking = torch.zeros(batch, dtype=torch.bool, device=device)
                    full_thought[rows] = thought
                    full_thinking[rows] = feeding
                    new_thought, last = controller(i, full_thought, full_thinking)
                    thought, last = new_thought[rows], last[rows] & feeding
                    stop = last & continuing  # stopped before their latent count
                    if bool(stop.any()):
                        stopped = torch.zeros(batch, dtype=torch.bool, device=device)
                        stopped[rows[stop]] = True
                        self._skip_remaining_slots(stopped, i + 1, start, counts, attention_mask, position_ids)
                    continuing = continuing & ~last
                column_input = torch.where(feeding[:, None], thought, column_input)
                fed[rows[feeding], i] = column_input[feeding]
                used[rows[feeding]] += 1
            if not bool(continuing.any()):
                after = attention_mask[rows, column + 1 :].bool()  # (b, L - column - 1)
                if column + 1 == length or not bool((after.any(dim=1) & ~after[:, 0]).any()):
                    break  # the last pass: its column runs with the rest of the prompt, below
            out = self._backbone(column_input[:, None], attention_mask[rows, : column + 1],
                                 position_ids[rows, column : column + 1], cache)
            hidden[rows, column] = out[:, 0]
            forwards += 1
            leaving = ~continuing
            if not bool(continuing.any()):  # a last pass with masked slots after it: every row's rest comes below
                left.append((rows, cache, column))
                rows = rows[:0]
                break
            if bool(leaving.any()):
                left.append((rows[leaving], _select_rows(cache, leaving, config), column))
                cache = _select_rows(cache, continuing, config)
                rows, out = rows[continuing], out[continuing]
        last_column = column if len(rows) else length  # length: no last call, nobody joins one
        groups: list[tuple[Tensor, DynamicCache]] = []  # every row's cache through the prompt, merged at the end
        # Rows that left earlier: nothing real after their last thought (done); nothing real before the last
        # column but more after it (they join the last call, fed their own masked column there); or prompt
        # left before it (a call from their first real column on, one per such column). A last pass whose
        # rows have masked slots after their thought (every row stopped early) is not merged with the rest,
        # which would compute those slots: it ran alone above, and its rows are among these.
        joining, own_tail = [], {}
        for group, group_cache, at in left:
            real = attention_mask[group, at + 1 :].bool()  # (g, L - at - 1)
            first = torch.where(real.any(dim=1), at + 1 + real.int().argmax(dim=1), length)  # (g,)
            done, joins = first == length, (first > last_column) & (first < length)
            if bool(done.any()):
                groups.append((group[done], _select_rows(group_cache, done, config)))
            if bool(joins.any()):
                joining.append((group[joins], _select_rows(group_cache, joins, config)))
            for f in torch.unique(first[~done & ~joins]).tolist():
                own_tail.setdefault(f, []).append((group[first == f], _select_rows(group_cache, first == f, config)))
        tails = [(f, g, None) for f, g in sorted(own_tail.items())]
        if len(rows):
            tails.insert(0, (last_column, [(rows, cache)] + joining, column_input))
        for begin, members, first_input in tails:
            # in batch order: a call of every row then leaves a cache that needs no reordering at the merge
            tail_rows = torch.cat([r for r, _ in members]).sort().values
            local = torch.empty(batch, dtype=torch.long, device=device)
            local[tail_rows] = torch.arange(len(tail_rows), device=device)
            tail_cache = _merge_rows([(local[r], c) for r, c in members], len(tail_rows), config, length=begin)
            # up to the members' last real column: what follows it is masked (padding, skipped slots) for all
            real = attention_mask[tail_rows, begin:].bool()  # (t, L - begin)
            end = begin + max(int((real * torch.arange(1, real.shape[1] + 1, device=device)).max()), 1)
            tail_input = embeds[tail_rows, begin:end].clone()
            if first_input is not None:  # the last pass's rows feed their thought (or token) at its column
                tail_input[local[rows], 0] = first_input
            hidden[tail_rows, begin:end] = self._backbone(tail_input, attention_mask[tail_rows, :end],
                                                          position_ids[tail_rows, begin:end], tail_cache)
            forwards += 1
            groups.append((tail_rows, tail_cache))
        merged = _merge_rows(groups, batch, config, decode_room, length=length)
        return PassResult(hidden, fed, merged, used, forwards)

    @staticmethod
    def _skip_remaining_slots(
        stop: Tensor, step: int, start: int, counts: Tensor, attention_mask: Tensor, position_ids: Tensor
    ) -> None:
        """Mask the latent slots a stopped row will not use and close the gap in its positions."""
        columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)[None, :]  # (1, L)
        slots_end = (start + counts)[:, None]  # (B, 1)
        skipped = stop[:, None] & (columns >= start + step) & (columns < slots_end)  # (B, L)
        attention_mask.masked_fill_(skipped, 0)
        # only real columns move: a row with fewer thoughts than the batch's longest has pads after its
        # end (position 0), which must not go negative (learned position tables index with them)
        after = stop[:, None] & (columns >= slots_end) & attention_mask.bool()
        position_ids.sub_(torch.where(after, (counts - step)[:, None], 0))

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor | None = None,
        position_ids: Tensor | None = None,
        return_logits: bool = True,
        reduction: str = "mean",
        latent_passes: int | None = None,
        controller: ThoughtController | None = None,
        **kwargs,
    ) -> Outputs:
        """Multi-pass forward over a batch laid out by the collator.

        Args:
            input_ids, attention_mask, labels, position_ids: (B, L); labels use -100 for ignored
                positions; position_ids default to 0..L-1.
            return_logits: False computes the LM head only at labelled positions (training), and
                returns ``logits=None``.
            reduction: "mean" (the original's loss) or "sum" over labelled positions, for losses
                weighted by token across micro-batches and ranks.
            latent_passes: run exactly this many thought passes (see ``_latent_passes``); under FSDP
                the training loop passes the largest latent count over all ranks.
            controller: the same hook as in :meth:`generate`: it sees every thought before it is fed and
                may replace it (gradients flow through what it returns). A stop it returns masks the row's
                remaining latent slots, as in generation, and changes ``attention_mask`` and
                ``position_ids`` in place; the row's prediction of the token after its slots is then read
                at its last used slot, as alone (without latent markers, the first answer token's).

        Returns:
            Outputs(loss, inputs_embeds, logits): next-token cross-entropy over labelled positions
            (None without labels), the inputs with thoughts filled in (B, L, D), logits (B, L, V).
        """
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
            if controller is not None:  # a stop shifts a row's positions in place: a view of one row cannot
                position_ids = position_ids.clone()
        layout = self._layout(input_ids)
        embeds = self.embedding(input_ids)  # (B, L, D)
        passed = self._latent_passes(embeds, attention_mask, position_ids, layout, passes=latent_passes,
                                     controller=controller)
        hidden, fed = passed.hidden, passed.fed
        if controller is not None:  # without one every row uses all its slots
            hidden = _answer_from_last_used_slot(hidden, layout, passed.used)
        if layout.max_count > 0:
            start, end = layout.start, layout.start + layout.max_count
            embeds = torch.cat([embeds[:, :start], fed, embeds[:, end:]], dim=1)

        logits = self.lm_head(hidden) if return_logits else None  # (B, L, V)
        loss = None
        if labels is not None:
            if logits is not None:
                # shift the labels, not the (B, L, V) logits, which would copy them
                shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # (B, L)
                loss = F.cross_entropy(
                    logits.flatten(0, 1).float(), shifted.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction,
                )
            else:
                targets = labels[:, 1:]  # (B, L-1)
                keep = targets != IGNORE_INDEX
                selected = self.lm_head(hidden[:, :-1][keep])  # (N, V)
                loss = F.cross_entropy(selected.float(), targets[keep], reduction=reduction)
        return Outputs(loss=loss, inputs_embeds=embeds, logits=logits)

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        max_new_tokens: int = 16,
        sync_forward_passes: int | None = None,
        return_thoughts: bool = False,
        controller: ThoughtController | None = None,
        sampling: Sampling | None = None,
        preallocate: bool = True,
        compile: bool = False,
        stop_check_every: int | None = None,
        **kwargs,
    ) -> GenerationOutput:
        """Batched generation with continuous thoughts and a KV cache throughout; greedy unless ``sampling``.

        Prompts may differ in length and in latent count and may be left or right padded; they are
        re-aligned so every row computes exactly what it would alone (real tokens keep positions
        0..len-1, pads are masked). Each row stops at eos; the loop ends when all rows have.

        Under FSDP every rank must run the same number of forwards, or the per-layer all-gathers
        deadlock. Pass ``sync_forward_passes`` (for example the largest latent count plus
        ``max_new_tokens``): the call then runs exactly that many transformer forwards on every rank,
        the real ones followed by one-token dummy ones, so ranks stay in step by construction.

        Args:
            input_ids, attention_mask: (B, L) prompts ending after ``<|end-latent|>`` (or any prompt).
            max_new_tokens: at most this many tokens are generated per row (eos not counted).
            sync_forward_passes: exact number of transformer forwards to run (see above).
            return_thoughts: also return the fed thoughts.
            controller: sees each thought before it is fed; may replace it and stop rows early
                (see :class:`ThoughtController`). A row that stops early gives what it would alone.
            sampling: draw each token (see :class:`Sampling`) instead of taking the argmax. The
                thoughts and the greedy path are unchanged by it.
            preallocate: decode into a KV cache sized once for the prompt plus ``max_new_tokens`` and written
                in place (the default), instead of one that grows by concatenation at every token (False: the
                previous behaviour, kept for the benchmark). The tokens are the same either way.
            compile: run the one-token decoding steps through ``torch.compile`` of the transformer body (off
                by default). The first call compiles for a minute or more, so it pays only over many calls
                (an evaluation), and fused kernels may round differently from eager ones, so tokens are not
                guaranteed bitwise equal to the eager path's.
            stop_check_every: ask whether every row has finished only every this many tokens (None: every
                token on a CPU, every 8 on an accelerator, where each ask makes the host wait for the
                device instead of queueing the next step). A finished batch then runs at most this many
                minus one further steps, which change no output: finished rows keep their tokens, lengths
                and pass counts.
        """
        if kwargs.get("do_sample") and sampling is None:
            raise ValueError("pass sampling=Sampling(...) to sample; do_sample alone says nothing of how")
        pick = _greedy if sampling is None else sampling.draw
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        every = stop_check_every if stop_check_every is not None else (1 if input_ids.device.type == "cpu" else 8)
        if every < 1:
            raise ValueError(f"stop_check_every must be >= 1, got {stop_check_every}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pad_id = self.eos_token_id
        prompts = align_prompts(input_ids, attention_mask, self.latent_token_id, pad_id)
        layout = self._layout(prompts.input_ids)
        batch, width = prompts.input_ids.shape
        device = input_ids.device

        embeds = self.embedding(prompts.input_ids)  # (B, W, D)
        prompt_mask, positions = prompts.attention_mask.clone(), prompts.position_ids.clone()
        if sync_forward_passes is None:
            passed = self._compacted_passes(embeds, prompt_mask, positions, layout, controller=controller,
                                            decode_room=max_new_tokens - 1 if preallocate else None)
        else:  # FSDP: the same transformer calls on every rank
            passed = self._latent_passes(embeds, prompt_mask, positions, layout, keep_cache=True, controller=controller)
        cache, forwards_run = passed.cache, passed.forwards
        if preallocate and sync_forward_passes is not None:  # the compacted passes preallocate as they merge
            cache = _preallocate(cache, max_new_tokens - 1)
        skipped = layout.counts - passed.used  # (B,) latent slots a stopped row did not use
        lengths_after_thoughts = prompts.lengths - skipped  # (B,) the row's prompt length as if alone
        forward_passes = passed.used + 1  # as alone: the prefix, then one pass per thought (the last with the rest)
        hidden = passed.hidden if controller is None else _answer_from_last_used_slot(passed.hidden, layout, passed.used,
                                                                                      in_place=True)
        last_hidden = hidden[torch.arange(batch, device=device), prompts.last_column]  # (B, D)
        next_tokens = pick(self.lm_head(last_hidden))  # (B,)

        tokens = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        lengths = torch.zeros(batch, dtype=torch.long, device=device)
        mask = torch.cat([prompt_mask, prompt_mask.new_ones(batch, max_new_tokens)], dim=1)
        for step in range(max_new_tokens):
            finished |= next_tokens == self.eos_token_id
            tokens[:, step] = torch.where(finished, pad_id, next_tokens)
            lengths += (~finished).long()
            if step + 1 == max_new_tokens or (step % every == every - 1 and bool(finished.all())):
                break
            forward_passes += (~finished).long()
            step_embeds = self.embedding(next_tokens)[:, None]  # (B, 1, D)
            step_positions = (lengths_after_thoughts + step)[:, None]  # (B, 1)
            step_hidden = self._backbone(step_embeds, mask[:, : width + step + 1], step_positions, cache, compile)
            forwards_run += 1
            next_tokens = pick(self.lm_head(step_hidden[:, -1]))

        if sync_forward_passes is not None:
            self._pad_forwards(sync_forward_passes - forwards_run, device)
        return GenerationOutput(
            tokens=tokens[:, : int(lengths.max()) if batch else 0],
            lengths=lengths,
            forward_passes=forward_passes,
            latent_counts=layout.counts,
            thoughts=passed.fed if return_thoughts else None,
            thoughts_used=passed.used,
        )

    def _pad_forwards(self, missing: int, device: torch.device) -> None:
        """Run ``missing`` one-token forwards whose results are discarded (keeps FSDP ranks in step)."""
        if missing < 0:
            raise ValueError(
                f"sync_forward_passes is {-missing} short of what this batch needed; raise it to at least "
                "the largest latent count + max_new_tokens"
            )
        if missing == 0:
            return
        token = torch.full((1, 1), self.eos_token_id, dtype=torch.long, device=device)
        embeds = self.embedding(token)
        mask, positions = torch.ones_like(token), torch.zeros_like(token)
        for _ in range(missing):
            self._backbone(embeds, mask, positions, cache=None)


def _answer_from_last_used_slot(hidden: Tensor, layout: LatentLayout, used: Tensor, in_place: bool = False) -> Tensor:
    """``hidden`` (B, L, D) with each row's last latent slot holding the output of its last *used* one.

    A row stopped early has its remaining slots skipped (masked; their outputs are noise or, in the
    compacted passes, never computed), but its last slot is the column whose output predicts the token
    after the slots: without latent markers (the prompt ends with its slots), the first answer token. Alone
    with ``used`` thoughts that prediction comes from the last used slot, so it does here, in generation and
    in the forward's loss. Rows that used every slot (and rows without slots) are written their own value;
    nothing waits on the host.
    """
    if layout.max_count == 0:
        return hidden
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    last_slot = layout.start + (layout.counts - 1).clamp_min(0)
    last_used = layout.start + (used - 1).clamp_min(0)
    index, value = (rows, last_slot), hidden[rows, last_used]
    return hidden.index_put_(index, value) if in_place else hidden.index_put(index, value)


def _greedy(logits: Tensor) -> Tensor:
    """(B, V) -> (B,) index of each row's first maximal logit: ``argmax``, but ``max(dim)`` computes the same
    indices (documented to be the first maximal ones) in under two thirds of the time on a CPU."""
    return logits.max(dim=-1).indices


class _PreallocatedLayer(DynamicLayer):
    """A :class:`DynamicLayer` whose keys and values live in buffers sized once for the whole generation.

    ``DynamicLayer.update`` concatenates every layer's keys and values with the new ones, so each decoded
    token copies the whole cache (on a CPU, a third of generation's time at a ProsQA prompt). Here the new
    states are written in place and ``keys``/``values`` are views of the filled prefix: the attention sees
    tensors of exactly the shapes and values the growing cache gives, so every result is the same.
    """

    def __init__(self, rows: int, like_keys: Tensor, like_values: Tensor, extra: int, length: int | None = None):
        """Empty buffers of ``rows`` rows shaped like ``like_keys``/``like_values`` with ``length`` positions
        (default: theirs) and ``extra`` more; ``keys``/``values`` are views of the first ``length``, for the
        caller to fill (:func:`_preallocate` copies a whole cache in, :func:`_merge_rows` row groups)."""
        super().__init__()
        length = like_keys.shape[-2] if length is None else length
        self._key_buffer = like_keys.new_empty((rows, *like_keys.shape[1:-2], length + extra, like_keys.shape[-1]))
        self._value_buffer = like_values.new_empty((rows, *like_values.shape[1:-2], length + extra, like_values.shape[-1]))
        self.keys, self.values = self._key_buffer[..., :length, :], self._value_buffer[..., :length, :]  # (B, H, L, d)
        self.device, self.is_initialized = like_keys.device, True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        length, new = self.keys.shape[-2], key_states.shape[-2]
        if length + new > self._key_buffer.shape[-2]:  # beyond what generation asked for: grow as DynamicLayer does
            return super().update(key_states, value_states, *args, **kwargs)
        self._key_buffer[..., length : length + new, :].copy_(key_states)
        self._value_buffer[..., length : length + new, :].copy_(value_states)
        self.keys = self._key_buffer[..., : length + new, :]
        self.values = self._value_buffer[..., : length + new, :]
        return self.keys, self.values


def _preallocate(cache: DynamicCache, extra: int) -> Cache:
    """The same cache with room for ``extra`` more positions per layer, written in place (see
    :class:`_PreallocatedLayer`); a cache of other layer kinds (sliding windows) is returned as it is."""
    if any(type(layer) is not DynamicLayer or not layer.is_initialized for layer in cache.layers):
        return cache
    layers = []
    for layer in cache.layers:
        room = _PreallocatedLayer(layer.keys.shape[0], layer.keys, layer.values, extra)
        room.keys.copy_(layer.keys)
        room.values.copy_(layer.values)
        layers.append(room)
    return Cache(layers=layers)


def _select_rows(cache: DynamicCache, keep: Tensor, config) -> DynamicCache:
    """A cache holding the rows ``keep`` (bool over the cache's batch) of every layer: ``cache`` itself when
    that is every row (the caller then holds the only reference that goes on), else a new one."""
    if bool(keep.all()):
        return cache
    return DynamicCache(ddp_cache_data=[(layer.keys[keep], layer.values[keep]) for layer in cache.layers], config=config)


def _merge_rows(groups: list[tuple[Tensor, DynamicCache]], batch: int, config, decode_room: int | None = None,
                length: int | None = None) -> Cache:
    """One cache of ``batch`` rows and ``length`` positions from caches of disjoint row groups.

    A group's cache may be shorter than ``length`` (rows that left the latent passes at a column after
    which their prompt is all masked): its missing positions are zeros, which the attention mask hides
    (zeros, not uninitialised memory, since a masked NaN would still poison the attention's sum). With
    ``decode_room`` the rows go straight into preallocated layers with that many free positions (what
    :func:`_preallocate` makes of the merged cache, without the second copy)."""
    first_rows, first_cache = groups[0]
    full = max(cache.layers[0].keys.shape[-2] for _, cache in groups) if length is None else length
    if (len(groups) == 1 and first_rows.numel() == batch and first_cache.layers[0].keys.shape[-2] == full
            and bool((first_rows == torch.arange(batch, device=first_rows.device)).all())):
        return first_cache if decode_room is None else _preallocate(first_cache, decode_room)
    preallocated = decode_room is not None and all(
        type(layer) is DynamicLayer and layer.is_initialized for _, cache in groups for layer in cache.layers
    )
    layers = []
    for layer in range(len(first_cache.layers)):
        first = first_cache.layers[layer]
        if preallocated:
            merged = _PreallocatedLayer(batch, first.keys, first.values, decode_room, length=full)
            keys, values = merged.keys, merged.values
        else:
            keys = first.keys.new_empty((batch, *first.keys.shape[1:-2], full, first.keys.shape[-1]))
            values = first.values.new_empty((batch, *first.values.shape[1:-2], full, first.values.shape[-1]))
        for rows, cache in groups:
            # index_copy_ / index_fill_ along the rows: an indexed assignment (index_put) is several times slower
            source = cache.layers[layer]
            filled = source.keys.shape[-2]
            keys[..., :filled, :].index_copy_(0, rows, source.keys)
            values[..., :filled, :].index_copy_(0, rows, source.values)
            if filled < full:
                keys[..., filled:, :].index_fill_(0, rows, 0)
                values[..., filled:, :].index_fill_(0, rows, 0)
        layers.append(merged if preallocated else (keys, values))
    if preallocated:
        return Cache(layers=layers)
    return DynamicCache(ddp_cache_data=layers, config=config)
