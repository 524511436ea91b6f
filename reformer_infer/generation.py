"""Single-request generation on top of `model.prefill` / `model.decode_step` (no engine, no threads).

This is the library's simplest path to text: prefill the prompt once, then decode one token at a time
from the explicit cache, sampling with `reformer_infer.sampling` exactly as the engine does (so greedy
generation here equals greedy generation through the engine and the server).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from reformer_infer.requests import InvalidRequestError, SamplingParams, validate_prompt
from reformer_infer.sampling import SlotSampler


def generate(
    model: nn.Module,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stop_ids: Sequence[int] = (),
) -> Iterator[int]:
    """Yield up to `max_new_tokens` generated token ids; `temperature=0` is greedy.

    Generation ends early when a token in `stop_ids` is sampled; that token is not yielded (the engine
    likewise never emits stop or eos tokens). Only `stop_ids` stop generation: pass
    `stop_ids=(model.config.eos_token_id,)` to stop at end-of-sequence.
    """
    vocab_size = int(model.config.vocab_size)
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop_token_ids=tuple(stop_ids),
    )
    params.validate(vocab_size=vocab_size)
    validate_prompt(list(prompt_ids), vocab_size=vocab_size)
    context = int(getattr(model.config, "max_context", model.config.max_position_embeddings))
    if len(prompt_ids) + max_new_tokens > context:
        raise InvalidRequestError(
            "max_new_tokens",
            f"prompt ({len(prompt_ids)}) + max_new_tokens ({max_new_tokens}) exceeds the model's context of "
            f"{context} tokens",
        )
    device = getattr(model, "device", None) or next(model.parameters()).device
    sampler = SlotSampler(1, vocab_size, device)
    row = sampler.take_row()
    sampler.join(row, params, prompt_ids)
    stop = set(stop_ids)

    # inference_mode is entered per call, not around the loop: a generator suspended at `yield` would
    # otherwise leave the mode switched on in the caller's code.
    with torch.inference_mode():
        logits, cache = model.prefill(torch.tensor([list(prompt_ids)], dtype=torch.long, device=device))
    try:
        for step in range(max_new_tokens):
            with torch.inference_mode():
                token = sampler.sample_now(logits[:, -1, :], [row]).tokens[0]  # also the next input id
            if token in stop:
                return
            yield token
            if step + 1 == max_new_tokens:
                return
            with torch.inference_mode():
                logits, cache = model.decode_step(sampler.next_ids[row : row + 1].view(1, 1), cache)
    finally:
        cache.release()  # the decode state goes back
