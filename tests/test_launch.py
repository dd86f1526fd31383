"""Launch checks of `hfgen train`: a launch that cannot do what was asked exits 2 once, before any model loads or
any process is spawned; a one-process run ignores a process-group backend meant for a launch."""

import os

import pytest
import torch

from conftest import REPO, mounted_tmpfs
from hfgen.cli import build_parser
from hfgen.cli import main as hfgen_main
from hfgen.errors import UserError
from hfgen.recipe import load_recipe

PRETRAIN = REPO / "recipes/tiny/pretrain.yaml"
CPU_2PROC = REPO / "recipes/accelerate/cpu_2proc.yaml"
ZERO3 = REPO / "recipes/accelerate/deepspeed_zero3.yaml"


def refused(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        hfgen_main(["train", *map(str, argv)])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in error, error
    return error


def refused_spawn(capsys, tmp_path, monkeypatch, launch: dict) -> str:
    """The refusal of `hfgen train PRETRAIN --num_processes 2` under a launch config of CPU_2PROC's with `launch`'s
    keys (CPU processes, output under tmp_path/run)."""
    import yaml

    (tmp_path / "launch.yaml").write_text(yaml.safe_dump(yaml.safe_load(CPU_2PROC.read_text()) | launch))
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    run = ["--output_dir", tmp_path / "run"]
    return refused(capsys, PRETRAIN, "--num_processes", "2", "--launch_config", tmp_path / "launch.yaml", *run)


def test_a_deepspeed_launch_with_accelerate_use_cpu_exits_2_before_any_model_loads(tmp_path, monkeypatch, capsys):
    # the environment `accelerate launch --use_deepspeed` gives each process, with ACCELERATE_USE_CPU=true: the
    # Trainer-based stages crashed after the model loaded ('weight' must be 2-D), leaving an output dir
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    error = refused(capsys, PRETRAIN, "--output_dir", tmp_path / "run")
    assert "asked for DeepSpeed but ACCELERATE_USE_CPU=true" in error
    assert not (tmp_path / "run").exists()


def test_a_process_group_backend_is_ignored_by_one_process():
    # `ddp_backend: gloo` (README: for DeepSpeed on CPUs) made `hfgen check` and one-process runs fail with
    # "Default process group has not been initialized"; the recipe still records it
    recipe = load_recipe(PRETRAIN, ["--ddp_backend", "gloo"], check_inputs=False)
    assert "ddp_backend: gloo" in recipe.to_yaml()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without GPUs")
def test_spawning_refuses_a_launch_its_processes_would_refuse_once_before_spawning(tmp_path, monkeypatch, capsys):
    # was refused by every spawned process (the message twice), then torchrun's ChildFailedError traceback, exit 1
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    run = ["--output_dir", tmp_path / "run"]
    error = refused(capsys, PRETRAIN, "--num_processes", "2", "--launch_config", CPU_2PROC, *run)
    assert error.count("ACCELERATE_USE_CPU=true") == 2 and "ChildFailedError" not in error  # said once (x2 in it)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    error = refused(capsys, PRETRAIN, "--num_processes", "2", "--launch_config", ZERO3, *run)
    assert "asked for DeepSpeed but ACCELERATE_USE_CPU=true" in error
    assert not (tmp_path / "run").exists()


def test_more_processes_than_gpus_exits_2_before_spawning(tmp_path, monkeypatch, capsys):
    """(GPU simulated: torch sees one.) accelerate gives process i cuda:(i % GPUs), so four processes shared cuda:0
    and NCCL refused them in every process at the first collective (probe 43 C5)."""
    from hfgen.check import check_spawn

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    run = ["--output_dir", tmp_path / "run"]
    error = refused(capsys, PRETRAIN, "--num_processes", "4", *run)
    assert "4 processes put 4 on this machine, where torch sees 1 GPU(s)" in error, error
    assert "--num_processes 1 or fewer" in error
    error = refused(capsys, PRETRAIN, "--launch_config", REPO / "recipes/accelerate/multi_gpu.yaml", *run)
    assert "8 processes put 8 on this machine, where torch sees 1 GPU(s)" in error, error
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_spawn(2, None) == 2  # one GPU each
    (tmp_path / "two.yaml").write_text(
        (REPO / "recipes/accelerate/multi_gpu.yaml").read_text().replace("gpu_ids: all", "gpu_ids: '1'")
    )
    with pytest.raises(UserError, match="the launch config's gpu_ids '1' name 1 GPU"):
        check_spawn(2, str(tmp_path / "two.yaml"))


def test_num_processes_0_exits_2(capsys):
    assert "--num_processes 0: must be at least 1" in refused(capsys, PRETRAIN, "--num_processes", "0")


@pytest.mark.parametrize("port", ["99999", "-5", "0"])
def test_a_main_process_port_out_of_range_exits_2(capsys, port):
    # 99999 and -5 were accelerate's raw OverflowError after the recipe's checks; 0 was dropped (29500 used)
    error = refused(capsys, PRETRAIN, "--num_processes", "2", "--main_process_port", port)
    assert f"--main_process_port {port}: must be a port number, 1-65535" in error


def test_main_process_port_is_a_launch_option_not_a_recipe_key():
    # was refused as "unknown key 'main_process_port' for stage ..."
    args, extra = build_parser().parse_known_args(
        ["train", "r.yaml", "--num_processes", "2", "--main_process_port", "29555"]
    )
    assert args.main_process_port == 29555 and extra == []


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs: a full disk for the run's saves."""
    with mounted_tmpfs(tmp_path / "disk", "size=1M") as mount:
        yield mount


def test_a_full_disk_while_saving_exits_2_naming_the_output_dir(small_disk, tmp_path, capsys):
    # was a raw traceback: SafetensorError "No space left on device" (or torch's "unexpected pos")
    run = small_disk / "run"
    tiny = ["--max_steps", "1", "--max_train_samples", "16", "--max_eval_samples", "4", "--disable_tqdm", "true"]
    error = refused(capsys, PRETRAIN, "--output_dir", run, *tiny)
    assert f"the disk is full: writing under '{run}" in error and "No space left on device" in error
    assert (run / "recipe.yaml").is_file() and not (run / "COMPLETE").exists()


def test_the_stages_told_to_set_ddp_backend_are_every_stage_transformers_sets_up():
    # DeepSpeed on CPU processes: the message named pretrain, sft and reward only, while GRPO (and every TRL stage)
    # needs `ddp_backend: gloo` as much
    from transformers import TrainingArguments

    from hfgen import loop
    from hfgen.stages import STAGES, load_stage

    trainer_based = {
        name for name in STAGES if any(issubclass(c, TrainingArguments) for c in load_stage(name).ARGUMENTS)
    }
    assert set(loop.TRAINER_STAGES) == trainer_based


@pytest.mark.skipif(torch.cuda.is_available(), reason="launches CPU processes")
def test_a_spawned_launch_leaves_the_callers_environment_as_it_was(tmp_path, monkeypatch, capfd):
    # the launcher's identity stayed in the caller's os.environ (a notebook, a driver script): every later
    # `accelerate launch` from it took that process for its launcher and its ranks stopped themselves (probe 43 B3)
    from hfgen import guard
    from hfgen.cli import main

    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    monkeypatch.delenv(guard.LAUNCHER_PID, raising=False)
    missing = ["--resume_from_checkpoint", str(tmp_path / "no-such-checkpoint"), "--output_dir", str(tmp_path / "a")]
    with pytest.raises(SystemExit) as stopped:  # the process's code, as a failure in this process leaves (B7)
        main(["train", str(PRETRAIN), "--max_steps", "1", *missing, "--num_processes", "1"])
    assert stopped.value.code == 2 and "no-such-checkpoint' is not a directory" in capfd.readouterr().err  # (the fd)
    assert guard.LAUNCHER_PID not in os.environ


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="launches CPU processes")
def test_a_spawned_launch_exits_with_its_processes_code_and_launches_every_process(tmp_path):
    # a process's exit 2 came back as the launcher's CalledProcessError / ChildFailedError traceback and exit 1, a
    # save_on_signal exit 143 as 1 (and its "saved ...; continue with" line came once per process); and without
    # --launch_config, --num_processes 2 started one process
    from conftest import run_hfgen

    tiny = ["--max_steps", "2", "--max_train_samples", "32", "--max_eval_samples", "4", "--save_steps", "1",
            "--logging_steps", "1", "--disable_tqdm", "true"]  # fmt: skip
    missing = ["--resume_from_checkpoint", str(tmp_path / "no-such-checkpoint")]
    cpu = {"ACCELERATE_USE_CPU": "true", "HFGEN_KILL_AT": ""}
    result = run_hfgen("train", PRETRAIN, *tiny, *missing, "--output_dir", tmp_path / "a", "--num_processes", "2",
                       env=cpu)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.count("no-such-checkpoint' is not a directory") == 2  # said by each of the 2 processes
    stopped = run_hfgen("train", PRETRAIN, *tiny, "--save_on_signal", "true", "--output_dir", tmp_path / "b",
                        "--num_processes", "2", env={**cpu, "HFGEN_KILL_AT": "step@2:TERM"})  # fmt: skip
    assert stopped.returncode == 128 + 15 and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    assert stopped.stderr.count("continue with --resume_from_checkpoint true") == 1, stopped.stderr[-3000:]


def test_a_launch_asking_for_another_precision_than_the_recipe_exits_2_naming_both(tmp_path, monkeypatch, capsys):
    # `accelerate launch --mixed_precision bf16` (or a default accelerate config with mixed_precision: bf16) sets
    # ACCELERATE_MIXED_PRECISION: sft trained in bf16 although its recipe says bf16: false, and ppo, vae and t2i
    # (which pass their own precision to accelerate) ran in float32, silently either way
    from hfgen.recipe import precision_problems
    from tiny_models import save_tiny_llama

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    tiny = REPO / "recipes/tiny"
    for name, setting, agreeing in [
        ("sft_full", "bf16: false", ["--bf16", "true"]),
        ("pretrain", "bf16: false", ["--bf16", "true"]),
        ("ppo", "bf16: false", ["--bf16", "true"]),
        ("grpo_arithmetic", "bf16: false", ["--dtype", "bfloat16"]),
        ("vae_digits", "mixed_precision: no", ["--mixed_precision", "bf16"]),
        ("t2i_digits", "mixed_precision: no", ["--mixed_precision", "bf16"]),
    ]:
        problems = precision_problems(load_recipe(tiny / f"{name}.yaml", check_inputs=False).configs)
        assert len(problems) == 1 and "ACCELERATE_MIXED_PRECISION=bf16" in problems[0], (name, problems)
        assert f"float32 (no mixed precision) ({setting})" in problems[0], (name, problems)
        assert precision_problems(load_recipe(tiny / f"{name}.yaml", agreeing, check_inputs=False).configs) == []
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # accelerate launch's default: the recipe decides
    assert precision_problems(load_recipe(tiny / "sft_full.yaml", ["--bf16", "true"], check_inputs=False).configs) == []

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # through `hfgen train`, before anything is written
    model = save_tiny_llama(tmp_path / "model")
    error = refused(capsys, tiny / "sft_full.yaml", "--model_name_or_path", model, "--output_dir", tmp_path / "run")
    assert "the launch asks for mixed precision bf16" in error and "(bf16: false)" in error
    assert not (tmp_path / "run").exists()


def test_spawning_with_a_launch_config_asking_for_another_precision_is_refused_before_spawning(
    tmp_path, monkeypatch, capsys
):
    # the recipe presets in recipes/accelerate say mixed_precision: bf16: each spawned process would refuse a float32
    # recipe under it; refused once here
    import os

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    error = refused_spawn(capsys, tmp_path, monkeypatch, {"mixed_precision": "bf16"})
    assert error.count("the launch asks for mixed precision bf16") == 1 and "(bf16: false)" in error
    assert not (tmp_path / "run").exists() and "ACCELERATE_MIXED_PRECISION" not in os.environ


def test_a_launch_asking_for_torch_compile_against_the_recipe_exits_2_naming_both(tmp_path, monkeypatch, capsys):
    # `accelerate launch --dynamo_backend inductor` (or the dynamo_config `accelerate config` writes to the default
    # config) sets ACCELERATE_DYNAMO_BACKEND, which accelerate's TorchDynamoPlugin reads when the Trainer passes no
    # backend (torch_compile: false) and in the ppo/vae/t2i loops: the model was compiled, unsaid (a 3-step tiny sft
    # was still compiling after 5 minutes)
    from hfgen.recipe import compile_problems
    from tiny_models import save_tiny_llama

    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "inductor")
    tiny = REPO / "recipes/tiny"
    for name, said in [
        ("sft_full", "the recipe has torch_compile: false"),
        ("pretrain", "the recipe has torch_compile: false"),
        ("grpo_arithmetic", "the recipe has torch_compile: false"),
        ("ppo", "this stage's training loop is not compiled"),
        ("vae_digits", "this stage's training loop is not compiled"),
    ]:
        problems = compile_problems(load_recipe(tiny / f"{name}.yaml", check_inputs=False).configs)
        assert len(problems) == 1 and "ACCELERATE_DYNAMO_BACKEND=inductor" in problems[0], (name, problems)
        assert said in problems[0], (name, problems)
    # the recipe asking to compile compiles with its own backend (the Trainer passes it)
    assert (
        compile_problems(load_recipe(tiny / "sft_full.yaml", ["--torch_compile", "true"], check_inputs=False).configs)
        == []
    )
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")  # accelerate launch's default: the recipe decides
    assert compile_problems(load_recipe(tiny / "sft_full.yaml", check_inputs=False).configs) == []

    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "inductor")  # through `hfgen train`, before anything is written
    model = save_tiny_llama(tmp_path / "model")
    error = refused(capsys, tiny / "sft_full.yaml", "--model_name_or_path", model, "--output_dir", tmp_path / "run")
    assert "ACCELERATE_DYNAMO_BACKEND=inductor" in error and "torch_compile: false" in error
    assert not (tmp_path / "run").exists()


def test_spawning_with_a_launch_config_asking_for_torch_compile_is_refused_before_spawning(
    tmp_path, monkeypatch, capsys
):
    # the dynamo_config of the launch config (or of the default accelerate config) becomes each process's
    # ACCELERATE_DYNAMO_BACKEND: refused once here, as the processes would see it

    monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND", raising=False)
    error = refused_spawn(capsys, tmp_path, monkeypatch, {"dynamo_config": {"dynamo_backend": "INDUCTOR"}})
    assert error.count("ACCELERATE_DYNAMO_BACKEND=inductor") == 1 and "torch_compile: false" in error
    assert not (tmp_path / "run").exists() and "ACCELERATE_DYNAMO_BACKEND" not in os.environ


def test_a_launch_config_accelerate_refuses_exits_2_naming_it(tmp_path, monkeypatch, capsys):
    # a key accelerate's launcher does not know (gradient_accumulation_steps) passed hfgen's checks, then raised
    # accelerate's ValueError as a traceback from the launcher, exit 1

    error = refused_spawn(capsys, tmp_path, monkeypatch, {"gradient_accumulation_steps": 4})
    assert f"--launch_config '{tmp_path / 'launch.yaml'}': accelerate refuses it" in error
    assert "gradient_accumulation_steps" in error and not (tmp_path / "run").exists()


def test_a_launch_asking_for_other_gradient_accumulation_than_the_recipe_exits_2_naming_both(
    configs, tmp_path, monkeypatch, capsys
):
    # accelerate's ACCELERATE_GRADIENT_ACCUMULATION_STEPS overrode the recipe's value in the vae/t2i/ppo loops, which
    # count their own micro-steps: the run exited 0 with one optimizer step of three (nothing learned)
    from diffusion_fixtures import VAE_RECIPE, vae_overrides

    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    error = refused(capsys, VAE_RECIPE, *vae_overrides(configs, tmp_path / "run"))
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS=4" in error and "gradient_accumulation_steps: 1" in error
    assert not (tmp_path / "run" / "COMPLETE").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="launches CPU processes")
def test_a_refusal_in_a_process_group_ends_the_group_before_the_interpreter_does(tmp_path, free_port):
    """A launched process that refused its input left its gloo group to the interpreter's teardown, where gloo's
    worker threads sometimes aborted the process (SIGABRT, exit -6 instead of 2: the CI failure of stop 43): the
    group ends as the command exits 2. Its own interpreter: a group of one, as a launched process holds its own."""
    import subprocess
    import sys

    script = (
        "import torch.distributed as dist\n"
        f"dist.init_process_group('gloo', init_method='tcp://127.0.0.1:{free_port}', rank=0, world_size=1)\n"
        "from hfgen.cli import main\n"
        "try:\n"
        f"    main(['train', {str(tmp_path / 'missing.yaml')!r}])\n"
        "except SystemExit as leaving:\n"
        "    print('exit', leaving.code, 'group', dist.is_initialized())\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert "exit 2 group False" in result.stdout, result.stdout + result.stderr[-2000:]


def test_an_output_dir_not_shared_between_machines_exits_2_on_every_process(tmp_path, free_port):
    # two machines with a node-local output_dir each: the run exited 0, machine 1's dir held checkpoint dirs with only
    # its rng state, and every later start or resume there was refused as "checkpoint dirs that no hfgen run wrote"
    import subprocess

    from conftest import HFGEN

    port, tiny = str(free_port), ["--max_steps", "2", "--max_train_samples", "32", "--disable_tqdm", "true"]
    machines = []
    for rank in range(2):  # one process per machine, each given its own disk
        env = {"ACCELERATE_USE_CPU": "true", "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}  # fmt: skip
        command = [*HFGEN, "train", str(PRETRAIN), *tiny, "--output_dir", str(tmp_path / f"machine{rank}")]
        machines.append(
            subprocess.Popen(command, cwd=REPO, env={**os.environ, **env}, stderr=subprocess.PIPE, text=True)
        )
    for machine in machines:
        error = machine.communicate(timeout=300)[1]
        assert machine.returncode == 2 and "Traceback" not in error, error[-3000:]
        assert "process(es) 1 (on" in error and "a filesystem every machine sees" in error
    assert not list((tmp_path / "machine1").glob("checkpoint-*"))
