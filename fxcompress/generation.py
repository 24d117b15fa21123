"""How closely a compressed causal LM generates like its original: greedy-token match and next-token agreement.

:func:`generation_fidelity` decodes every prompt greedily with both models and compares

* ``greedy_match`` — the fraction of new tokens equal to the reference's at the same position;
* ``prefix_match`` — the mean fraction of new tokens before the first difference (1.0: identical);
* teacher-forced on the reference's continuation (both models read the same tokens), per new position:
  ``top1_agreement`` — the fraction where both pick the same next token, and ``kl`` — the mean
  ``KL(p_ref ‖ p_cand)`` of the next-token distributions in nats, the measure that is not swamped by
  near-ties the way argmax matches are (random-weight models have nearly flat logits).

Either model may be a Hugging Face model (``generate`` with its KV cache, greedy) or anything returning
``.logits`` for ``input_ids`` (an fxcompress graph: greedy decoding re-runs the whole sequence per token).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .errors import InvalidInputError


@dataclass(frozen=True)
class GenerationFidelity:
    greedy_match: float
    prefix_match: float
    top1_agreement: float
    kl: float
    new_tokens: int
    prompts: int

    def as_dict(self) -> dict:
        return asdict(self)


def greedy_tokens(model, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """``[B, new_tokens]`` greedy continuation of ``prompts [B, P]``, exactly ``new_tokens`` long."""
    with torch.no_grad():
        if hasattr(model, "generate"):
            config = getattr(model, "generation_config", None)
            pad = next((t for t in (getattr(config, "pad_token_id", None), getattr(config, "eos_token_id", None), 0) if t is not None), 0)
            out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=pad if isinstance(pad, int) else pad[0])
            return out[:, prompts.shape[1]:]
        sequence = prompts
        for _ in range(new_tokens):
            following = logits_of(model, sequence)[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, following], 1)
        return sequence[:, prompts.shape[1]:]


def logits_of(model, input_ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=input_ids)
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, dict):
        logits = out.get("logits")
    if logits is None:
        raise InvalidInputError(f"generation_fidelity: {type(model).__name__} returned no .logits for input_ids; pass a causal LM")
    return logits


def generation_fidelity(reference, candidate, prompts: torch.Tensor, new_tokens: int = 32) -> GenerationFidelity:
    """Greedy match and teacher-forced next-token agreement of ``candidate`` against ``reference`` on
    ``prompts`` (``[B, P]`` token ids, or ``[P]`` for one prompt); see the module docstring."""
    prompts = prompts if prompts.dim() == 2 else prompts[None]
    if not isinstance(new_tokens, int) or new_tokens < 1:
        raise InvalidInputError(f"generation_fidelity: new_tokens must be a positive integer, not {new_tokens!r}")
    expected, produced = greedy_tokens(reference, prompts, new_tokens), greedy_tokens(candidate, prompts, new_tokens)
    same = expected == produced
    prefix = torch.where(same.all(1), new_tokens, (~same).int().argmax(1)).float() / new_tokens
    sequence = torch.cat([prompts, expected], 1)
    positions = slice(prompts.shape[1] - 1, sequence.shape[1] - 1)  # the logits that predict the new tokens
    with torch.no_grad():
        ref = logits_of(reference, sequence)[:, positions].float().log_softmax(-1)
        cand = logits_of(candidate, sequence)[:, positions].float().log_softmax(-1)
    kl = (ref.exp() * (ref - cand)).sum(-1).mean().item()
    return GenerationFidelity(
        greedy_match=same.float().mean().item(), prefix_match=prefix.mean().item(),
        top1_agreement=(ref.argmax(-1) == cand.argmax(-1)).float().mean().item(), kl=max(kl, 0.0),
        new_tokens=new_tokens, prompts=prompts.shape[0],
    )
