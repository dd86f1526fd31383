"""Build and load tokenizers and language models: hub ids, local dirs, embedded tiny defaults, LoRA adapter dirs.

Model arguments shared by the language stages live here too (`ModelArguments`), so every stage names
models the same way.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError

from hfgen.errors import WEIGHTS_REFUSED, UserError, weights_refused
from hfgen.hub_cache import cached_snapshot

EMBEDDED_TOKENIZER = "embedded:tiny-bpe"
EMBEDDED_VOCAB_SIZE = 512
ARITHMETIC_TOKENIZER = "embedded:arithmetic-bpe"  # digits one token each, for the embedded arithmetic task
ARITHMETIC_VOCAB_SIZE = 288  # the 256 bytes, the special tokens and a few words
PAD, EOS = "<|pad|>", "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# `{% generation %}` marks assistant text, so TRL's `assistant_only_loss` can mask everything else.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}{{ '\n' }}"
    "{%- else %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|assistant|>\n' }}{%- endif %}"
)


@dataclass
class ModelArguments:
    """Which model and tokenizer a language stage starts from."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Pretrained model: hub id or local dir (an earlier hfgen run's output_dir works)."},
    )
    config_name: str | None = field(
        default=None,
        metadata={
            "help": "Train from scratch from this config: a JSON file (e.g. recipes/tiny/llama_tiny.json), dir or hub id."
        },
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": f"Tokenizer: hub id, local dir, or '{EMBEDDED_TOKENIZER}' / '{ARITHMETIC_TOKENIZER}' (trained here on the embedded corpus / arithmetic task). Defaults to the model's."
        },
    )
    dtype: str = field(default="auto", metadata={"help": "Weights dtype: auto, float32, bfloat16, float16."})
    attn_implementation: str | None = field(default=None, metadata={"help": "sdpa, eager, flash_attention_2, ..."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom model code from the hub (off by default)."}
    )


# ---- path checks (used by the stages' check() before heavy work) ------------------------------------


def looks_local(name: str) -> bool:
    """A path rather than a hub id: starts with . / ~, or has more than one '/', or exists."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).exists()


def relative_to_cwd(name: str) -> str:
    """For a message about a missing path: where a relative one was looked for. A recipe's paths are read from the
    directory hfgen runs in, not from the recipe file's folder (`cd recipes/tiny && hfgen check pretrain.yaml` did
    not find `recipes/tiny/llama_tiny.json`, with no word of where it looked)."""
    if Path(name).expanduser().is_absolute():
        return ""
    return f" (relative to the working directory {Path.cwd()}: recipe paths are read from there, not from the recipe's folder)"


IMAGE_STAGES = ("vae", "t2i", "t2i_flow")
# An image stage's checkpoint is accelerate's save_state alone: diffusers' training scripts save a unet/ folder or a
# LoRA file beside it, which users load from an earlier checkpoint; hfgen's hold no model that diffusers or hfgen load
IMAGE_CHECKPOINT_ADVICE = (
    "an image stage's checkpoint holds only that state (no pipeline, unet/ folder or LoRA file, unlike those of "
    "diffusers' training scripts); use the finished run's dir, or for the model of an earlier step train a run of "
    "that many steps (max_train_steps)"
)


def recorded_stage(recipe: Path) -> str | None:
    """The stage a run's recipe.yaml names, or None (no such file, or one that names none)."""
    import yaml

    try:
        stage = yaml.safe_load(recipe.read_text(encoding="utf-8")).get("stage")
    except (OSError, ValueError, AttributeError, yaml.YAMLError):  # (a recipe is a mapping; anything else tells none)
        return None
    return stage if isinstance(stage, str) else None


def checkpoint_stage(path: Path) -> str | None:
    """The stage of the run a training checkpoint belongs to (the copy of its recipe it holds, else its run's), or
    None."""
    return recorded_stage(path / "recipe.yaml" if (path / "recipe.yaml").is_file() else path.parent / "recipe.yaml")


def not_a_model_dir(path: Path) -> str | None:
    """What an hfgen dir that holds no loadable model is (a pipeline's records, a run killed before it finished, a
    training checkpoint), or a diffusers LoRA that names no base, in words that say where the model is or what it
    needs; None for any other dir."""
    from hfgen import tracking

    recipe = path / "recipe.yaml"
    if recipe.is_file() and "stage: rlhf" in recipe.read_text(encoding="utf-8"):
        steps = tracking.read_json(path / "eval.json", {})
        policy = next((v for k, v in steps.items() if k.startswith("output_dir/") and k != "output_dir/sft" and
                       k != "output_dir/reward" and k != "output_dir/prerequisite"), None)  # fmt: skip
        return "is an rlhf pipeline dir (records, no model)" + (f"; its final policy is '{policy}'" if policy else "")
    if problem := sharded_save_problem(path):
        return problem
    from hfgen.diffusion.components import diffusers_lora_problem

    if problem := diffusers_lora_problem(path):
        return problem
    loadable = ("config.json", "adapter_config.json", "model_index.json")  # a Trainer's checkpoints hold a model
    # A checkpoint holds a copy of its run's recipe.yaml and never a COMPLETE marker: judged as a checkpoint (its
    # hfgen_state.json, written last, marks it complete), not as an unfinished run
    if tracking.is_complete_checkpoint(path) or tracking.is_checkpoint_dir(path):
        if not tracking.is_complete_checkpoint(path):
            return ("is an incomplete training checkpoint (its save was interrupted, no hfgen_state.json): use a "
                    "complete checkpoint of the run, or the finished run's dir")  # fmt: skip
        if not any((path / name).is_file() for name in loadable):
            return "is a training checkpoint (the state a run resumes from), not a model: " + (
                IMAGE_CHECKPOINT_ADVICE if checkpoint_stage(path) in IMAGE_STAGES else "use the finished run's dir"
            )
        return None
    if recipe.is_file() and not (path / "COMPLETE").exists():
        checkpoints = sorted(path.glob("checkpoint-*"), key=lambda c: int(c.name.rpartition("-")[2] or 0))
        newest = f"; its newest checkpoint is '{checkpoints[-1]}'" if checkpoints else ""
        return (
            f"is an unfinished hfgen run (no COMPLETE marker){newest}: rerun the stage that writes it (an interrupted "
            "run continues from its newest complete checkpoint)"
        )
    return None


# The files `from_pretrained` loads a model's (or a peft adapter's) weights from
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def unloadable_model_problem(path: Path) -> str | None:
    """What a dir a stage saved its model into lacks for `from_pretrained` (a transformers model: config.json and its
    weights; a peft adapter: adapter_config.json and its weights), in words; None when they are there (the weights
    are not read: `damaged_weights`)."""
    for config, weights in (("adapter_config.json", ADAPTER_WEIGHT_FILES), ("config.json", WEIGHT_FILES)):
        if (path / config).is_file():
            if any((path / name).is_file() for name in weights):
                return None
            return f"holds {config} but no weights ({' or '.join(weights)})"
    return "holds neither config.json nor adapter_config.json"


def sharded_save_problem(path: Path) -> str | None:
    """A dir that holds DeepSpeed's ZeRO-3 shards (global_step*/) instead of model weights, in words that say how to
    get the weights out: what the Trainer writes under ZeRO-3 when it may not gather the weights (launched without
    zero3_save_16bit_model: an older hfgen, or another tool). None for a dir with weights, or without such shards."""
    if any((path / name).is_file() for name in WEIGHT_FILES + ADAPTER_WEIGHT_FILES):
        return None  # (a checkpoint holds the engine's shards for a resume beside the weights)
    if not any(path.glob("global_step*/")):
        return None
    return (
        "holds DeepSpeed ZeRO-3 shards (global_step*/) and no model weights: a ZeRO-3 save without "
        "stage3_gather_16bit_weights_on_model_save (accelerate's zero3_save_16bit_model). Recover the weights with "
        f"`python {path / 'zero_to_fp32.py'} {path} OUTPUT_DIR --safe_serialization` and copy config.json and the "
        "tokenizer files beside them, or train again with this hfgen, which saves whole models under ZeRO-3"
    )


def check_model_source(key: str, name: str | None, hint: str = "", trust_remote_code: bool | None = None) -> list[str]:
    """Problems with a model path/hub id, for a recipe's `check()`; with `trust_remote_code` given, also a model
    that needs its own code (`custom_code_problem`)."""
    if not name or name.startswith("embedded:"):
        return []
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            return [f"{key} '{name}' is a file; give a model dir or hub id"]
        if problem := not_a_model_dir(path):
            return [f"{key} '{name}' {problem}"]
        if not any(
            (path / f).exists()
            for f in ("config.json", "adapter_config.json", "model_index.json", "tokenizer_config.json")
        ):
            return [f"{key} '{name}' is a directory without a config.json or adapter_config.json"]
        if problem := damaged_weights(path):
            return [f"{key} '{name}': {problem}"]
        if problems := adapter_base_problems(path):
            return [f"{key} '{name}': {problems[0]}"]
        config = path / "config.json"
    elif looks_local(name):
        return [f"{key} '{name}' does not exist{relative_to_cwd(name)}{'; ' + hint if hint else ''}"]
    else:
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        # a name with a space or a '$' is no hub id, and the hub's lookup raises on it: the user meant a path
        try:
            validate_repo_id(name)
        except HFValidationError:
            unexpanded = "; $VARIABLES are not expanded in a recipe" if "$" in name else ""
            return [
                f"{key} '{name}' does not exist{relative_to_cwd(name)} and is not a hub id (org/name){unexpanded}"
                f"{'; ' + hint if hint else ''}"
            ]
        if problem := hub_dir_problem(key, name):
            return [problem]
        config = try_to_load_from_cache(name, "config.json")
        if problem := damaged_weights(name):  # a cached snapshot an interrupted `hf download` left without a shard
            return [f"{key} '{name}': {problem}"]
        if problem := uncached_hub_problem(key, name):
            return [problem]
    if trust_remote_code is False and isinstance(config, (str, Path)):
        return custom_code_problem(key, name, Path(config))
    return []


def uncached_hub_problem(key: str, name: str) -> str | None:
    """A hub id (`name`, validated) that offline (HF_HUB_OFFLINE) the Hugging Face cache does not hold: no model's,
    tokenizer's or diffusers pipeline's repo (its configs in subfolders, model_index.json on top) of that id. None
    online, or for one it holds."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.constants import HF_HUB_OFFLINE

    cached = ("config.json", "tokenizer_config.json", "model_index.json")
    if not HF_HUB_OFFLINE or any(isinstance(try_to_load_from_cache(name, file), str) for file in cached):
        return None
    # (`outputs/sft` is a hub id's shape too: where the folder was looked for is said as for any relative path)
    return (
        f"{key} '{name}' is neither a local path{relative_to_cwd(name)} nor in the Hugging Face cache, and "
        "HF_HUB_OFFLINE is set"
    )


def hub_dir_problem(key: str, name: str, pipelines: bool = False) -> str | None:
    """A hub id whose cached snapshot is a LoRA adapter (adapter_config.json, no config.json: `hf download` of a
    published adapter), or with `pipelines` a diffusers pipeline (model_index.json: generate and eval tell one by its
    dir), said with the dir to give instead: hfgen reads an adapter's base and the pair it trained on, and a
    pipeline's kind, from the dir, and transformers, given the id, looked for the repo's config.json and blamed the
    connection. None for anything else."""
    snapshot = cached_snapshot(name)
    if snapshot is None:
        return None
    if (snapshot / "adapter_config.json").is_file() and not (snapshot / "config.json").is_file():
        what = "a LoRA adapter"
    elif pipelines and (snapshot / "model_index.json").is_file():
        what = "a diffusers pipeline"
    else:
        return None
    return (
        f"{key} '{name}' is {what} on the hub, which hfgen loads from a dir: give its cached snapshot dir "
        f"'{snapshot}' (what `hf download {name}` prints)"
    )


def damaged_weights(path: str | Path) -> str | None:
    """The safetensors weights of a local model dir, or of the cached snapshot a hub id resolves to
    (`hub_cache.cached_snapshot`), that an interrupted download or copy left incomplete, said without loading them: a
    shard its index (`*.safetensors.index.json`) names but the dir lacks, or a file whose header does not cover it
    (cut short). None for a whole dir, a hub id not cached, or other weights; for a hub id online too, where the load
    fetches what an interrupted download left out."""
    from huggingface_hub.constants import HF_HUB_OFFLINE

    fetch = "fetch the model again"
    if not Path(path).expanduser().is_dir():
        if not HF_HUB_OFFLINE or (snapshot := cached_snapshot(str(path))) is None:
            return None
        # (offline, transformers' own message pointed at the hub's web page)
        fetch = f"fetch the model again (`hf download {path}`; its cached snapshot is {snapshot})"
        path = snapshot
    path = Path(path).expanduser()
    from safetensors import safe_open

    for index in sorted(path.glob("*.safetensors.index.json")):
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values()))
        except (OSError, ValueError, AttributeError):
            return f"its shard index {index.name} is not valid JSON with a weight_map"
        if missing := [shard for shard in shards if not (path / shard).is_file()]:
            return (
                f"{', '.join(missing)}, named by {index.name}, is missing (an interrupted download or copy?); {fetch}"
            )
    for weights in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(weights, "pt"):  # reads the header only
                pass
        except (SafetensorError, OSError) as error:
            return f"its weights file {weights.name} is damaged ({error}); {fetch}"
    return None


def custom_code_problem(key: str, name: str, config_file: Path) -> list[str]:
    """A model whose config maps it to its own code (`auto_map`) for a model type transformers does not know: it
    loads only with `trust_remote_code: true`, which runs that code (transformers would stop with a traceback).
    A known model type with an `auto_map` loads with transformers' own code, as transformers does."""
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    from transformers import CONFIG_MAPPING

    if not config.get("auto_map") or config.get("model_type") in CONFIG_MAPPING:
        return []
    classes = ", ".join(sorted(set(config["auto_map"].values()) if isinstance(config["auto_map"], dict) else []))
    return [
        f"{key} '{name}' is a {config.get('model_type')!r} model that brings its own code ({classes}), which "
        "transformers runs only with trust_remote_code: true; set it in the recipe if you trust that code"
    ]


def not_a_generator(path: str | Path, label: str) -> list[str]:
    """A model dir that generates nothing (a reward model, an autoencoder or another diffusers component), as a
    problem naming what it is and where its own figures are: loaded as a causal LM it would sample from a random
    head. A LoRA adapter of task SEQ_CLS (a reward model's, or PPO's value model) is one too: loaded as a causal
    LM over its base it generated text while its score head was dropped."""
    adapter = Path(path) / "adapter_config.json"
    try:
        task = json.loads(adapter.read_text(encoding="utf-8")).get("task_type") if adapter.is_file() else None
    except (OSError, ValueError):
        task = None
    if task == "SEQ_CLS":
        return [
            f"{label} '{path}' is a LoRA adapter of a sequence classifier (task_type SEQ_CLS: a reward model, or PPO's "
            "value model): it scores responses and generates none (`hfgen eval POLICY --reward_model` judges with a "
            "reward model); give a policy (causal LM) dir"
        ]
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    kind = config.get("_class_name") or next(iter(config.get("architectures") or []), "")
    if kind.endswith("ForSequenceClassification"):
        # a reward stage's output has its held-out accuracy beside it; PPO's value_model/ has no eval.json
        figures = "; its held-out accuracy is in its own eval.json" if (Path(path) / "eval.json").is_file() else ""
        return [
            f"{label} '{path}' is a reward model ({kind}): it scores responses and generates none (`hfgen eval POLICY "
            f"--reward_model` judges with it){figures}"
        ]
    if config.get("_class_name"):
        return [
            f"{label} '{path}' is a diffusers {kind} (a vae or other component run), not a pipeline: generate and "
            "evaluate with the t2i run that uses it; an autoencoder's held-out reconstruction error is in its eval.json"
        ]
    return []


def what_model_dir_holds(path: str | Path) -> str | None:
    """What a local model dir holds, for a message naming it where another kind of model is needed: "a diffusers
    AutoencoderKL (a vae run)", "a diffusers StableDiffusionPipeline (a t2i run)", "a LlamaForCausalLM
    (an sft run)", "a LoRA adapter of task CAUSAL_LM". None: no model config here (or not a dir)."""
    path = Path(path).expanduser()

    def read(name: str) -> dict:
        try:
            values = json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return values if isinstance(values, dict) else {}

    index, config, adapter = read("model_index.json"), read("config.json"), read("adapter_config.json")
    if index:
        kind = f"a diffusers {index.get('_class_name')}" + (
            "" if str(index.get("_class_name")).endswith("Pipeline") else " pipeline"
        )
    elif config.get("_class_name"):
        kind = f"a diffusers {config['_class_name']}"
    elif adapter:
        kind = f"a LoRA adapter of task {adapter.get('task_type')}"
    elif config:
        kind = f"a {', '.join(config.get('architectures') or []) or repr(config.get('model_type')) + ' model'}"
    else:
        return None
    stage = recorded_stage(path / "recipe.yaml")  # the hfgen run that wrote it, where it is one
    if stage is None:
        return kind
    return f"{kind} ({'an' if stage[:1] in 'aeiou' or stage in ('sft', 'rlhf') else 'a'} {stage} run)"


def diffusers_dir_problem(key: str, path: str | Path | None, needs: str) -> list[str]:
    """A local dir of diffusers (a pipeline's model_index.json, or a component's config.json with its _class_name:
    a vae run) given as `key`, a transformers model, as a problem naming what it is and what `key` `needs`: its
    config names no transformers architecture, so nothing refused it before its loading failed on the tokenizer."""
    if not path or not Path(path).is_dir():
        return []
    what = what_model_dir_holds(path)
    if not what or not what.startswith("a diffusers"):
        return []
    return [f"{key} '{path}' is {what}, not {needs}"]


REWARD_MODEL_NEEDED = (
    "a reward model: give the output of a reward stage (a sequence classifier), e.g. `hfgen train "
    "recipes/tiny/reward.yaml`"
)


def not_a_reward_model(path: str | Path | None, label: str) -> list[str]:
    """A local model dir that is no sequence classifier (a causal LM, the SFT run given by mistake; a diffusers vae
    or pipeline), as a problem: loaded as a reward model it would score with a new, random head, and training would
    follow noise; a diffusers dir failed at its load, for DPO-like stages after the whole training. Hub ids and
    dirs whose transformers config names no architecture are left to the loader."""
    if not path or not Path(path).is_dir():
        return []
    if problem := diffusers_dir_problem(label, path, REWARD_MODEL_NEEDED):
        return problem
    adapter = Path(path) / "adapter_config.json"
    try:
        if adapter.is_file():
            task = json.loads(adapter.read_text(encoding="utf-8")).get("task_type")
            kind = f"a LoRA adapter of task {task}"
            scores = task == "SEQ_CLS"
        else:
            architectures = (
                json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get("architectures") or []
            )
            kind = ", ".join(architectures)
            scores = not architectures or any(a.endswith("ForSequenceClassification") for a in architectures)
    except (OSError, ValueError):
        return []
    if scores:
        return []
    return [
        f"{label} '{path}' is not a reward model ({kind}): its score head would be new and random; give the output "
        "of a reward stage (a sequence classifier), e.g. `hfgen train recipes/tiny/reward.yaml`"
    ]


def check_config_file(key: str, name: str | None, transformers_config: bool = False) -> list[str]:
    """A local config JSON must exist and hold a JSON object; `transformers_config`: with a `model_type` that
    transformers knows (an unknown one fails deep inside `AutoConfig` with a list of every model type)."""
    if name and looks_local(name) and not Path(name).exists():
        return [f"{key} '{name}' does not exist{relative_to_cwd(name)}"]
    if name and not Path(name).exists() and not name.endswith(".json") and cached_snapshot(name) is None:
        # a hub id's config (from_config of its config.json): offline, the check said nothing and the run failed
        # after loading its data with transformers' "We couldn't connect to 'https://huggingface.co'"
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        try:
            validate_repo_id(name)
        except HFValidationError:
            return []  # (no hub id: the loading names it)
        if problem := uncached_hub_problem(key, name):
            return [problem]
    if name and name.endswith(".json") and Path(name).is_file():
        try:
            values = json.loads(Path(name).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return [f"{key} '{name}' is not valid JSON ({error})"]
        if not isinstance(values, dict):
            return [f"{key} '{name}' must hold a JSON object of config keys, got a {type(values).__name__}"]
        if transformers_config:
            from transformers import CONFIG_MAPPING

            if values.get("model_type") not in CONFIG_MAPPING:
                return [
                    f"{key} '{name}' has model_type {values.get('model_type')!r}, which is not a transformers model "
                    'type; set "model_type" to one, e.g. "llama", "qwen2", "gpt2"'
                ]
    return []


# ---- tokenizers -------------------------------------------------------------------------------------


def build_embedded_tokenizer(arithmetic: bool = False):
    """A byte-level BPE tokenizer trained on the embedded corpus (or, `arithmetic`, on the arithmetic task's text
    with every digit its own token, so numbers are spelled digit by digit), as a normal HF fast tokenizer with a
    chat template. Deterministic, offline, about a second."""
    from hfgen.data import arithmetic as arithmetic_task
    from hfgen.data import embedded

    texts = (arithmetic_task if arithmetic else embedded).tokenizer_training_text()
    vocab_size = ARITHMETIC_VOCAB_SIZE if arithmetic else EMBEDDED_VOCAB_SIZE
    return train_bpe_tokenizer(texts, vocab_size, split_digits=arithmetic)


def train_bpe_tokenizer(texts, vocab_size: int, split_digits: bool = False):
    """A byte-level BPE tokenizer of `vocab_size` tokens trained on `texts` (an iterable of strings), as a normal
    HF fast tokenizer: pad and EOS tokens, the chat role tokens and hfgen's chat template. Deterministic for the
    same texts in the same order. `split_digits`: every digit its own token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_digits:
        bpe.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token=PAD, eos_token=EOS, additional_special_tokens=list(ROLE_TOKENS)
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "left"  # batched generation wants left padding; collators pad as they need
    return tokenizer


def trusted_by_its_run(path: str | Path) -> bool:
    """Whether `path` is the output (or a checkpoint) of an hfgen run whose recipe set `trust_remote_code: true`:
    that run ran the model's own code and saved it beside the weights, so the commands that take a model dir
    (generate, eval, merge) run it too; they have no key of their own to trust it with. The dir must hold a run's
    record, not only the recipe line: a COMPLETE marker with its run id (a checkpoint: its completion state) and a
    recipe naming a stage. Its code files are named on the console when it is trusted, once per dir."""
    path = Path(path).expanduser()
    trusted = _trusted_by_its_run(path)
    if trusted and path.resolve() not in _code_trust_said:
        _code_trust_said.add(path.resolve())
        code = sorted(p.name for p in path.glob("*.py")) if path.is_dir() else []
        if code:
            import sys

            print(
                f"hfgen: running the model code in '{path}' ({', '.join(code)}): the hfgen run that wrote it set "
                "trust_remote_code: true",
                file=sys.stderr,
            )
    return trusted


_code_trust_said: set[Path] = set()  # dirs whose trusted code the console has named


def _trusted_by_its_run(path: Path) -> bool:
    import yaml

    from hfgen import tracking

    try:  # `hfgen merge`'s output: as the adapter run it merged
        adapter = json.loads((path / "merged_from.json").read_text(encoding="utf-8")).get("adapter")
        return bool(adapter) and Path(adapter) != path and _trusted_by_its_run(Path(adapter).expanduser())
    except (OSError, ValueError, AttributeError):
        pass
    try:
        recipe = yaml.safe_load((path / "recipe.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return False
    if not isinstance(recipe, dict) or recipe.get("trust_remote_code") is not True:
        return False
    try:  # the run's record: its COMPLETE marker's run id, or a checkpoint's completion state
        checkpoint_state = tracking.read_json(path / tracking.CHECKPOINT_STATE, None)
        run_record = tracking.run_id(path) is not None or (
            isinstance(checkpoint_state, dict) and checkpoint_state.get("step") is not None
        )
    except UserError:  # a marker that is not JSON: no run's record
        return False
    return run_record and isinstance(recipe.get("stage"), str)


def load_tokenizer(name: str, trust_remote_code: bool | None = None):
    """Tokenizer from a hub id, a local dir, an adapter dir (its base's), or the embedded default.
    Guarantees a pad token distinct from EOS when it can (PPO needs EOS != PAD). `trust_remote_code` None: as the
    run that wrote `name` trusted its code (`trusted_by_its_run`)."""
    from transformers import AutoTokenizer

    if trust_remote_code is None:
        trust_remote_code = trusted_by_its_run(name)
    if name in (EMBEDDED_TOKENIZER, ARITHMETIC_TOKENIZER):
        return build_embedded_tokenizer(arithmetic=name == ARITHMETIC_TOKENIZER)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        base = adapter_base(name)
        if base is None:
            if diffusers := diffusers_dir_problem("the dir", name, "a transformers model with a tokenizer"):
                raise UserError(f"could not load a tokenizer: {diffusers[0]}") from None  # none to copy into it
            if holds_no_tokenizer(name):  # transformers' own text here advises installing sentencepiece or tiktoken
                local = Path(name).expanduser().is_dir()
                raise UserError(
                    f"could not load a tokenizer from '{name}': the "
                    f"{'dir' if local else f'cached snapshot {cached_snapshot(name)}'} holds no tokenizer files "
                    "(tokenizer.json, tokenizer_config.json, tokenizer.model, vocab.json); "
                    + ("copy those of the model it came from into it" if local else f"fetch them: hf download {name}")
                ) from None
            raise UserError(f"could not load a tokenizer from '{name}': {error}") from None
        tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=trust_remote_code)
    if tokenizer.eos_token is None:
        tokenizer.eos_token = eos_of_model_config(name, tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD})
    return tokenizer


def pad_apart_from_eos(tokenizer) -> None:
    """A pad token of its own (PAD, added) for a tokenizer whose pad is its EOS (Qwen2 base's <|endoftext|>, many
    Llama fine-tunes): with EOS == PAD every EOS looks like padding, so PPO would never see a response end, and a
    decoder's sequence classifier, which reads the last token that is not the pad, would read the one before the
    closing EOS: finished and cut-off answers alike. The model's embeddings grow for it (`fit_embeddings`)."""
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD})


def holds_no_tokenizer(name: str) -> bool:
    """A local dir (weights and config, the tokenizer kept elsewhere), or the cached snapshot of a hub id (an
    interrupted download), with none of the files a tokenizer loads from."""
    path = Path(name).expanduser()
    if not path.is_dir() and (path := cached_snapshot(name)) is None:
        return False
    patterns = ("tokenizer*", "vocab*", "*.model", "merges.txt", "spiece*", "tekken.json")
    return not any(any(path.glob(pattern)) for pattern in patterns)


def eos_of_model_config(name: str, tokenizer) -> str | None:
    """The EOS token a local model dir's config.json (or generation_config.json) names by id, for a tokenizer that
    names none: a dir with tokenizer.json but no tokenizer_config.json loads without EOS, and pretraining joined
    documents with None (a RuntimeError in the loss), sft's responses ended with None (a TypeError). None when the
    dir names no single EOS id within the vocabulary."""
    for file in ("config.json", "generation_config.json"):
        try:
            eos_id = json.loads((Path(name).expanduser() / file).read_text(encoding="utf-8")).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(eos_id, int) and 0 <= eos_id < len(tokenizer):
            return tokenizer.convert_ids_to_tokens(eos_id)
    return None


def unsampled_ids(tokenizer, stop_ids=()) -> list[int]:
    """Token ids generation must never produce: the pad token (the one `load_tokenizer` adds is an untrained row,
    which sampling would otherwise draw about once in V tokens, and a reward model of the base vocabulary has no row
    for it; a model's own pad is padding too), unless it also ends a response (pad = EOS)."""
    pad = tokenizer.pad_token_id
    return [] if pad is None or pad == tokenizer.eos_token_id or pad in stop_ids else [pad]


# ---- models -----------------------------------------------------------------------------------------


def bos_added_twice(tokenizer) -> str | None:
    """The BOS text a string would carry twice once tokenized with special tokens: the tokenizer's own BOS when it
    puts one in front of every text (Llama 3's <|begin_of_text|>), which a text rendered with a chat template
    already starts with. None when the tokenizer adds no BOS."""
    bos = tokenizer.bos_token
    if not bos or tokenizer("x")["input_ids"][:1] != [tokenizer.bos_token_id]:
        return None
    return bos


def adapter_base(path: str | Path) -> str | None:
    """The base model of a PEFT adapter dir, or None if `path` is not one."""
    config = Path(path) / "adapter_config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")


def adapter_base_problems(path: str | Path) -> list[str]:
    """The problem of the base an adapter dir names (`check_model_source` of its adapter_config.json's
    base_model_name_or_path, and so down a chain of adapters), said with the file that names it: a base moved or
    deleted, a checkpoint rotated away, which transformers took for a hub id ("Repo id must be in the form ...").
    [] for a dir that is no adapter, or whose base is there."""
    base = adapter_base(path)
    if base is None:
        return []
    problem = recorded_base_problem(Path(path) / "adapter_config.json", "base_model_name_or_path", base)
    return [problem] if problem else []


def recorded_base_problem(record: Path, key: str, base: str) -> str | None:
    """The problem of the base an adapter dir records (`key` in its `record` file: a causal-LM adapter's
    adapter_config.json, a t2i / t2i_flow LoRA run's lora_base.json), said with that file, or None. hfgen records a
    local base as an absolute path (so that it loads from any working directory): a project moved or copied
    elsewhere leaves it pointing at the old place, and a missing base is told how to point the record at the new one."""
    problems = check_model_source(f"the adapter's {key}", base)
    if not problems:
        return None
    moved = ""
    if looks_local(base) and not Path(base).expanduser().exists():
        moved = f"; if the base was moved (with its project, say), edit {key} in {record.name} to its new path"
    return f"{problems[0]} (from {record}){moved}"


def adapter_pair_problem(path: str | Path) -> str | None:
    """Why the adapter dir `path` cannot be loaded onto its base: the base it names is missing
    (`adapter_base_problems`), or holds another run than the one it trained on (`tracking.base_changed_problem`).
    None for a dir that is no adapter, or whose base is the one it trained on. Every loader of an adapter dir asks
    (a policy's, a reward model's): base + adapter of another pair would give other outputs without a word."""
    base = adapter_base(path)
    if base is None:
        return None
    from hfgen.tracking import base_changed_problem

    return next(iter(adapter_base_problems(path)), None) or base_changed_problem(path, base)


def base_model_of(path: str | Path) -> str:
    """The full model under `path`: itself, or the base at the end of a chain of adapter dirs."""
    path = str(path)
    while (base := adapter_base(path)) is not None:
        path = base
    return path


def not_a_causal_lm(key: str, name: str | None, trust_remote_code: bool = False) -> list[str]:
    """A model (or an adapter's base) whose config names no causal-LM class: an encoder such as BERT (no EOS, no
    generation; transformers would bolt a decoder head onto it) or a sequence classifier, as a problem. Best effort:
    a config that cannot be read here is left to the loading."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not name or name.startswith("embedded:"):
        return []
    try:
        config = AutoConfig.from_pretrained(base_model_of(name), trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 (the loading says what is wrong with it)
        return []
    if "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        return []
    architectures = getattr(config, "architectures", None) or []
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
        not architectures or any(a in causal or a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    ):
        return []
    what = ", ".join(architectures) or config.model_type
    return [
        f"{key} '{name}' is a {what} model, not a causal language model (no ...ForCausalLM architecture): this "
        "stage trains a text generator; give a causal LM (e.g. a Llama, Qwen, SmolLM2 or GPT-2 checkpoint)"
    ]


def torch_dtype(name: str):
    import torch

    return name if name == "auto" else getattr(torch, name)


def build_causal_lm_from_config(config_name: str, tokenizer, args: ModelArguments):
    """A randomly initialised causal LM from a config (JSON file, dir or hub id), sized to the tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if config_name.endswith(".json") and Path(config_name).is_file():  # checked by `check_config_file`
        config = AutoConfig.for_model(**json.loads(Path(config_name).read_text(encoding="utf-8")))
    else:
        try:
            config = AutoConfig.from_pretrained(config_name, trust_remote_code=args.trust_remote_code)
        except (OSError, ValueError) as error:  # a dir without config.json, an unknown model_type
            message = str(error).strip().split(". Should contain")[0].splitlines()[0]
            raise UserError(f"config_name '{config_name}': not a config transformers can build ({message})") from None
    config.vocab_size = len(tokenizer)
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id
    kwargs = {"trust_remote_code": args.trust_remote_code}
    if args.dtype != "auto":  # auto: float32, as from_config builds it (there are no weights whose dtype to keep)
        kwargs["dtype"] = torch_dtype(args.dtype)
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    return AutoModelForCausalLM.from_config(config, **kwargs)


def fit_embeddings(model, tokenizer) -> None:
    """Grow the model's embeddings to the tokenizer: `load_tokenizer` gives a tokenizer without a pad token (GPT-2's,
    Llama 3's) a new one, whose id past the embedding table would crash the first padded batch."""
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))


def name_special_tokens(model, tokenizer) -> None:
    """The model's config and generation config name `tokenizer`'s pad and EOS, as TRL's SFTTrainer sets them on the
    model it trains (a full run saves them so): the EOS replaces the config's and joins the generation config's stop
    ids, first, rather than replacing them (a chat model's end of turn beside its end of text). A merged LoRA run
    otherwise kept its base's: no pad where hfgen added one (and grew the embeddings for it), so plain `generate`
    padded with EOS; the base's EOS alone where the run's `eos_token` ends turns, so it ran past the turn end."""
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.get_text_config().eos_token_id = tokenizer.eos_token_id
    stops = model.generation_config.eos_token_id
    stops = [] if stops is None else [stops] if isinstance(stops, int) else list(stops)
    if tokenizer.eos_token_id not in stops:
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, *stops] if stops else tokenizer.eos_token_id


def refuse_tied_embedding_merge(peft_model, where) -> None:
    """A LoRA on the input (or output) embeddings of a model whose output layer shares their weight (tied, as in the
    tiny model, SmolLM2, Qwen2.5) cannot be merged: unmerged it changes only the lookup (or only the logits), merged
    into the shared weight it changes both, and the merged model computes something else (UserError)."""
    from peft.tuners.lora import LoraLayer

    model = peft_model.get_base_model()
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if outputs is None or inputs.weight is not outputs.weight:
        return
    for layer in (inputs, outputs):
        if isinstance(layer, LoraLayer):
            name = next(name for name, module in model.named_modules() if module is layer)
            raise UserError(
                f"{where}: the adapter trains '{name}', whose weight the model's input and output embeddings share "
                "(tie_word_embeddings); merged, it would change both and the model would compute something else. "
                "hfgen generate uses the adapter unmerged; to merge or train on from it, train the LoRA without the "
                "embeddings in lora_target_modules"
            )


def merged(peft_model, where="the adapter"):
    """`peft_model.merge_and_unload()`, also on weights that ZeRO-3's `zero.Init` partitioned as they loaded (a
    process holds a slice: the merge gathers them, and the merged weights are partitioned again from rank 0's)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    refuse_tied_embedding_merge(peft_model, where)
    if not is_deepspeed_zero3_enabled():
        return peft_model.merge_and_unload()
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(peft_model.parameters()), modifier_rank=0):
        return peft_model.merge_and_unload()


def load_causal_lm(
    path: str, dtype: str = "auto", trust_remote_code: bool | None = None, attn_implementation: str | None = None
):
    """A causal LM from a full model dir / hub id, or base+adapter from a LoRA adapter dir (adapter kept
    unmerged, as a PeftModel). Its embeddings fit its tokenizer as `load_tokenizer` gives it (`fit_embeddings`):
    for an adapter trained on such a base, peft saved the grown embeddings, and the base grows before they go in. An
    adapter whose base is itself an adapter dir (LoRA trained on an earlier LoRA run) loads on that one, merged."""
    from transformers import AutoModelForCausalLM

    if trust_remote_code is None:  # generate, eval, merge: as the run that wrote `path` (`trusted_by_its_run`)
        trust_remote_code = trusted_by_its_run(path)
    kwargs = {"dtype": torch_dtype(dtype), "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    base = adapter_base(path)
    if problem := adapter_pair_problem(path):
        raise UserError(problem + ".")
    try:
        tokenizer = load_tokenizer(path, trust_remote_code)
    except UserError:  # a model without a tokenizer of its own (pretraining takes one by name)
        tokenizer = None
    try:
        if base is not None and adapter_base(base):  # trained on an earlier run's adapter (merged, as load_model does)
            model = merged(load_causal_lm(base, dtype, trust_remote_code, attn_implementation), f"'{base}'")
        else:
            model = AutoModelForCausalLM.from_pretrained(base or path, **kwargs)
        if tokenizer is not None:
            fit_embeddings(model, tokenizer)
        if base is None:
            return model
        from peft import PeftModel

        return PeftModel.from_pretrained(model, path)
    except (OSError, ValueError, pickle.UnpicklingError, SafetensorError) as error:
        raise load_problem("a causal language model", path, error, trust_remote_code) from None


def reward_model_problem(key: str, path: str, trust_remote_code: bool = False) -> str | None:
    """Why the model at `path` (given as `key`) cannot score as a reward model, before its weights load: a reward
    LoRA adapter whose base is missing or was trained again in place (`adapter_pair_problem`: it would score on
    another model), or a classifier of several labels (`reward_labels_problem`)."""
    if problem := adapter_pair_problem(path):
        return f"{key} '{path}': {problem}"
    return reward_labels_problem(key, path, trust_remote_code)


def reward_labels_problem(key: str, path: str, trust_remote_code: bool = False) -> str | None:
    """Why the model at `path` (given as `key`) cannot score as a reward model, read from its config before its
    weights load: a sequence classifier of another number of labels than one (a sentiment classifier), whose head
    transformers refuses to load as one label (a raw size-mismatch RuntimeError). None for anything else: a reward
    model, a causal LM (given a new one-label head) or a dir whose config does not load (its loader says why)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None
    classifiers = [name for name in config.architectures or [] if name.endswith("ForSequenceClassification")]
    if not classifiers or config.num_labels == 1:
        return None
    return (
        f"{key} '{path}' is a {classifiers[0]} of {config.num_labels} labels (its config's num_labels): a reward "
        "model scores with one label (AutoModelForSequenceClassification with num_labels 1, as the reward stage "
        "trains it); give a reward model, not a classifier of several classes"
    )


def load_problem(what: str, path: str, error: Exception, trust_remote_code: bool) -> UserError:
    """The problem of a model dir (or hub id) that `from_pretrained` could not load as `what`. A model bringing
    its own code, untrusted: transformers asks for an argument the commands that take a model dir do not have; a
    .bin weights file holding objects other than tensors: torch advises turning its guard off."""
    if weights_refused(error):
        return UserError(f"could not load {what} from '{path}': {WEIGHTS_REFUSED}")
    if damaged := damaged_weights(path):  # safetensors' own message names no file
        return UserError(f"could not load {what} from '{path}': {damaged}")
    if not trust_remote_code and "trust_remote_code" in str(error):
        return UserError(
            f"could not load {what} from '{path}': it brings its own model code, which hfgen runs only for the "
            "output of a run whose recipe set trust_remote_code: true (read from its recipe.yaml); to use another "
            "such model, train from it with trust_remote_code: true"
        )
    return UserError(f"could not load {what} from '{path}': {error}")


def count_parameters(model, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def linear_layers_hint(model, all_linear: bool = True) -> str:
    """What to write in `lora_target_modules` for `model`: the names its linear layers end in (`to_out.0` where the
    last part is an index), heads aside."""
    names = set()
    for name, module in model.named_modules():
        parts = name.split(".")
        if type(module).__name__ in ("Linear", "Conv1D") and parts[-1] not in ("lm_head", "score"):
            names.add(".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1])
    hint = f"its linear layers are named {', '.join(sorted(names))}"
    return hint + ("; [all-linear] adapts all of them" if all_linear else "")


def check_lora_targets(targets, model, where: str, all_linear: bool = True, warn_partial: bool = True) -> None:
    """`lora_target_modules` as peft will read it (a list: module names matched as path suffixes; a string: a regular
    expression over whole paths) must name modules `model` has. None matching is an error (exit 2 naming the key,
    the names and the model's linear layers), which peft would raise as its own traceback. Some not matching is
    allowed, since one list may serve several architectures (Llama's and GPT-NeoX's names together), but peft skips
    those silently and a typo adapts fewer layers than meant: `warn_partial` prints them."""
    import re

    names = [name for name, _ in model.named_modules() if name]
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as error:  # peft would raise it as its own traceback
            raise UserError(
                f"lora_target_modules '{targets}' is read as a regular expression over module paths, but it is not "
                f"one ({error}); write a list of module names ({linear_layers_hint(model, all_linear)})"
            ) from None
        matched = [name for name in names if pattern.fullmatch(name)]
        if not matched:
            raise UserError(
                f"lora_target_modules '{targets}' (a regular expression over module paths) matches no module of "
                f"{where}: {linear_layers_hint(model, all_linear)}"
            )
        check_lora_adaptable(model, matched, where, all_linear)
        return
    unmatched = [t for t in sorted(targets) if not any(n == t or n.endswith(f".{t}") for n in names)]
    if len(unmatched) == len(set(targets)):
        raise UserError(
            f"lora_target_modules: {where} has no module named {', '.join(unmatched)}: "
            f"{linear_layers_hint(model, all_linear)}"
        )
    matched = [n for n in names if any(n == t or n.endswith(f".{t}") for t in targets)]
    check_lora_adaptable(model, matched, where, all_linear)
    if unmatched and warn_partial:
        print(f"warning: lora_target_modules: {where} has no module named {', '.join(unmatched)}; the adapters go on "
              f"the others ({linear_layers_hint(model, all_linear)})")  # fmt: skip


def check_lora_adaptable(model, paths: list[str], where: str, all_linear: bool) -> None:
    """The modules `lora_target_modules` matched must be of a kind peft puts LoRA on (linear, embedding,
    convolution, attention layers): a norm layer or a block failed inside the trainer, once the data had loaded."""
    import torch
    from transformers.pytorch_utils import Conv1D

    adaptable = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
                 torch.nn.MultiheadAttention, Conv1D)  # fmt: skip
    modules = dict(model.named_modules())
    others = sorted({f"{path.rsplit('.', 1)[-1]} ({type(modules[path]).__name__})" for path in paths
                     if not isinstance(modules[path], adaptable)})  # fmt: skip
    if others:
        raise UserError(
            f"lora_target_modules: LoRA adapts linear, embedding and convolution layers, not {where}'s "
            f"{', '.join(others)}: {linear_layers_hint(model, all_linear)}"
        )


def position_limit(config) -> int | None:
    """The longest sequence a model with learned position embeddings can read (GPT-2's `n_positions`, OPT's and
    BERT's `max_position_embeddings`): past it the position lookup fails (an IndexError on a CPU, a device-side
    assert on a GPU). None for rotary (RoPE) and ALiBi models, which run past their max_position_embeddings (less
    well, but without failing) and are often trained past it on purpose."""
    if getattr(config, "rope_parameters", None) or getattr(config, "rotary_dim", None):
        return None
    return getattr(config, "max_position_embeddings", None)


def answer_room(config, key: str, answer_tokens: int, prompt: str = "a prompt") -> int | None:
    """The longest prompt a model with learned position embeddings (`position_limit`: GPT-2, OPT) can answer
    `answer_tokens` tokens after (the recipe's `key`: PPO's response_length, GRPO's max_completion_length, the
    held-out comparison's eval_response_length) within its positions; None for a model without that limit (or no
    config). Answers that fill the positions are refused, naming `key`."""
    limit = position_limit(config) if config is not None else None
    if not limit:
        return None
    if answer_tokens >= limit:
        raise UserError(
            f"{key} {answer_tokens} leaves no room for {prompt} in the {limit} positions {config.model_type} models "
            f"learn: lower {key}"
        )
    return limit - answer_tokens


def reads_last_token(config) -> bool:
    """Whether a sequence classifier of this config reads each sequence's last token (a decoder's head: Llama, GPT-2,
    Qwen, OPT, XLNet...), rather than pooling its first ([CLS]: BERT, RoBERTa, DeBERTa, ModernBERT) or its EOS (BART,
    T5). Decided by the model, not its tokenizer: DeBERTa's and RoBERTa's tokenizers have an EOS ([SEP], </s>), and
    ModernBERT's config names one. The model types with a masked-LM class are the encoders; a type transformers
    does not know (remote code) is taken for a decoder."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if getattr(config, "is_encoder_decoder", False):
        return False
    return config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def read_config(name: str | None, trust_remote_code: bool = False):
    """The config of the model `name` (an adapter's base's), read without its weights, for a check's limits; None
    when it cannot be read here (its loading says why)."""
    from transformers import AutoConfig

    if not name or name.startswith("embedded:"):
        return None
    try:
        return AutoConfig.from_pretrained(base_model_of(name), trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 (the loading says what is wrong with it)
        return None


def within_learned_positions(name: str | None, args, key: str = "max_length"):
    """`args`, or a copy whose `key` is lowered to the learned positions of the model `name` (GPT-2, OPT) as training
    lowers it once the model has loaded (`fit_max_length`, null too), read from its config: what a check judges the
    rows at (at TRL's 1024 a check passed rows that the run then dropped, or refused saying to raise max_length).
    The copy's `learned_positions` names the limit for the messages (`raise_length_advice`)."""
    import copy

    config = read_config(name, getattr(args, "trust_remote_code", False))
    limit = position_limit(config) if config is not None else None
    value = getattr(args, key)
    if not limit or (value is not None and value <= limit):
        return args
    lowered = copy.copy(args)
    setattr(lowered, key, limit)
    lowered.learned_positions = f"{limit} positions {config.model_type} models learn"
    return lowered


def raise_length_advice(args, key: str = "max_length", shorten: str = "the rows") -> str:
    """What a refusal of rows too long for `args.<key>` advises: to raise it (or shorten `shorten`), unless it was
    lowered to a model's learned positions (`within_learned_positions`), which it cannot pass."""
    if positions := getattr(args, "learned_positions", None):
        return (f"{key} is the {positions} (lowered to them, as training lowers it): shorten {shorten}, or use a "
                "model with more positions")  # fmt: skip
    return f"raise {key} (or shorten {shorten})"


def fit_max_length(model, args, key: str = "max_length") -> None:
    """Lower `args.<key>` (the longest row a Trainer stage keeps) to the model's `position_limit`, saying so: TRL's
    default (1024) is longer than a BERT reward model or a small GPT-2 can read, and the rows it keeps would crash
    the first batch that holds one. `<key>: null` (no truncation) too: it would let every row through uncut."""
    limit, value = position_limit(model.config), getattr(args, key, 0)
    if not limit or value == 0:  # (0: no such key)
        return
    if value is None:
        print(f"{key} null (no truncation) would pass rows longer than the {limit} positions "
              f"{model.config.model_type} models learn: {key} {limit}")  # fmt: skip
        setattr(args, key, limit)
    elif value > limit:
        print(f"{key} {value} is more than the {limit} positions {model.config.model_type} models learn: {key} {limit}")
        setattr(args, key, limit)
