"""The model side of a PPO step: sample responses, score them, and the forward passes that give log-probs and
values over response tokens. Models are duck-typed (transformers causal LMs, sequence classifiers, PEFT models);
nothing here imports transformers.

Conventions (Huang et al. 2024, details 9, 13 and 16): prompts are left-padded and responses follow them, so the
response always starts at column `context_length`; every forward pass gets `position_ids = cumsum(mask) - 1`, so
left padding does not shift positions; logits are divided by the sampling temperature before log-probs; no-grad
forward passes run in chunks of `chunk_size` sequences to bound memory.
"""

from __future__ import annotations

import copy
import functools
import importlib
import math
import zlib
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import torch

from hfgen.errors import UserError
from hfgen.generate import model_generate
from hfgen.rl.functional import response_mask, token_logprobs, token_logprobs_and_entropy


def position_ids_from(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) 0/1 mask -> (B, L) positions counting only attended tokens (0 on left padding)."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def chunks(count: int, size: int):
    """Slices covering range(count) in steps of `size`."""
    for start in range(0, count, size):
        yield slice(start, min(start + size, count))


# ---- generation -------------------------------------------------------------------------------------


class InverseTransformSampler:
    """A logits processor that draws the next token from softmax(scores / temperature) by inverse transform
    sampling (one uniform number per row against the cumulative probabilities) and returns scores whose only
    finite entry is that token, for `generate`'s greedy step (do_sample=False) to pick. The same distribution as
    generate's sampling step, which calls `torch.multinomial`: on CPU that takes about 0.2 ms per step at a
    512-token vocabulary and 5 ms at 16k, ten times this. Other processors (in PPO only the pad token's
    suppression: `make_generation_config` pins the rest off) run before it, as they would before the sampling step.

    `seeds` (one per row): each row draws its numbers from a generator of its own seed, so a row's response depends
    on its seed alone, not on the rows sampled beside it (the chunk, the process's share of the prompts).
    `top_k` > 0, `top_p` < 1 and `min_p` narrow the draw as transformers' warpers do after the temperature, in
    their order (top-k, top-p, min-p): GRPO's held-out comparison samples with its training's top_k/min_p."""

    def __init__(
        self, temperature: float, top_p: float = 1.0, seeds: Sequence[int] | None = None, top_k: int = 0,
        min_p: float | None = None,
    ):  # fmt: skip
        self.temperature, self.top_p, self.seeds = temperature, top_p, seeds
        self.top_k, self.min_p = top_k or 0, min_p
        self.generators = None  # made at the first step, on the device of the scores

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probabilities = torch.softmax(scores.float() / self.temperature, dim=-1)
        if 0 < self.top_k < scores.shape[-1]:  # the k most probable (ties with the k-th too, as TopKLogitsWarper)
            kth = probabilities.topk(self.top_k, dim=-1).values[:, -1:]
            probabilities = probabilities.masked_fill(probabilities < kth, 0.0)
            probabilities = probabilities / probabilities.sum(-1, keepdim=True)  # top-p reads the kept set's total
        if self.top_p < 1.0:
            probabilities = top_p_kept(probabilities, self.top_p)
        if self.min_p:  # tokens at least min_p times as probable as the most probable (MinPLogitsWarper)
            top = probabilities.max(-1, keepdim=True).values
            probabilities = probabilities.masked_fill(probabilities < self.min_p * top, 0.0)
        cumulative = probabilities.cumsum(-1)
        draws = self.uniforms(len(scores), scores.device) * cumulative[:, -1:]
        tokens = torch.searchsorted(cumulative, draws, right=True).clamp(max=scores.shape[-1] - 1)
        return torch.full_like(scores, -math.inf).scatter_(-1, tokens, 0.0)

    def uniforms(self, rows: int, device) -> torch.Tensor:
        """(rows, 1) uniform numbers: from the global generator, or one from each row's own."""
        if self.seeds is None:
            return torch.rand(rows, 1, device=device)
        if self.generators is None:
            self.generators = [torch.Generator(device).manual_seed(seed) for seed in self.seeds]
        return torch.cat([torch.rand(1, 1, generator=generator, device=device) for generator in self.generators])


def top_p_kept(probabilities: torch.Tensor, top_p: float) -> torch.Tensor:
    """(B, V) probabilities with the tokens outside the top-p set zeroed (not renormalized): the most probable
    tokens whose total reaches `top_p`, at least one; as transformers' TopPLogitsWarper (ties aside)."""
    ascending, order = probabilities.sort(dim=-1)
    dropped = ascending.cumsum(-1) <= 1 - top_p
    dropped[:, -1] = False  # the most probable token always stays
    return probabilities.masked_fill(dropped.scatter(-1, order, dropped), 0.0)


def picking_the_draw(generation_config):
    """A copy of a sampling `generation_config` whose greedy step picks the token `InverseTransformSampler` drew
    (at the config's temperature, top-k, top-p and min-p, given to the sampler)."""
    generation_config = copy.deepcopy(generation_config)
    generation_config.update(do_sample=False, temperature=1.0, top_p=1.0, top_k=None, min_p=None)
    if narrows_sampling(generation_config):  # a caller's bug: the seeded draw has no typical-p, top-h, ...
        raise ValueError("seeded sampling draws by temperature, top-k, top-p and min-p only")
    return generation_config


def draw_can_be_seeded(generation_config) -> bool:
    """Whether `InverseTransformSampler` draws what `generation_config` samples (no typical-p, top-h, epsilon or
    eta cutoff), so that `sample_responses` can seed each row."""
    config = copy.deepcopy(generation_config)
    config.update(top_p=1.0, top_k=None, min_p=None)
    return not narrows_sampling(config)


def narrows_sampling(generation_config) -> bool:
    """Whether `generate`'s sampling keeps only part of the vocabulary (top-p, top-k, min-p, top-h, typical-p, an
    epsilon or eta cutoff): transformers runs those warpers only when it samples (do_sample), so the greedy step
    behind `InverseTransformSampler` would skip them. PPO pins them off (`make_generation_config`); GRPO and RLOO
    train with them (`group_rl.sampling_config`)."""
    config = generation_config
    return (
        (config.top_p or 1.0) < 1.0
        or (config.top_k or 0) > 0
        or bool(config.min_p)  # (0.0 keeps every token)
        or config.top_h is not None
        or (config.typical_p or 1.0) < 1.0
        or 0.0 < (config.epsilon_cutoff or 0.0) < 1.0
        or 0.0 < (config.eta_cutoff or 0.0) < 1.0
    )


class Sampled(NamedTuple):
    response_ids: torch.Tensor  # (B, T) long, padded with pad_token_id after the first EOS
    logprobs: torch.Tensor  # (B, T) float, log pi(token) at the sampling temperature
    entropy: torch.Tensor  # (B, T) float, entropy of pi(. | prefix) at the sampling temperature


@torch.no_grad()
def sample_responses(
    policy, query_ids: torch.Tensor, query_mask: torch.Tensor, generation_config, chunk_size: int, pad_token_id: int,
    seeds: Sequence[int] | None = None,
) -> Sampled:  # fmt: skip
    """Sample one response per prompt with KV-cached `generate`, chunk by chunk.

    The log-probs of the sampled tokens come from the logits `generate` already computed (output_logits), at
    the config's temperature: that is pi_old of the PPO ratio, with no second forward pass over the rollout, when
    the policy computes in float32 (`sampled_logprobs`).
    `generation_config` must set do_sample, return_dict_in_generate and output_logits. When sampling keeps the
    whole vocabulary (`narrows_sampling`: no top-p, top-k, min-p, ...), the tokens are drawn by
    `InverseTransformSampler` (the same distribution as generate's own sampling, faster).

    `seeds` (one per row; sampling by temperature, top-k, top-p and min-p only: `draw_can_be_seeded`):
    each row is sampled with the random numbers of its own seed, whatever rows are sampled beside it; the held-out
    comparison seeds each prompt by its place in the whole list, so that its answers do not depend on how many
    processes share the list or on which one it lands.
    """
    temperature, top_p = generation_config.temperature, generation_config.top_p or 1.0
    narrowing = {"top_k": generation_config.top_k or 0, "min_p": generation_config.min_p}
    draws_here = seeds is not None or not narrows_sampling(generation_config)
    if draws_here:
        generation_config = picking_the_draw(generation_config)
    pieces = []
    for rows in chunks(len(query_ids), chunk_size):
        sampler = InverseTransformSampler(temperature, top_p, None if seeds is None else seeds[rows], **narrowing)
        output = model_generate(
            policy, input_ids=query_ids[rows], attention_mask=query_mask[rows], generation_config=generation_config,
            logits_processor=[sampler] if draws_here else None,
        )  # fmt: skip
        responses = output.sequences[:, query_ids.shape[1] :]
        logits = torch.stack(output.logits, dim=1)  # (b, t, V), raw (before temperature or top-p)
        pieces.append(Sampled(responses, *token_logprobs_and_entropy(logits, responses, temperature)))
        del logits, output
    width = max(piece.response_ids.shape[1] for piece in pieces)  # generation stops early when a chunk is done

    def padded(tensor, value):
        return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)

    return Sampled(
        torch.cat([padded(piece.response_ids, pad_token_id) for piece in pieces]),
        torch.cat([padded(piece.logprobs, 0.0) for piece in pieces]),
        torch.cat([padded(piece.entropy, 0.0) for piece in pieces]),
    )


# ---- forward passes over responses ------------------------------------------------------------------


def response_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, context_length: int) -> torch.Tensor:
    """(B, P + T) prompt+response -> (B, T, V) logits predicting each response token. Only the T positions before
    each response token go through the LM head (`logits_to_keep` as positions), which saves its cost on every
    prompt token and on the last token (which predicts nothing that is scored)."""
    positions = torch.arange(context_length - 1, input_ids.shape[1] - 1, device=input_ids.device)
    output = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from(attention_mask),
        logits_to_keep=positions,
        use_cache=False,
    )
    return output.logits


def token_values(
    value_model, input_ids: torch.Tensor, attention_mask: torch.Tensor, context_length: int
) -> torch.Tensor:
    """(B, P + T) -> (B, T) values V(prefix before each response token) from a one-label sequence classifier
    (`AutoModelForSequenceClassification`): its backbone's hidden states through its `score` head, at every
    position rather than only the last. A PEFT-wrapped classifier is read through its base model (its LoRA layers
    sit inside it)."""
    if hasattr(value_model, "get_base_model"):
        value_model = value_model.get_base_model()
    backbone = getattr(value_model, value_model.base_model_prefix)
    hidden = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from(attention_mask),
        use_cache=False,
    ).last_hidden_state
    return value_model.score(hidden[:, context_length - 1 : -1]).squeeze(-1).float()


class PolicyAndValue(torch.nn.Module):
    """The two trained models behind one forward, so one DDP wrapper syncs both models' gradients in one
    backward pass (and one `accelerator.prepare`, one optimizer, one checkpoint hold them)."""

    def __init__(self, policy, value_model):
        super().__init__()
        self.policy, self.value_model = policy, value_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, context_length: int):
        """-> (policy logits (B, T, V), values (B, T)) over the response tokens."""
        logits = response_logits(self.policy, input_ids, attention_mask, context_length)
        return logits, token_values(self.value_model, input_ids, attention_mask, context_length)

    def tie_weights(self, **kwargs):
        """Tie each model's shared weights again (a PeftModel forwards this to its base). accelerate's FSDP2 prepare
        with `cpu_ram_efficient_loading` (fsdp.yaml's) moves the model to meta, which unties embeddings and LM head,
        and re-ties only a model with this method: without it the policy trained them as two parameters."""
        self.policy.tie_weights()
        self.value_model.tie_weights()


@torch.no_grad()
def response_logprobs(
    model, input_ids, attention_mask, context_length: int, temperature: float, chunk_size: int
) -> torch.Tensor:
    """(B, T) log-probs of the response tokens under `model`, from full forward passes over prompt + response,
    chunked, no grad."""
    responses = input_ids[:, context_length:]
    pieces = []
    for rows in chunks(len(input_ids), chunk_size):
        logits = response_logits(model, input_ids[rows], attention_mask[rows], context_length)
        pieces.append(token_logprobs(logits, responses[rows], temperature))
    return torch.cat(pieces)


def reference_logprobs(
    policy, reference, input_ids, attention_mask, context_length: int, temperature: float, chunk_size: int
) -> torch.Tensor:
    """(B, T) log-probs of the response tokens under the frozen reference policy. With `reference=None` the
    policy is a PEFT model and the reference is the same model with its adapter disabled: no second copy."""
    with policy.disable_adapter() if reference is None else nullcontext():
        return response_logprobs(
            policy if reference is None else reference, input_ids, attention_mask, context_length, temperature,
            chunk_size,
        )  # fmt: skip


def sampled_logprobs(
    accelerator, policy, sampled: Sampled, input_ids, attention_mask, context_length: int, temperature: float,
    chunk_size: int,
) -> torch.Tensor:  # fmt: skip
    """(B, T) the policy's log-probs of its own sampled response tokens (`input_ids` holds them after the prompts),
    to set against the reference's (a KL) or the update's (PPO's ratio), which come from full forward passes.
    Computing in float32, those `generate` computed (its KV-cached passes agree with a full pass to ~1e-7), with no
    second pass; computing in a half dtype (mixed precision, or half weights), a full pass as the reference's: the
    two paths round differently there (measured on the tiny models in bfloat16: a KL of 0.004-0.015 nats and PPO's
    first ratio 1.0018 at learning rate 0, where the policy is its reference)."""
    mixed = getattr(accelerator, "mixed_precision", "no")  # (`hfgen eval` passes a PartialState: none)
    if mixed == "no" and next(policy.parameters()).dtype == torch.float32:
        return sampled.logprobs
    return response_logprobs(policy, input_ids, attention_mask, context_length, temperature, chunk_size)


@torch.no_grad()
def rollout_values(value_model, input_ids, attention_mask, context_length: int, chunk_size: int) -> torch.Tensor:
    """(B, T) values of the rollout, chunked, no grad."""
    return torch.cat(
        [
            token_values(value_model, input_ids[rows], attention_mask[rows], context_length)
            for rows in chunks(len(input_ids), chunk_size)
        ]
    )


# ---- scoring ----------------------------------------------------------------------------------------

RewardFunction = Callable[[list[str], list[str]], list[float]]


def prompt_text(prompt) -> str:
    """What a rule-based reward function reads as the prompt: the string itself, or a conversation's last
    user message."""
    if isinstance(prompt, str):
        return prompt
    return next(message["content"] for message in reversed(prompt) if message["role"] == "user")


def response_texts(tokenizer, response_ids: torch.Tensor, eos_token_ids: int | list[int]) -> list[str]:
    """Each response's text up to its first EOS, special tokens removed."""
    mask = response_mask(response_ids, eos_token_ids)
    return tokenizer.batch_decode(
        [ids[keep].tolist() for ids, keep in zip(response_ids.cpu(), mask.cpu())], skip_special_tokens=True
    )


def reward_model_texts(tokenizer, prompts: list, responses: list[str], finished: list[bool]) -> list[str]:
    """Prompt and response rendered the way TRL's RewardTrainer rendered the reward model's training pairs: the
    reward model's own chat template for conversational prompts (so a reward model with another tokenizer or
    template still reads what it was trained on), else prompt + response + EOS. Only a finished response is
    closed (EOS, end of turn): one cut off at the length limit is shown open, so it cannot pass for a complete
    answer. An encoder reward model without EOS or chat template reads plain text, conversations in the plain
    template the reward stage trained it on (`hfgen.data.rendering`)."""
    from hfgen.data.rendering import plain_conversation, uses_plain_template

    eos = tokenizer.eos_token or ""
    texts = []
    for prompt, response, done in zip(prompts, responses, finished):
        if isinstance(prompt, str):
            texts.append(prompt + response + (eos if done else ""))
        elif uses_plain_template(tokenizer, True):
            texts.append(plain_conversation([*prompt, {"role": "assistant", "content": response}]))
        elif done:
            texts.append(
                tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": response}], tokenize=False)
            )
        else:
            texts.append(open_turn_text(tokenizer, prompt, response))
    return texts


def open_turn_text(tokenizer, prompt: list, response: str) -> str:
    """The conversation with `response` as an assistant turn left open: the template's rendering of the finished
    turn, cut where the response's text ends (before its closing), so the response reads as the template writes a
    turn's content. Not the generation prompt + the response: Llama 2's template writes ' ' + content after
    '[/INST]', and the response's decoded text has lost the leading space of its SentencePiece word ('▁the' ->
    'the'), so '[/INST]the' would tokenize its first word unlike anything the reward model trained on. That
    rendering where the template does not write the response's text as it is."""
    import os

    opened = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    content = response.strip()
    if not content:
        return opened + response
    full = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": response}], tokenize=False)
    start = len(os.path.commonprefix([opened, full]))  # the turn's content begins after the shared prompt
    for written in (response, content):  # as it is, or stripped as Llama 2's template strips it
        if (at := full.find(written, start)) >= 0:
            return full[: at + len(written)]
    return opened + response


def turn_close_ids(tokenizer) -> list[int] | None:
    """The tokens a chat template writes after a finished assistant turn's content: EOS and what follows it (Llama
    3's <|eot_id|>, ChatML's <|im_end|> and newline), or its own end-of-turn token where that is not EOS (Gemma's
    <end_of_turn> and newline, Phi-3's <|end|>, newline and <|endoftext|>). The reward model saw them at the end of
    every training pair, so the ids path closes a finished response with them. Without a template: EOS. None when
    the template does not write a finished turn as its generation prompt + the content + a closing (Qwen3's empty
    <think> block before the last turn's content): the ids path cannot rebuild that, the text path renders it."""
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    if tokenizer.chat_template is None:
        return eos
    content = "b"
    prompt = [{"role": "user", "content": "a"}]
    opened = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) + content
    rendered = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": content}], tokenize=False)
    if not rendered.startswith(opened):
        return None
    return tokenizer(rendered[len(opened) :], add_special_tokens=False)["input_ids"]


def same_tokenizer(a, b) -> bool:
    """Whether token ids of `a` mean the same to `b`: the same vocabulary (`same_vocabulary`), EOS and chat
    template."""
    return a.eos_token == b.eos_token and a.chat_template == b.chat_template and same_vocabulary(a, b)


def same_vocabulary(a, b) -> bool:
    """Whether every token of b's vocabulary has the same id in a's, and a has no other token but its pad (never
    sampled): a policy whose SFT added a token (a tool-call marker) samples ids that b's model lacks or reads as
    another token."""
    vocabulary, other = a.get_vocab(), b.get_vocab()
    return set(vocabulary) - set(other) <= {a.pad_token} and all(
        vocabulary.get(token) == index for token, index in other.items()
    )


def episode_ids(queries: list[list[int]], response_ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """Each episode's prompt ids (unpadded) followed by its response ids under `mask` (up to the first EOS)."""
    return [query + ids[keep].tolist() for query, ids, keep in zip(queries, response_ids.cpu(), mask.cpu())]


@torch.no_grad()
def sequence_scores(reward_model, sequences: list[list[int]], pad_token_id: int, chunk_size: int) -> torch.Tensor:
    """(B,) float scores of a one-label sequence classifier, read at each token sequence's last token (a decoder's
    head) or its first (an encoder's [CLS] pooler). A decoder's sequences are left-padded with `position_ids_from`
    (as PPO's every forward pass); an encoder's are right-padded, so its first token stays first, without position ids:
    it numbers its own (RoBERTa from padding_idx + 1), as in the reward stage's training (`hfgen.models.reads_last_token`
    tells which it is, from the model: DeBERTa's and RoBERTa's tokenizers have an EOS too)."""
    from hfgen.models import reads_last_token

    device = next(reward_model.parameters()).device
    table = reward_model.get_input_embeddings().num_embeddings
    outside = max((max(ids, default=0) for ids in sequences), default=0)
    if outside >= table:  # an index error deep in the model otherwise
        raise UserError(
            f"token id {outside} reached the reward model, whose embeddings have {table} rows: the policy's ids are not "
            "all in the reward model's vocabulary (its tokenizer has tokens the reward model lacks, e.g. an added pad "
            "token); give the reward model a tokenizer that matches its embeddings"
        )
    decoder = reads_last_token(model_config(reward_model))
    scores = []
    for rows in chunks(len(sequences), chunk_size):
        input_ids, attention_mask = (left_pad if decoder else right_pad)(sequences[rows], pad_token_id, device)
        positions = {"position_ids": position_ids_from(attention_mask)} if decoder else {}
        output = reward_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **positions)
        scores.append(output.logits[:, 0].float())
    return torch.cat(scores)


def load_function(spec: str) -> RewardFunction:
    """The function named by 'package.module:function' (or 'path/to/file.py:function'), as `recipe_function`
    wraps it. Raises ValueError naming what is wrong."""
    module_name, colon, function_name = spec.rpartition(":")
    if not colon or not module_name or not function_name:
        raise ValueError(f"'{spec}' is not of the form package.module:function (or path/to/file.py:function)")
    try:
        module = import_module_or_file(module_name)
        function = getattr(module, function_name)
    except ImportError as error:
        raise ValueError(
            f"'{spec}': cannot import module '{module_name}' ({error}); give an importable module (the working "
            "directory and PYTHONPATH are searched) or a file, path/to/rewards.py:function"
        ) from None
    except AttributeError:
        raise ValueError(f"'{spec}': module '{module_name}' has no attribute '{function_name}'") from None
    if not callable(function):
        raise ValueError(f"'{spec}' is not callable")
    return recipe_function(function, spec)


def import_module_or_file(name: str):
    """A module by import name, also from the working directory (the `hfgen` console script does not put it on
    sys.path, as `python -m` does), or from a .py file."""
    import sys

    if name.endswith(".py"):
        from importlib.util import module_from_spec, spec_from_file_location
        from pathlib import Path

        path = Path(name).expanduser().resolve()
        if not path.is_file():
            raise ImportError(f"no file {path}")
        module_name = f"hfgen_recipe_{path.stem}_{zlib.crc32(str(path).encode())}"
        if module_name not in sys.modules:
            loader = spec_from_file_location(module_name, path)
            module = module_from_spec(loader)
            sys.modules[module_name] = module  # before it runs: dataclasses and pickling look it up there
            loader.loader.exec_module(module)
        return sys.modules[module_name]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        import os

        if error.name != name.partition(".")[0] or os.getcwd() in sys.path:
            raise
        sys.path.append(os.getcwd())
        return importlib.import_module(name)


def takes_trl_arguments(function) -> bool:
    """A reward function written for TRL: it names its arguments `completions` (and maybe `prompts`), which TRL
    passes by keyword."""
    import inspect

    try:
        return "completions" in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def recipe_function(function, spec: str):
    """A recipe's reward / oracle / eval function, called as function(prompts, responses, **columns) whichever
    convention it was written in, with the columns it names as parameters (all of them when it takes **kwargs):
    `prompts` as the policy saw them (strings or chat messages), `responses` texts. hfgen's positional convention
    reads each prompt's text (`prompt_text`); TRL's keywords `prompts`, `completions` get what TRL gives them, the
    prompts as they are and, for a conversation, each completion as its assistant message list
    (`[{"role": "assistant", "content": text}]`). An exception inside it is a UserError naming the function, its
    exception and where it was raised (the recipe's code, not hfgen's)."""
    import inspect

    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):  # a builtin without a signature: called positionally, with no columns
        parameters = {}
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    trl_style = "completions" in parameters

    @functools.wraps(function)
    def call(prompts, responses, **columns):
        columns = {k: v for k, v in columns.items() if takes_all or k in parameters}  # the ones it names
        try:
            if not trl_style:
                return function([prompt_text(p) for p in prompts], responses, **columns)
            completions = [r if isinstance(p, str) else [{"role": "assistant", "content": r}]
                           for p, r in zip(prompts, responses)]  # fmt: skip
            given = {"prompts": list(prompts), "completions": completions, **columns}
            return function(**{k: v for k, v in given.items() if takes_all or k in parameters})
        except UserError:
            raise
        except Exception as error:
            import traceback

            where = traceback.extract_tb(error.__traceback__)[-1]
            raise UserError(
                f"function '{spec}' raised {type(error).__name__}: {error} (at {where.filename}:{where.lineno})"
            ) from None

    return call


def function_name(spec: str) -> str:
    """How a reward function is named in the logs (rewards/NAME/...) and eval.json: its name without its module."""
    return spec.rpartition(":")[2]


def same_name_problems(specs: Sequence[str]) -> list[str]:
    """Two reward functions of one name would share their records (rewards/NAME/mean): refused."""
    names = [function_name(spec) for spec in specs]
    twice = sorted({name for name in names if names.count(name) > 1})
    if not twice:
        return []
    return [
        f"reward_functions: {[s for s in specs if function_name(s) in twice]} share the name(s) {twice}, under which "
        "their figures are logged; rename one of them (or wrap it in a function of another name)"
    ]


# What a stage that scores with function(prompts, responses) says of a function that needs more
WHY_NO_COLUMNS = "this stage calls function(prompts, responses); grpo and rloo pass a dataset's columns by name"


def unmet_arguments(function, columns: Sequence[str] = ()) -> list[str]:
    """The arguments `function` needs besides the prompts and responses that `columns` (the dataset columns a
    caller passes by name: none for PPO and the evaluations) do not give it, e.g. GSM8K's `answer`."""
    required = required_arguments(function)
    given = ("prompts", "completions") if takes_trl_arguments(function) else required[:2]
    return [name for name in required if name not in given and name not in columns]


def required_arguments(function) -> list[str]:
    """The names of `function`'s parameters that have no default (not *args / **kwargs)."""
    import inspect

    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: nothing known
        return []
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [p.name for p in parameters if p.default is inspect.Parameter.empty and p.kind not in variadic]


def function_scores(function: RewardFunction, prompts: list, responses: list[str], device) -> torch.Tensor:
    """(B,) float scores of a rule-based reward function called as function(prompt texts, response texts)."""
    values = function(list(prompts), responses)  # (a recipe function reads each prompt in its convention)
    return torch.tensor(reward_values(function, values, len(responses), prompts=prompts), device=device)


def reward_values(function, values, count: int, prompts: list | None = None, source: str = "") -> list[float]:
    """What a reward function returned, as `count` floats (a list, tuple, numpy array or tensor of numbers). None
    is TRL's "this function does not score this sample": NaN here, which the weighted sum of the rewards skips
    (`RewardScorer`; TRL's GRPO and RLOO do the same). Anything else (text, inf, a NaN of its own) is the recipe's
    function at fault, not hfgen: exit 2 naming the function, what it returned and (given `prompts`) for which
    prompt. `source` names another scorer in those errors: a reward model's scores are checked here too, since its
    NaN would otherwise pass for a function's None, a reward of 0."""
    name = getattr(function, "__qualname__", repr(function))
    source_given, source = bool(source), source or f"reward function {name}"
    try:
        values = values.tolist() if hasattr(values, "tolist") else list(values)
    except TypeError:
        raise UserError(
            f"reward function {name} returned {type(values).__name__}, not a list of {count} scores"
        ) from None
    if len(values) != count:
        raise UserError(f"reward function {name} returned {len(values)} scores for {count} responses")
    scores = []
    for index, value in enumerate(values):
        try:
            if isinstance(value, (str, bytes)):
                raise TypeError("text is not a score")
            score = math.nan if value is None else float(value)
            # inf or NaN: a broken function, not a score; taken as one it would make PPO's loss NaN (a
            # "divergence" blamed on the learning rate) and GRPO's group advantage zero, and a NaN would pass as None
            if value is not None and not math.isfinite(score):
                raise ValueError("not finite")
            scores.append(score)
        except (TypeError, ValueError):
            prompt = "" if prompts is None else f" (prompt {prompt_text(prompts[index])[:80]!r})"
            unscored = "" if source_given else " (None: the function does not score that response)"
            raise UserError(
                f"{source} returned {value!r} for response {index}{prompt}: a score must be a finite number{unscored}"
            ) from None
    return scores


@dataclass
class RewardScorer:
    """The training reward of a batch: a weighted sum of a reward model's score and rule-based reward functions'
    scores. Used by PPO and by `hfgen eval` alike, so eval reports the quantity PPO optimised.

    The reward model reads the policy's own token ids (prompt + response up to its EOS, plus the chat template's
    end-of-turn tokens) when it shares the policy's tokenizer, as TRL's PPOTrainer did: decoding and re-encoding
    can change tokens (a leading space, special tokens). With another tokenizer, it reads the text re-rendered with
    its own (`reward_model_texts`). Either way a response cut off without EOS is shown unfinished."""

    reward_model: object | None  # one-label sequence classifier, or None
    reward_tokenizer: object | None
    functions: dict[str, RewardFunction]  # name -> function(prompt texts, response texts) -> list[float]
    weights: list[float]  # one per component: [reward model (if any), *functions]
    chunk_size: int
    policy_tokenizer: object | None = None  # when it is the reward model's tokenizer, ids pass straight through
    warned_unscored: bool = False  # said once a run

    def __post_init__(self):
        self.reads_policy_ids = (
            self.reward_model is not None
            and self.policy_tokenizer is not None
            and same_tokenizer(self.policy_tokenizer, self.reward_tokenizer)
        )
        self.close_ids = turn_close_ids(self.reward_tokenizer) if self.reads_policy_ids else None
        if self.reward_model is not None and pad_hides_eos(self.reward_model, self.reward_tokenizer):
            print(f"warning: the reward model's pad token is its EOS (id {self.reward_tokenizer.eos_token_id}), as "
                  "in reward models hfgen trained before it gave such a tokenizer a pad of its own: it reads the "
                  "token before a closing EOS, in training as here, so it scores a finished answer that ends with "
                  "the EOS as the same answer cut off; train it again with the reward stage")  # fmt: skip

    def __call__(
        self, prompts: list, responses: list[str], finished, device, token_ids: list[list[int]] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """prompts (B) as the policy saw them (strings or chat messages), response texts (B), finished (B) bools (the
        response emitted EOS), token_ids (B): the policy's prompt + response ids up to and including the EOS.
        -> ((B,) weighted total, {component name: (B,) scores})."""
        from hfgen.data.rendering import uses_plain_template

        finished = [bool(done) for done in finished]
        components = {}
        if self.reward_model is not None:
            chat = not isinstance(prompts[0], str)
            if self.reads_policy_ids and token_ids is not None and (self.close_ids is not None or not chat):
                sequences = [self.closed(ids, chat) if done else list(ids) for ids, done in zip(token_ids, finished)]
            else:
                texts = reward_model_texts(self.reward_tokenizer, prompts, responses, finished)
                special = not chat or uses_plain_template(self.reward_tokenizer, chat)  # a template writes its own
                sequences = reward_model_ids(self.reward_model, self.reward_tokenizer, texts, special)
            pad = self.reward_tokenizer.pad_token_id
            scores = sequence_scores(self.reward_model, sequences, pad, self.chunk_size)
            source = f"reward model {str(model_config(self.reward_model).name_or_path)!r}"
            scores = reward_values(self.reward_model, scores, len(sequences), prompts=prompts, source=source)
            components["reward_model"] = torch.tensor(scores, device=device)
        for name, function in self.functions.items():
            components[name] = function_scores(function, prompts, responses, device)
        weighted = torch.stack([weight * scores for weight, scores in zip(self.weights, components.values())])
        unscored = weighted.isnan().all(0)
        if unscored.any() and not self.warned_unscored:
            print(f"warning: no reward component scored {int(unscored.sum())} of {len(responses)} responses (every "
                  "function returned None for them): their reward is 0")  # fmt: skip
            self.warned_unscored = True
        return weighted.nansum(0), components

    def closed(self, ids: list[int], chat: bool) -> list[int]:
        """A finished episode's ids (ending with the stop id that ended it) as the text path renders it
        (`reward_model_texts`): the response's text, then the template's closing of an assistant turn
        (`turn_close_ids`) for a conversation, EOS for a plain prompt. A stop id other than EOS ("." in a list of eos
        ids) is kept when it is text and dropped when it is a special token (`response_texts` skips those: Gemma's
        <end_of_turn>, Phi-3's <|end|>, which the closing writes again where the template puts them)."""
        tokenizer = self.reward_tokenizer
        ids, stop = list(ids[:-1]), ids[-1]
        if stop != tokenizer.eos_token_id and stop not in tokenizer.all_special_ids:
            ids.append(stop)
        eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        return ids + (self.close_ids if chat else eos)


def model_config(model):
    """The transformers config of `model`, also when an engine wraps it: a reward model TRL prepared under ZeRO-3 is
    a DeepSpeedEngine, whose own `config` is the DeepSpeed settings (a dict). None for a model without one."""
    return getattr(getattr(model, "module", model), "config", None)


def pad_hides_eos(reward_model, tokenizer) -> bool:
    """Whether a decoder reward model's pad id (`config.pad_token_id`, by which its classifier finds the last token)
    is the EOS its inputs end with: it then reads the token before that EOS, and never sees whether an answer ended
    (an encoder pools its first token, unaffected)."""
    from hfgen.models import reads_last_token

    config = model_config(reward_model)
    pad = getattr(config, "pad_token_id", None)
    return pad is not None and pad == tokenizer.eos_token_id and reads_last_token(config)


def reward_model_ids(reward_model, tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    """The reward model's token ids of `texts`, cut from the left to the positions it can read when they are learned
    (a BERT encoder: 512; `hfgen.models.position_limit`): its own tokenizer can make a prompt and response longer
    than the policy's, and past the limit the model fails. Cutting the prompt's beginning keeps the response,
    which is what is judged, and the special tokens ([CLS] that an encoder pools)."""
    from hfgen.models import position_limit

    limit = position_limit(model_config(reward_model))
    if not limit:
        return tokenizer(texts, add_special_tokens=special)["input_ids"]
    side, tokenizer.truncation_side = tokenizer.truncation_side, "left"
    try:
        return tokenizer(texts, add_special_tokens=special, truncation=True, max_length=limit)["input_ids"]
    finally:
        tokenizer.truncation_side = side


# ---- prompts ----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _permutation(size: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()


def prompt_rows(step: int, size: int, global_batch: int, local_batch: int, rank: int, seed: int) -> list[int]:
    """Indices of the prompts process `rank` rolls out at `step` (counted from 1): consecutive slices of seeded
    permutations of the `size` prompts, a new permutation per pass, a disjoint slice per process. A pure function
    of the step, so a resumed run takes exactly the prompts the uninterrupted run would have taken."""
    first = (step - 1) * global_batch + rank * local_batch
    return [_permutation(size, seed, i // size)[i % size] for i in range(first, first + local_batch)]


def right_pad(sequences: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> ((B, P) ids, (B, P) 0/1 mask), each sequence left-aligned."""
    ids, mask = left_pad([s[::-1] for s in sequences], pad_token_id, device)
    return ids.flip(1), mask.flip(1)


def left_pad(sequences: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> ((B, P) ids, (B, P) 0/1 mask), each sequence right-aligned."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, width - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
        mask[row, width - len(sequence) :] = 1
    return ids.to(device), mask.to(device)
