"""`hfgen check`: the report on a good SFT recipe, and exit 2 naming the problem on recipes made to show fully
masked labels, a missing EOS in the labels and a chat template that generates from another prompt."""

import json

import pytest
import yaml

from conftest import ASCII_LOCALE, REPO, count_calls, run_hfgen, run_hfgen_here
from hfgen.cli import main as hfgen_main
from hfgen.models import CHAT_TEMPLATE
from tiny_models import save_tiny_llama

SFT_FULL = REPO / "recipes/tiny/sft_full.yaml"
GENERATION_SPAN = "{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_lm"))


def with_template(tiny_lm, tmp_path, old, new):
    """A copy of the tiny model's tokenizer whose chat template has `old` replaced by `new`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    assert old in tokenizer.chat_template
    tokenizer.chat_template = tokenizer.chat_template.replace(old, new)
    path = tmp_path / "model"
    for file in tiny_lm.iterdir():
        (path / file.name).parent.mkdir(exist_ok=True)
        (path / file.name).write_bytes(file.read_bytes())
    tokenizer.save_pretrained(path)
    return path


def check(capsys, *argv, small=True):
    caps = ["--max_train_samples", "200", "--max_eval_samples", "20"] if small else []
    try:
        code = hfgen_main(["check", *map(str, argv), *caps])
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err


def test_check_reports_the_data_and_rendered_examples(tiny_lm, capsys):
    code, out, _ = check(capsys, SFT_FULL, "--model_name_or_path", tiny_lm)
    assert code == 0
    assert "200 of 200 rows (messages)" in out and out.count("[[") >= 3
    assert "fully masked after truncation (max_length=128): 0.0%" in out and "EOS inside the labels: 200 of 200" in out


def test_check_reads_the_data_and_renders_the_rows_once(tiny_lm, capsys, monkeypatch):
    """The recipe's check loads the data and renders the checked rows; the report prints from that one pass (it read
    and rendered them all again, ~38% of `hfgen check`)."""
    import hfgen.check
    import hfgen.data.prepare

    calls = {"load_raw": 0, "check_sft_rendering": 0}

    count_calls(monkeypatch, calls, hfgen.data.prepare, "load_raw")
    count_calls(monkeypatch, calls, hfgen.check, "check_sft_rendering")
    code, out, _ = check(capsys, SFT_FULL, "--model_name_or_path", tiny_lm)
    assert code == 0 and "200 of 200 rows (messages)" in out and "EOS inside the labels: 200 of 200" in out
    assert calls == {"load_raw": 1, "check_sft_rendering": 1}


@pytest.mark.parametrize(
    "change, expected",
    [
        (("max_length", "6"), "fully masked labels after truncation at max_length=6"),
        # every row cut before its EOS: the message blamed the template ("a chat template must end assistant turns")
        (("max_length", "14"), "EOS ('<|end|>') is inside no row's labels: max_length=14 cuts 200 of 200 rows before"),
        (("template", "message['content'] + '<|end|>'", "message['content']"), "EOS ('<|end|>') is inside no row's labels"),
        (("template", "{{ '<|assistant|>\n' }}{%- endif %}", "{{ 'Assistant: ' }}{%- endif %}"), "generation prompt does not begin"),
        (("template", GENERATION_SPAN, GENERATION_SPAN[16:-19]), "assistant_only_loss: true masks the loss by"),
    ],
    ids=["fully-masked", "cut-before-eos", "no-eos-in-labels", "template-mismatch", "no-generation-markers"],
)  # fmt: skip
def test_check_exits_2_naming_the_problem(tiny_lm, tmp_path, capsys, change, expected):
    if change[0] == "max_length":
        argv = ["--model_name_or_path", tiny_lm, "--max_length", change[1]]
    else:
        argv = ["--model_name_or_path", with_template(tiny_lm, tmp_path, *change[1:])]
    code, _, err = check(capsys, SFT_FULL, *argv)
    assert code == 2 and expected in err, err


def test_a_template_without_generation_markers_trains_with_chat_template_path(tiny_lm, tmp_path, capsys):
    # the assistant mask's markers given by a template file, as SFTTrainer reads it (TRL's chat_template_path)
    unmarked = with_template(tiny_lm, tmp_path, GENERATION_SPAN, GENERATION_SPAN[16:-19])
    marked = tmp_path / "marked.jinja"
    marked.write_text(CHAT_TEMPLATE)
    code, _, err = check(capsys, SFT_FULL, "--model_name_or_path", unmarked, "--chat_template_path", marked)
    assert code == 0, err


def without_chat_template(tiny_lm, tmp_path):
    """A copy of the tiny model whose tokenizer has no chat template (a base model's)."""
    from transformers import AutoTokenizer

    base = with_template(tiny_lm, tmp_path, "", "")
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = None
    (base / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer.save_pretrained(base)
    return base


@pytest.mark.parametrize("source", ["jinja", "tokenizer"])
def test_a_base_model_without_chat_template_takes_one_from_chat_template_path(tiny_lm, tmp_path, capsys, source):
    # a base model (GPT-2, a Llama base) on conversations: the template a recipe names is the one checked and used
    base = without_chat_template(tiny_lm, tmp_path)
    code, _, err = check(capsys, SFT_FULL, "--model_name_or_path", base)
    assert code == 2 and "no chat template: set chat_template_path" in err
    template = tmp_path / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    code, out, err = check(capsys, SFT_FULL, "--model_name_or_path", base, "--chat_template_path",
                           template if source == "jinja" else tiny_lm)  # fmt: skip
    assert code == 0, err
    assert "<|assistant|>\\n[[" in out  # rendered with that template, the answer's tokens marked as trained


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_preference_conversations_on_a_model_without_chat_template_exit_2_before_it_loads(tiny_lm, tmp_path, capsys,
                                                                                           stage):  # fmt: skip
    # was TRL's "Cannot use chat template functions" once the model and its reference had loaded
    code, _, err = check(capsys, REPO / f"recipes/tiny/{stage}.yaml", "--model_name_or_path",
                         without_chat_template(tiny_lm, tmp_path))  # fmt: skip
    assert code == 2 and "rows are conversations, but model" in err and "no chat template" in err


def test_ppo_chat_prompts_on_a_policy_without_chat_template_exit_2_before_it_loads(tiny_lm, tmp_path, capsys):
    # PPO found out in tokenize_prompts, after the policy, its reference, the value and reward models had loaded
    base = without_chat_template(tiny_lm, tmp_path)
    extra = ["--reward_model_path", "null", "--reward_functions", "hfgen.data.embedded:oracle_scores"]
    code, _, err = check(capsys, REPO / "recipes/tiny/ppo.yaml", "--model_name_or_path", base, *extra)
    assert code == 2 and "hold chat messages, but the tokenizer of" in err and "no chat template" in err, err
    code, _, err = check(capsys, REPO / "recipes/tiny/ppo.yaml", "--model_name_or_path", tiny_lm, *extra)
    assert code == 0, err


def test_check_says_which_checks_a_pipeline_skips(capsys):
    code, out, _ = check(capsys, REPO / "recipes/tiny/rlhf.yaml", small=False)
    assert code == 0 and "every step's values checked (sft, reward, ppo)" in out


def test_check_samples_rewards_for_ppo(tiny_lm, capsys):
    code, out, _ = check(capsys, REPO / "recipes/tiny/ppo.yaml", "--model_name_or_path", tiny_lm,
                         "--reward_model_path", "null", "--reward_functions", "hfgen.data.embedded:oracle_scores",
                         "--response_length", "8")  # fmt: skip
    assert code == 0 and "reward of 32 sampled responses (4 for each of 8 prompts)" in out
    assert "prompt groups whose rewards are all equal:" in out
    assert "prompt groups whose rewards are all equal: 8 of 8" not in out
    # the sample is drawn at the recipe's top_p (it drew at generate's 0.95): a top-p this small is greedy
    code, out, _ = check(capsys, REPO / "recipes/tiny/ppo.yaml", "--model_name_or_path", tiny_lm,
                         "--reward_model_path", "null", "--reward_functions", "hfgen.data.embedded:oracle_scores",
                         "--response_length", "8", "--top_p", "1e-6")  # fmt: skip
    assert code == 0 and "prompt groups whose rewards are all equal: 8 of 8" in out, out


def test_checks_reward_sample_of_a_prompt_does_not_depend_on_the_prompts_beside_it(tiny_lm):
    # drawn from the recipe's seed and the prompt, as hfgen eval and hfgen generate --seed draw it (it was the global
    # generator in batch order: a prompt's sample changed with the prompts before it)
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from hfgen.check import sampled_responses

    model_args = SimpleNamespace(model_name_or_path=str(tiny_lm))
    config = SimpleNamespace(seed=3, temperature=1.0, top_p=1.0, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)

    def sample(prompts):
        groups = sampled_responses(model_args, config, tokenizer, prompts, 8)
        return [[c.completion_ids for c in group] for group in groups]

    alone = sample(["the cat"])[0]
    assert sample(["the red dog", "the cat"])[1] == alone
    assert len({tuple(ids) for ids in alone}) > 1  # four different draws, not one repeated
    config.seed = 4
    assert sample(["the cat"])[0] != alone  # and the recipe's seed still decides them


def test_check_samples_every_reward_component_for_grpo_and_rloo(tiny_lm, tmp_path, capsys):
    # a GSM8K-style file: the prompt under another name, the reference answer read by the reward function
    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(json.dumps({"question": f"{i}+1=?", "answer": f"#### {i + 1}"}) + "\n" for i in range(40)))
    for stage in ("grpo_arithmetic", "rloo_arithmetic"):
        code, out, _ = check(capsys, REPO / f"recipes/tiny/{stage}.yaml", "--model_name_or_path", tiny_lm,
                             "--dataset_name", data, "--prompt_column", "question", "--reward_functions",
                             "hfgen.data.arithmetic:gsm8k_exact_answer", "hfgen.data.embedded:oracle_scores",
                             "--max_completion_length", "8")  # fmt: skip
        assert code == 0 and "rows (prompt)" in out, stage
        assert "reward of 32 sampled responses (4 for each of 8 prompts)" in out
        assert "components: gsm8k_exact_answer 0.000, oracle_scores" in out  # a random model never answers
        assert "prompt groups whose rewards are all equal (no signal for a group-relative method):" in out


def test_checks_all_equal_groups_follow_multi_objective_aggregation_as_training_does(tiny_lm, tmp_path, capsys):
    # exact answers [0, 1, 0, 1] and a bonus [2, 0, 2, 0] weighted [1, 0.5] total 1.0 each: equal totals, no signal
    # by the default sum, yet normalize_then_sum normalises each before the sum and every group teaches; the check
    # judged the totals whatever the aggregation (review 40 F13)
    rewards = tmp_path / "alternating.py"
    rewards.write_text(
        "def answer(prompts, responses):\n    return [float(i % 2) for i in range(len(responses))]\n"
        "def bonus(prompts, responses):\n    return [2.0 * (1 - i % 2) for i in range(len(responses))]\n"
    )
    common = ["--model_name_or_path", tiny_lm, "--reward_functions", f"{rewards}:answer", f"{rewards}:bonus",
              "--reward_weights", "1.0", "0.5", "--max_completion_length", "4"]  # fmt: skip
    equal = "prompt groups whose rewards are all equal (no signal for a group-relative method)"
    for aggregation, count in (("sum_then_normalize", 8), ("normalize_then_sum", 0)):
        code, out, _ = check(capsys, REPO / "recipes/tiny/grpo_arithmetic.yaml", *common,
                             "--multi_objective_aggregation", aggregation)  # fmt: skip
        assert code == 0 and f"{equal}: {count} of 8" in out, (aggregation, out)


def test_check_leaves_responses_no_reward_function_scored_out_of_the_group_rewards(tiny_lm, tmp_path, capsys):
    # a response every function left unscored (None) is out of GRPO's group baseline (TRL 1.16): the check printed
    # "mean nan" and counted no group as all equal
    never = tmp_path / "never.py"
    never.write_text("def never(prompts, responses):\n    return [None] * len(responses)\n")
    code, out, _ = check(capsys, REPO / "recipes/tiny/grpo_arithmetic.yaml", "--model_name_or_path", tiny_lm,
                         "--reward_functions", f"{never}:never", "--reward_weights", "1.0",
                         "--max_completion_length", "8")  # fmt: skip
    assert (
        code == 0
        and "(4 for each of 8 prompts): 32 scored by no reward function (components: never none scored)" in out
    )
    assert "prompt groups whose rewards are all equal (no signal for a group-relative method): 8 of 8" in out, out


def test_check_reports_the_preference_stages_data(capsys, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    same = {"prompt": "p", "chosen": "same", "rejected": "same"}
    rows = [{"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(39)] + [same]
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    for stage in ("dpo", "kto", "orpo", "simpo"):
        code, out, _ = check(capsys, REPO / f"recipes/tiny/{stage}.yaml", "--dataset_name", pairs)
        assert code == 0 and "rows (preference)" in out and "dropped 1 chosen equal to rejected" in out, stage


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes/tiny").glob("*.yaml")))
def test_check_passes_every_shipped_tiny_recipe(recipe, capsys, tmp_path):
    path, instance = REPO / "recipes/tiny" / recipe, []
    if "instance_data_dir" in yaml.safe_load(path.read_text()):  # what scripts/dreambooth_digits.py writes, no recipe
        from PIL import Image

        (tmp_path / "instance").mkdir()
        Image.new("RGB", (16, 16)).save(tmp_path / "instance/0.png")
        instance = ["--instance_data_dir", tmp_path / "instance"]
    code, out, err = check(capsys, path, *instance, small=False)
    assert code == 0, err
    assert "valid" in out


@pytest.mark.parametrize("recipe", ["ppo", "grpo_arithmetic"])
def test_a_causal_lm_given_as_the_reward_model_exits_2(tiny_lm, capsys, recipe):
    # was a run on the scores of a new, random head (transformers only reported `score.weight` as newly initialised)
    code, _, err = check(capsys, REPO / f"recipes/tiny/{recipe}.yaml", "--model_name_or_path", tiny_lm,
                         "--reward_model_path", tiny_lm)  # fmt: skip
    assert code == 2 and "reward_model_path" in err and "is not a reward model (LlamaForCausalLM)" in err, err


def diffusers_dirs(directory) -> dict:
    """A vae run's dir (a config.json of diffusers: _class_name, no architectures) and a t2i pipeline's
    (model_index.json, no config.json), as their configs describe them: enough for the check."""
    vae, pipeline = directory / "vae", directory / "t2i"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "latent_channels": 4}))
    (vae / "recipe.yaml").write_text("stage: vae\n")
    (vae / "COMPLETE").write_text(json.dumps({"run": "0", "stage": "vae"}))
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return {"vae": (vae, "a diffusers AutoencoderKL (a vae run)"), "t2i": (pipeline, "StableDiffusionPipeline")}


@pytest.mark.parametrize(
    "recipe, key",
    [("dpo", "reward_model_path"), ("kto", "reward_model_path"), ("orpo", "reward_model_path"),
     ("simpo", "reward_model_path"), ("ppo", "reward_model_path"), ("ppo", "value_model_path"),
     ("grpo_arithmetic", "reward_model_path"), ("rloo_arithmetic", "reward_model_path")],
)  # fmt: skip
def test_a_diffusers_dir_given_as_a_reward_or_value_model_exits_2_naming_it(tiny_lm, capsys, tmp_path, recipe, key):
    """A vae run or a t2i pipeline (its config names no transformers architecture) passed the check: DPO-like stages
    trained and saved in full, then exited 2 at the comparison advising to copy tokenizer files into it (probe 44 I2)."""
    reward = []
    if key == "value_model_path":  # (the value model is checked once the reward model is)
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        AutoModelForSequenceClassification.from_pretrained(tiny_lm, num_labels=1).save_pretrained(tmp_path / "rm")
        AutoTokenizer.from_pretrained(tiny_lm).save_pretrained(tmp_path / "rm")
        reward = ["--reward_model_path", tmp_path / "rm"]
    for path, what in diffusers_dirs(tmp_path).values():
        code, _, err = check(capsys, REPO / f"recipes/tiny/{recipe}.yaml", "--model_name_or_path", tiny_lm, *reward,
                             f"--{key}", path, "--output_dir", tmp_path / "out")  # fmt: skip
        assert code == 2 and f"{key} '{path}' is " in err and what in err, err
        assert "not a reward model" in err if key == "reward_model_path" else "not a value model" in err, err
        assert "tokenizer" not in err, err


@pytest.mark.parametrize("recipe", ["dpo", "sft_full", "reward", "grpo_arithmetic"])
def test_a_diffusers_dir_given_as_the_model_to_train_exits_2_at_the_check_naming_it(capsys, tmp_path, recipe):
    """The same dirs as model_name_or_path: DPO's check called the recipe valid, then its tokenizer's load refused the
    dir (review 44 #4)."""
    for path, what in diffusers_dirs(tmp_path).values():
        code, out, err = check(capsys, REPO / f"recipes/tiny/{recipe}.yaml", "--model_name_or_path", path,
                               "--output_dir", tmp_path / "out")  # fmt: skip
        assert code == 2 and f"model_name_or_path '{path}' is " in err and what in err, err
        assert "valid" not in out, out


def test_a_diffusers_dir_loaded_as_a_tokenizer_is_named_not_given_files_to_copy(tmp_path):
    from hfgen.errors import UserError
    from hfgen.models import load_tokenizer

    for path, what in diffusers_dirs(tmp_path).values():
        with pytest.raises(UserError) as error:
            load_tokenizer(str(path))
        assert what in str(error.value) and "copy" not in str(error.value), error.value


def test_reward_pairs_over_max_length_exit_2_at_the_check(tiny_lm, capsys):
    # were found only after the model had loaded (`hfgen check` said the recipe was valid)
    code, _, err = check(
        capsys, REPO / "recipes/tiny/reward.yaml", "--model_name_or_path", tiny_lm, "--max_length", "6"
    )
    assert code == 2 and "pairs are longer than max_length=6 tokens" in err, err


@pytest.mark.parametrize("stage", ["dpo", "kto", "orpo", "simpo"])
def test_preference_prompts_that_fill_max_length_exit_2_at_the_check(tiny_lm, capsys, stage):
    # DPO: a traceback once TRL had dropped every row; KTO: zero steps and COMPLETE; ORPO, SimPO: "diverged"
    code, _, err = check(capsys, REPO / f"recipes/tiny/{stage}.yaml", "--model_name_or_path", tiny_lm,
                         "--max_length", "8")  # fmt: skip
    assert code == 2 and "have a prompt of max_length=8 tokens or more" in err, err


@pytest.mark.parametrize("key, value, message", [("loss_type", "foo", "loss_type must be one of"),
                                                 ("scale_rewards", "maybe", "scale_rewards must be one of")])  # fmt: skip
def test_grpo_keys_trl_checks_mid_run_exit_2_at_the_check(tiny_lm, capsys, key, value, message):
    code, _, err = check(capsys, REPO / "recipes/tiny/grpo_arithmetic.yaml", "--model_name_or_path", tiny_lm,
                         f"--{key}", value)  # fmt: skip
    assert code == 2 and message in err, err


@pytest.mark.parametrize("key, value, message", [
    ("lr_scheduler_type", "reduce_lr_on_plateau", "is not one this loop can step"),
    ("lr_scheduler_type", "bogus", "is not one this loop can step"),
    ("critic_learning_rate", "-0.1", "critic_learning_rate must be >= 0"),
])  # fmt: skip
def test_ppo_keys_that_failed_after_the_models_loaded_exit_2_at_the_check(tiny_lm, capsys, key, value, message):
    code, _, err = check(capsys, REPO / "recipes/tiny/ppo.yaml", "--model_name_or_path", tiny_lm,
                         "--reward_model_path", "null", "--reward_functions", "hfgen.data.embedded:oracle_scores",
                         f"--{key}", value)  # fmt: skip
    assert code == 2 and message in err, err


def test_ppo_takes_chat_prompts_as_grpo_does(tiny_lm, tmp_path, capsys):
    # plain-string prompts went to a chat model untemplated (every response one EOS token); PPO had no chat_prompts
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"write about the horse {i}.\n" for i in range(30)))
    extra = ["--reward_model_path", "null", "--reward_functions", "hfgen.data.embedded:oracle_scores"]
    code, _, err = check(capsys, REPO / "recipes/tiny/ppo.yaml", "--model_name_or_path", tiny_lm, "--dataset_name",
                         prompts, "--chat_prompts", "refuse", *extra)  # fmt: skip
    assert code == 2 and "are plain strings" in err and "chat_prompts: auto" in err, err
    code, _, err = check(capsys, REPO / "recipes/tiny/ppo.yaml", "--model_name_or_path", tiny_lm, "--dataset_name",
                         prompts, *extra)  # fmt: skip
    assert code == 0, err


def test_a_conversation_whose_last_turn_is_cut_trains_and_shows_its_earlier_turns(tiny_lm, tmp_path, capsys):
    # with assistant_only_loss, TRL trains every assistant turn inside max_length; the check and the drop looked at
    # the last one only: rows whose last user turn passes max_length were dropped (all of them: exit 2, "100% of the
    # rows have fully masked labels"), and the check marked only the last turn as trained
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig

    from hfgen.stages.sft import drop_fully_masked

    long_question = "and the dog? " + "tell me more about the dog and the river. " * 6
    rows = [
        {"messages": [{"role": "user", "content": f"describe the red cat {i}."},
                      {"role": "assistant", "content": "the cat is red."},
                      {"role": "user", "content": long_question}, {"role": "assistant", "content": "the dog is sad."}]}
        for i in range(8)
    ]  # fmt: skip
    data = tmp_path / "long_last_turn.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    code, out, err = check(capsys, SFT_FULL, "--model_name_or_path", tiny_lm, "--dataset_name", data,
                           "--max_length", 64)  # fmt: skip
    assert code == 0, err
    assert "fully masked after truncation (max_length=64): 0.0%" in out
    assert "<|assistant|>\\n[[the cat is red.<|end|>]]\\n<|user|>" in out  # the first turn, marked as trained
    args = SFTConfig(
        output_dir=str(tmp_path), assistant_only_loss=True, max_length=64, report_to="none", use_cpu=True, bf16=False
    )
    records = {}
    assert len(drop_fully_masked(Dataset.from_list(rows), AutoTokenizer.from_pretrained(tiny_lm), args, records)) == 8


def test_text_rendered_with_a_chat_template_keeps_one_bos_and_its_held_out_loss_covers_every_turn(tmp_path):
    # text that already starts with the tokenizer's BOS (a rendered Llama 3 conversation) was tokenized with a
    # second BOS in front, unflagged; and the held-out response loss stopped at the first EOS, the user turn's
    from datasets import Dataset
    from tokenizers.processors import TemplateProcessing
    from trl import SFTConfig

    from hfgen.check import check_sft_rendering
    from hfgen.models import build_embedded_tokenizer
    from hfgen.stages.sft import tokenize_response, without_doubled_bos

    tokenizer = build_embedded_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "<|begin_of_text|>"})
    bos = tokenizer.bos_token_id
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", bos)]
    )
    turns = [{"role": "user", "content": "describe the cat."}, {"role": "assistant", "content": "the cat is red."}]
    text = "<|begin_of_text|>" + tokenizer.apply_chat_template(turns, tokenize=False)
    rows, note = without_doubled_bos(Dataset.from_list([{"text": "the dog"}, {"text": text}]), tokenizer)
    assert "1 of 2 rows of the text column (row 1 first) already start with the tokenizer's BOS" in note
    ids = tokenizer(rows[1]["text"])["input_ids"]
    assert ids.count(bos) == 1 and ids[0] == bos and rows[0]["text"] == "the dog"
    assert tokenizer.eos_token in rows[1]["text"][:-10]  # the user turn ends with EOS too
    held_out, start = tokenize_response(tokenizer, "", rows[1]["text"], None)
    assert (
        held_out[: len(ids)] == ids and start == 1
    )  # every turn scored (then the EOS TRL appends), not the first only
    args = SFTConfig(output_dir=str(tmp_path), max_length=128, report_to="none", use_cpu=True, bf16=False)
    lines, fatal = check_sft_rendering(Dataset.from_list([{"text": text}] * 4), tokenizer, args)
    assert not fatal and lines[0].startswith("note: 4 of 4 rows") and "[[<|begin_of_text|><|user|>" in lines[2]
    # PPO's string prompts (sent as they are when already rendered with the template) keep one BOS too
    from hfgen.rl.models import prompt_ids

    rendered = "<|begin_of_text|>" + tokenizer.apply_chat_template(
        turns[:1], tokenize=False, add_generation_prompt=True
    )
    (ids,) = prompt_ids(tokenizer, [rendered])
    assert ids.count(bos) == 1 and ids[0] == bos and prompt_ids(tokenizer, ["the dog"])[0][0] == bos


NO_SYSTEM_TEMPLATE = (  # Gemma-it's refusal, on hfgen's template
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
)


@pytest.mark.parametrize("stage", ["sft", "dpo", "ppo"])
def test_a_conversation_the_chat_template_refuses_exits_2_naming_the_row(tiny_lm, tmp_path, capsys, stage):
    # Gemma's template raises "System role not supported" on a system turn: a raw jinja2 TemplateError traceback
    # (exit 1) from the check's rendering (sft: tokenize_response, dpo: prompt_length_problems). The row is the
    # file's (it was named by its place in the shuffled training split), past the first 1000 rows too (those passed
    # the check, and the run stopped naming no row)
    from transformers import AutoTokenizer

    template = AutoTokenizer.from_pretrained(tiny_lm).chat_template
    model = with_template(tiny_lm, tmp_path, template, NO_SYSTEM_TEMPLATE + template)
    user = [{"role": "user", "content": "describe the red cat."}]
    answer, other = [{"role": "assistant", "content": "the cat is red."}], [{"role": "assistant", "content": "no."}]

    def row(prompt):
        if stage == "sft":
            return {"messages": prompt + answer}
        return {"prompt": prompt} if stage == "ppo" else {"prompt": prompt, "chosen": answer, "rejected": other}

    rows = [row(user)] * 1200
    rows[1099] = row([{"role": "system", "content": "be brief."}, *user])
    data = tmp_path / "system.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = SFT_FULL if stage == "sft" else REPO / f"recipes/tiny/{stage}.yaml"
    code, _, err = check(capsys, recipe, "--model_name_or_path", model, "--dataset_name", data, small=False)
    assert code == 2, err
    assert f"the chat template refuses row 1100 (counted from 1) of dataset '{data}'" in err, err
    assert "'System role not supported'" in err and "merge a system turn into the first user turn" in err


def test_a_template_refusal_past_the_checked_rows_exits_2_without_a_traceback(tiny_lm, capsys):
    from jinja2.exceptions import TemplateSyntaxError
    from transformers import AutoTokenizer

    from hfgen.errors import exit_on_user_error

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    tokenizer.chat_template = NO_SYSTEM_TEMPLATE
    with pytest.raises(SystemExit) as exit_info, exit_on_user_error():
        tokenizer.apply_chat_template([{"role": "system", "content": "x"}], tokenize=False)
    assert exit_info.value.code == 2 and "refuses a row of the data: 'System role not supported'" in (
        capsys.readouterr().err
    )
    tokenizer.chat_template = "{% if %}"  # a broken template is no data problem: it keeps its traceback
    with pytest.raises(TemplateSyntaxError), exit_on_user_error():
        tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)


def test_a_template_ending_turns_with_another_special_token_than_eos_is_told_to_set_eos_token(
    tiny_lm, tmp_path, capsys
):
    # Gemma-it ships eos_token <eos> and ends turns with <end_of_turn>: the refusal did not say the fix
    ends = with_template(tiny_lm, tmp_path, "message['content'] + '<|end|>'", "message['content'] + '<|system|>'")
    code, _, err = check(capsys, SFT_FULL, "--model_name_or_path", ends)
    assert code == 2 and "EOS ('<|end|>') is inside no row's labels" in err
    assert "the chat template ends assistant turns with '<|system|>'" in err and "set eos_token: '<|system|>'" in err
    code, _, err = check(capsys, SFT_FULL, "--model_name_or_path", ends, "--eos_token", "<|system|>")
    assert code == 0, err  # the suggested key does it


def test_check_reports_the_mixture_draws_of_the_recipes_seed(tiny_lm, tmp_path, capsys):
    """A mixture's draws depend on the seed: check reports those the run trains on (it drew them for seed 0)."""
    import yaml

    from hfgen.data.prepare import load_for_stage, summary_lines
    from hfgen.recipe import load_recipe

    sets = []
    for name in "AB":
        path = tmp_path / f"set{name}.jsonl"
        rows = [{"prompt": f"q {name}{i}", "completion": f" a {name}{i}"} for i in range(30)]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        sets.append({"name": str(path), "weight": 0.5})
    recipe = {**yaml.safe_load(SFT_FULL.read_text()), "model_name_or_path": str(tiny_lm), "seed": 42}
    del recipe["dataset_name"]
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump({**recipe, "datasets": sets}))
    _, _, records = load_for_stage(load_recipe(tmp_path / "mix.yaml").configs[1], "sft", seed=42)
    _, _, seed_0 = load_for_stage(load_recipe(tmp_path / "mix.yaml").configs[1], "sft", seed=0)
    assert summary_lines(records) != summary_lines(seed_0)  # (else this mixture would not tell them apart)
    code, out, _ = check(capsys, tmp_path / "mix.yaml", small=False)
    assert code == 0 and "\n".join(summary_lines(records)) in out


def test_check_skips_only_the_model_checks_of_a_model_a_recipe_beside_it_writes(tmp_path, capsys):
    # any missing path under outputs/ was taken for an earlier step's: a typo passed (exit 0) with every other input
    # check skipped too (bitsandbytes not installed, activation offloading on a CPU), where `hfgen train` exits 2
    sft_lora, pretrain = (
        yaml.safe_load((REPO / f"recipes/tiny/{n}.yaml").read_text()) for n in ("sft_lora", "pretrain")
    )
    made = tmp_path / "outputs/base"
    (tmp_path / "pretrain.yaml").write_text(yaml.safe_dump({**pretrain, "output_dir": str(made)}))
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(yaml.safe_dump({**sft_lora, "model_name_or_path": str(made), "output_dir": str(tmp_path / "o")}))
    small = ["--max_train_samples", "20", "--max_eval_samples", "5"]
    result = run_hfgen_here("check", recipe, *small)
    assert result.returncode == 0, result.stderr
    assert (
        f"model-dependent checks skipped, since earlier steps make model_name_or_path ({made}, written by pretrain.yaml)"
        in result.stdout
    )
    typo = tmp_path / "outputs/bsae"
    result = run_hfgen_here("check", recipe, "--model_name_or_path", typo, *small)
    assert result.returncode == 2 and f"model_name_or_path '{typo}' does not exist" in result.stderr, result.stderr
    result = run_hfgen_here("check", recipe, "--optim", "adamw_bnb_8bit", *small)  # pending, the rest still checked
    assert result.returncode == 2 and "adamw_bnb_8bit needs bitsandbytes" in result.stderr, result.stderr


@pytest.mark.parametrize("stage", ["orpo", "ppo"])
def test_function_definitions_a_stage_does_not_render_are_refused(tmp_path, capsys, stage):
    # a `tools` column reaches the trainers that render it (sft, dpo, kto); ORPO's trainer and PPO's rollout render
    # none, and the model trained on tool calls (or was prompted) without the functions declared
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    user = [{"role": "user", "content": "weather in paris?"}]
    row = {"prompt": user, "tools": tools}
    if stage == "orpo":
        row |= {
            "chosen": [{"role": "assistant", "content": "sunny."}],
            "rejected": [{"role": "assistant", "content": "no."}],
        }
    data = tmp_path / "tools.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for _ in range(12)))
    code, _, err = check(capsys, REPO / f"recipes/tiny/{stage}.yaml", "--dataset_name", data)
    assert code == 2, err
    assert (
        f"dataset '{data}' has a 'tools' column (function definitions for the chat template), which the {stage}" in err
    )


def test_a_template_that_renders_no_tool_calls_is_refused_naming_the_row(tiny_lm, tmp_path, capsys):
    # a template without tool support (Phi-3's; hfgen's embedded one) renders an assistant turn that only calls a
    # tool as an empty answer: trained, without a word
    turns = [
        {"role": "user", "content": "weather in paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "paris"}}}]},
        {"role": "tool", "name": "get_weather", "content": "sunny"},
        {"role": "assistant", "content": "it is sunny."},
    ]  # fmt: skip
    data = tmp_path / "calls.jsonl"
    data.write_text("".join(json.dumps({"messages": turns}) + "\n" for _ in range(12)))
    code, _, err = check(capsys, SFT_FULL, "--model_name_or_path", tiny_lm, "--dataset_name", data)
    assert code == 2, err
    assert "the chat template renders no tool call ('get_weather') of row" in err and f"of dataset '{data}'" in err


def test_a_template_that_refuses_a_rows_content_is_found_in_the_checked_rows():
    # the whole-file check rendered one row per sequence of roles (a16e5e5): a refusal that depends on the turns'
    # content (Llama 3.1's template takes one tool call a turn) past a row of the same roles passed the check, and
    # the run stopped on jinja's error (review 40 F4)
    from datasets import Dataset

    from hfgen.data.rendering import template_refusals
    from hfgen.models import load_tokenizer

    tokenizer = load_tokenizer("embedded:tiny-bpe")
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m.tool_calls and m.tool_calls | length > 1 %}"
        "{{ raise_exception('This model only supports single tool-calls at once!') }}{% endif %}"
        "{{ m.role }}: {{ m.content }}{% for c in m.tool_calls or [] %}{{ c.function.name }}{% endfor %}\n{% endfor %}"
    )
    call = {"type": "function", "function": {"name": "weather", "arguments": {}}}

    def conversation(calls):
        return [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [call] * calls}]

    rows = Dataset.from_list(
        [{"messages": conversation(1)}, {"messages": conversation(1)}, {"messages": conversation(2)}]
    )
    refused = template_refusals(tokenizer, rows, "dataset 'x'", [4, 7, 9])
    assert refused and "refuses row 9 (counted from 1) of dataset 'x'" in refused[0], refused


def test_a_full_datasets_cache_is_named_with_its_variable_and_its_half_written_file_removed(
    tiny_lm, tmp_path, capsys, full_datasets_cache
):
    # a full HF_DATASETS_CACHE said "writing 'its output' failed ... nothing was written under that name", naming
    # neither the cache nor the variable, and left datasets' half-written cache file (probe 41 C3)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"q {i}", "completion": f"a {i}"}) + "\n" for i in range(64)))
    cache, made = full_datasets_cache
    code, _, err = check(capsys, SFT_FULL, "--model_name_or_path", tiny_lm, "--dataset_name", rows)
    assert code == 2 and made, err
    assert f"datasets could not write its cache under '{cache}' (HF_DATASETS_CACHE; No space left" in err
    assert "its output" not in err
    assert not any(path.is_symlink() or path.exists() for path in made)  # datasets' half-written file is gone


def test_a_read_only_datasets_cache_is_named_with_its_variable_not_blamed_on_the_data(
    tiny_lm, tmp_path, capsys, monkeypatch, read_only_disk
):
    # HF_DATASETS_CACHE on a read-only mount (or, none set, a read-only HOME whose ~/.cache it would be made in) said
    # "dataset_name '<file>' could not be loaded: [Errno 30] Read-only file system: '<cache>'", naming neither the
    # cache nor the variable, as a full cache does (probe 42 C9)
    import datasets

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"q {i}", "completion": f"a {i}"}) + "\n" for i in range(64)))
    for cache in (read_only_disk / "datasets", read_only_disk / "home/.cache/huggingface/datasets"):
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
        code, _, err = check(capsys, SFT_FULL, "--model_name_or_path", tiny_lm, "--dataset_name", rows)
        assert code == 2 and "Traceback" not in err, err
        assert f"datasets could not write its cache under '{cache}' (HF_DATASETS_CACHE; Read-only file system" in err
        assert "could not be loaded" not in err and "Set HF_DATASETS_CACHE to a folder this user can write to" in err


def test_check_prints_non_ascii_examples_under_a_non_utf8_locale(tiny_lm, tmp_path):
    # the rendered examples' print ended `hfgen check` (and generate's, PPO's sample prints) in a UnicodeEncodeError
    # under a locale whose encoding is not UTF-8 (probe 42 C2): they are printed with escapes
    rows = tmp_path / "rows.jsonl"
    row = {"prompt": "décris le chat —", "completion": " il est très doux 猫"}
    rows.write_text("".join(json.dumps(row) + "\n" for _ in range(40)))
    result = run_hfgen("check", SFT_FULL, "--model_name_or_path", tiny_lm, "--dataset_name", rows, env=ASCII_LOCALE)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "d\\xe9cris le chat \\u2014" in result.stdout, result.stdout[-2000:]


def long_prompt_rows(count: int, answer_words: int = 6) -> list[dict]:
    """Prompt/completion rows whose ~40-word prompts fill a max_length of 32 tokens, with short answers."""
    words = "red cat dog river tree house happy sad big small".split()
    return [
        {"prompt": "question " + " ".join(words[(i + j) % 10] for j in range(40)) + " ?",
         "completion": " answer " + " ".join(words[(i * 3 + j) % 10] for j in range(answer_words)) + " end"}
        for i in range(count)
    ]  # fmt: skip


def trl_prepared(tiny_lm, tmp_path, rows, **config):
    """The rows as SFTTrainer prepares them for training (tokenized, labelled, cut), with hfgen's tokenizer."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False, **config)
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    return trainer.train_dataset, tokenizer, args


def test_truncation_mode_keep_end_is_judged_on_the_end_that_trains(tiny_lm, tmp_path, capsys):
    # under truncation_mode: keep_end SFTTrainer keeps each row's last max_length tokens; the check, the drop of
    # fully masked rows and the held-out loss cut prompt/completion rows from the start (sft.tokenize_response):
    # rows whose prompt fills max_length were refused ("100% of the rows have fully masked labels") though their
    # answers train, and the held-out loss scored tokens training never saw
    from datasets import Dataset

    rows = long_prompt_rows(8) + long_prompt_rows(4, answer_words=40)  # long prompts; long answers too
    data = tmp_path / "long_prompts.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    code, out, err = check(capsys, SFT_FULL, "--model_name_or_path", tiny_lm, "--dataset_name", data,
                           "--max_length", 32, "--truncation_mode", "keep_end", "--assistant_only_loss", "false")  # fmt: skip
    assert code == 0, err
    assert (
        "fully masked after truncation (max_length=32): 0.0%" in out and "EOS inside the labels: 11 of 11" in out
    )  # 1 of 12 held out

    from hfgen.stages.sft import drop_fully_masked, row_cut, tokenize_response

    prepared, tokenizer, args = trl_prepared(tiny_lm, tmp_path, rows, max_length=32, truncation_mode="keep_end")
    assert len(prepared) == len(rows)
    max_length, keep_end = row_cut(args)
    assert (max_length, keep_end) == (32, True)
    for row, trained in zip(rows, prepared):
        ids, start = tokenize_response(tokenizer, row["prompt"], row["completion"], max_length, keep_end=keep_end)
        assert ids == trained["input_ids"]  # the tokens SFTTrainer trains on, its labels from `start` on
        assert [i for i, label in enumerate(trained["labels"]) if label != -100 and i] == list(range(start, len(ids)))
    records = {}
    assert len(drop_fully_masked(Dataset.from_list(rows), tokenizer, args, records)) == len(rows)


def test_truncation_mode_keep_end_with_packing_exits_2_as_the_packer_cuts_rows_from_their_start(
    tiny_lm, tmp_path, capsys
):
    # TRL skips its truncation when packing, and its packer (pack_dataset's bfd) keeps each row's first max_length
    # tokens whatever truncation_mode says; hfgen's check and drop cut them from the end: conversations with a long
    # system prompt trained no token and answers were cut before their EOS, while the check reported 0% fully masked
    from trl import SFTConfig

    data = tmp_path / "long_prompts.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in long_prompt_rows(12)))
    code, _, err = check(capsys, SFT_FULL, "--model_name_or_path", tiny_lm, "--dataset_name", data, "--max_length", 32,
                         "--packing", "true", "--truncation_mode", "keep_end", "--assistant_only_loss", "false")  # fmt: skip
    assert code == 2 and "truncation_mode: keep_end with packing: true" in err, err
    assert "rows are longer than max_length=32" in err, err
    # rows that fit are cut by neither: the combination trains what it says (it was refused whatever the rows, review
    # 42 #1)
    code, _, err = check(capsys, SFT_FULL, "--model_name_or_path", tiny_lm, "--max_length", 1024, "--packing", "true",
                         "--truncation_mode", "keep_end")  # fmt: skip
    assert code == 0, err

    from hfgen.stages.sft import row_cut

    args = SFTConfig(output_dir=str(tmp_path), max_length=64, packing=True, report_to="none", use_cpu=True)
    assert row_cut(args) == (64, False)  # what the check and the drop cut with: the packer's cut


def test_packing_strategies_that_cut_no_row_drop_none_for_its_length(tiny_lm, tmp_path, capsys):
    # packing_strategy bfd_split packs a long row's overflow as further documents and wrapped cuts the stream of
    # rows into max_length rows: TRL cuts no row, yet hfgen dropped the rows whose prompt fills max_length ("no
    # trained token within max_length") and refused the run when they were most ("raise max_length")
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig

    rows = long_prompt_rows(12)
    data = tmp_path / "long_prompts.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    code, out, err = check(capsys, SFT_FULL, "--model_name_or_path", tiny_lm, "--dataset_name", data,
                           "--max_length", 32, "--packing", "true", "--packing_strategy", "bfd_split",
                           "--assistant_only_loss", "false")  # fmt: skip
    assert code == 0, err
    assert "labels fully masked (no row is cut at max_length): 0.0%" in out and "EOS inside the labels: 11 of 11" in out

    from hfgen.stages.sft import drop_fully_masked

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    for strategy in ("bfd_split", "wrapped"):
        args = SFTConfig(output_dir=str(tmp_path), max_length=32, packing=True, packing_strategy=strategy,
                         report_to="none", use_cpu=True, bf16=False)  # fmt: skip
        records = {}
        assert len(drop_fully_masked(Dataset.from_list(rows), tokenizer, args, records)) == len(rows), strategy
        assert records == {}, records  # nothing counted as dropped


def test_the_check_cuts_rows_at_the_learned_positions_training_lowers_max_length_to(tmp_path, capsys):
    # on GPT-2 (256 learned positions) the check judged the rows at the recipe's max_length (1024: 0% cut) while
    # training lowers it to 256 first, then refused the run after the model loaded, saying "raise max_length"
    from tiny_models import save_tiny_causal_lm

    gpt2 = save_tiny_causal_lm(tmp_path / "gpt2", "gpt2")
    rows = [{"prompt": "question " + " ".join(["the red cat sat by the river"] * 50) + f" {i} ?",
             "completion": " answer the cat is red end"} for i in range(12)]  # fmt: skip
    data = tmp_path / "long_prompts.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    code, _, err = check(capsys, SFT_FULL, "--model_name_or_path", gpt2, "--dataset_name", data,
                         "--max_length", 1024, "--assistant_only_loss", "false")  # fmt: skip
    assert code == 2 and "fully masked labels after truncation at max_length=256" in err, err
    assert "max_length is the 256 positions gpt2 models learn" in err and "raise max_length" not in err
