"""finetune/*.sh and ds_configs/*.json: every config parses, options and environment resolve to the exact launch line
(CHATTUNE_DRY_RUN=1, fake nvidia-smi/scontrol/launchers on PATH), and every wrapper trains the tiny Qwen2 on CPU."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from fixtures import free_port

ROOT = Path(__file__).resolve().parents[1]
FINETUNE = str(ROOT / "finetune.py")
DATA = str(ROOT / "examples" / "sharegpt.json")
DS_WRAPPERS = ["finetune_ds.sh", "finetune_lora_ds.sh", "finetune_qlora_ds.sh"]
SINGLE_WRAPPERS = ["finetune_lora_single_gpu.sh", "finetune_qlora_single_gpu.sh"]
WRAPPERS = DS_WRAPPERS + SINGLE_WRAPPERS
# Variables the wrappers read: cleared so the machine running the tests cannot leak into them.
LAUNCH_ENV = ("GPUS_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES",
              "NCCL_P2P_DISABLE", "MODEL", "DATA", "OUTPUT_DIR", "PYTHON", "TORCHRUN", "CHATTUNE_CPU",
              "CHATTUNE_DRY_RUN")

A100 = "\n".join(f"GPU {i}: NVIDIA A100-SXM4-80GB (UUID: GPU-{i}abc)" for i in range(4))
RTX3090 = "\n".join(f"GPU {i}: NVIDIA GeForce RTX 3090 (UUID: GPU-{i}def)" for i in range(4))


@pytest.fixture
def fake_bin(tmp_path):
    """A directory first on PATH with stand-ins for nvidia-smi and scontrol (default: no GPU, no SLURM)."""
    folder = tmp_path / "bin"
    folder.mkdir()

    def install(name: str, script: str) -> None:
        path = folder / name
        path.write_text("#!/bin/sh\n" + script + "\n")
        path.chmod(0o755)

    install("nvidia-smi", "exit 9")
    install("scontrol", "exit 9")
    return SimpleNamespace(path=folder, install=install)


def wrapper_env(fake_bin: SimpleNamespace, **env) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV and not k.startswith("SLURM_")}
    clean["PATH"] = f"{fake_bin.path}{os.pathsep}{clean['PATH']}"
    clean.update({k: str(v) for k, v in env.items()})
    return clean


def run_wrapper(name: str, *args, fake_bin: SimpleNamespace, timeout: int = 60, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "finetune" / name), *map(str, args)], env=wrapper_env(fake_bin, **env),
                          capture_output=True, text=True, timeout=timeout)


def dry_run(name: str, *args, fake_bin: SimpleNamespace, **env) -> tuple[list[str], list[str], str]:
    """(launcher argv, finetune.py argv, stderr) of the command the wrapper would run."""
    proc = run_wrapper(name, *args, fake_bin=fake_bin, CHATTUNE_DRY_RUN=1, **env)
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout.strip().splitlines()[-1])
    i = argv.index(FINETUNE)
    return argv[:i], argv[i + 1:], proc.stderr


def flags(argv: list[str]) -> dict[str, str]:
    """--flag value pairs; a repeated flag keeps its last value, as argparse does."""
    out = {}
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            out[name] = value if eq else argv[i + 1]
    return out


def torchrun_flags(launcher: list[str]) -> dict[str, str]:
    assert launcher[0] == "torchrun"
    return flags(launcher[1:])


# --------------------------------------------------------------------------------------------------------------------
# DeepSpeed configs
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, stage, offload", [("zero2", 2, False), ("zero3", 3, False), ("zero3_offload", 3, True)])
def test_ds_config_parses_with_the_expected_stage_and_offload(name, stage, offload, tmp_path):
    import deepspeed
    from transformers import TrainingArguments
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from chattune.train.memory import zero_setup_from_config

    path = ROOT / "ds_configs" / f"{name}.json"
    config = json.loads(path.read_text())
    hf = HfDeepSpeedConfig(json.loads(path.read_text()))
    assert (hf.is_zero2(), hf.is_zero3(), hf.is_offload()) == (stage == 2, stage == 3, offload)
    assert hf.get_value("fp16.enabled") == hf.get_value("bf16.enabled") == "auto"
    assert zero_setup_from_config(str(path)) == (stage, offload)  # the memory planner reads it the same way
    # No scheduler anywhere: --lr_scheduler_type/--warmup_steps apply under DeepSpeed too (a DeepSpeed scheduler
    # block would silently replace them). No optimizer without offload: --optim applies and no FusedAdam is compiled;
    # with offload DeepSpeed insists on its own CPU Adam, its hyperparameters filled in from the Trainer's flags.
    assert "scheduler" not in config
    if offload:
        assert config["optimizer"]["type"] == "AdamW"
        assert set(config["optimizer"]["params"].values()) == {"auto"}
    else:
        assert "optimizer" not in config

    # Every "auto" is one transformers fills in, and DeepSpeed's own parser accepts the result.
    filled = HfTrainerDeepSpeedConfig(config)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=2,
                             gradient_accumulation_steps=4, learning_rate=3e-4, report_to="none")
    filled.trainer_config_process(args)
    filled.trainer_config_finalize(args, SimpleNamespace(config=SimpleNamespace(hidden_size=64)), 100)
    assert "auto" not in json.dumps(filled.config)
    ds = deepspeed.runtime.config.DeepSpeedConfig(filled.config)
    assert (ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps, ds.gradient_clipping) == (2, 4, 1.0)
    assert ds.zero_optimization_stage == stage
    zero = ds.zero_config
    assert zero.reduce_bucket_size == 64 * 64
    devices = (zero.offload_optimizer.device if zero.offload_optimizer else "none",
               zero.offload_param.device if zero.offload_param else "none")
    assert devices == (("cpu", "cpu") if offload else ("none", "none"))
    if stage == 3:  # the final save writes plain, gathered Hugging Face weights
        assert zero.gather_16bit_weights_on_model_save is True
        assert zero.prefetch_bucket_size == int(0.9 * 64 * 64) and zero.param_persistence_threshold == 10 * 64


def test_every_ds_wrapper_names_a_shipped_config(fake_bin):
    expected = {"finetune_ds.sh": "zero3.json", "finetune_lora_ds.sh": "zero2.json",
                "finetune_qlora_ds.sh": "zero2.json"}
    for name, config in expected.items():
        _, argv, _ = dry_run(name, "-m", "M", "-d", "D", fake_bin=fake_bin, GPUS_PER_NODE=4)
        assert flags(argv)["deepspeed"] == str(ROOT / "ds_configs" / config)
        assert (ROOT / "ds_configs" / config).is_file()


# --------------------------------------------------------------------------------------------------------------------
# Options, defaults and launch line (dry run)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", WRAPPERS)
def test_help(name, fake_bin):
    proc = run_wrapper(name, "-h", fake_bin=fake_bin)
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith(f"Usage: bash finetune/{name} -m MODEL -d DATA [-o OUTPUT] [finetune.py flags...]")
    assert ("--deepspeed CONFIG" in proc.stdout) == (name in DS_WRAPPERS)
    assert "--model_max_length 512" in proc.stdout and "CHATTUNE_DRY_RUN=1" in proc.stdout
    assert run_wrapper(name, "--help", fake_bin=fake_bin).stdout == proc.stdout
    assert "--bf16 True" in proc.stdout and "--use_cpu" not in proc.stdout
    cpu = run_wrapper(name, "-h", fake_bin=fake_bin, CHATTUNE_CPU=1).stdout
    assert "--use_cpu True" in cpu and "--bf16" not in cpu  # the help shows the defaults that apply


def test_single_gpu_defaults_and_plain_python(fake_bin):
    launcher, argv, _ = dry_run("finetune_lora_single_gpu.sh", "-m", "/models/my model", "-d", "data.json",
                                fake_bin=fake_bin)
    assert launcher == ["python3"]  # no torchrun, no MPI
    assert argv == [
        "--model_name_or_path", "/models/my model", "--data_path", "data.json", "--output_dir", "output_lora",
        "--model_max_length", "512", "--num_train_epochs", "5", "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "1", "--learning_rate", "3e-4", "--weight_decay", "0.1",
        "--adam_beta2", "0.95", "--warmup_steps", "0.01", "--lr_scheduler_type", "cosine",
        "--save_strategy", "steps", "--save_steps", "1000", "--save_total_limit", "10", "--logging_steps", "1",
        "--report_to", "none", "--lazy_preprocess", "True",  # recompute: the plan picks it for the GPU
        "--gradient_accumulation_steps", "8", "--bf16", "True", "--use_lora", "True",
    ]


@pytest.mark.parametrize("name, mode_flags, lr, per_device, accumulation", [
    ("finetune_ds.sh", {}, "1e-5", "1", "4"),
    ("finetune_lora_ds.sh", {"use_lora": "True"}, "3e-4", "2", "2"),
    ("finetune_qlora_ds.sh", {"use_lora": "True", "q_lora": "True"}, "3e-4", "2", "2"),
    ("finetune_lora_single_gpu.sh", {"use_lora": "True"}, "3e-4", "2", "8"),
    ("finetune_qlora_single_gpu.sh", {"use_lora": "True", "q_lora": "True"}, "3e-4", "2", "8"),
])
def test_mode_defaults_give_a_global_batch_of_16_on_4_gpus(name, mode_flags, lr, per_device, accumulation, fake_bin):
    launcher, argv, _ = dry_run(name, "-m", "M", "-d", "D", fake_bin=fake_bin, GPUS_PER_NODE=4)
    f = flags(argv)
    assert (f["learning_rate"], f["per_device_train_batch_size"], f["gradient_accumulation_steps"]) == (
        lr, per_device, accumulation)
    mode = "full" if name == "finetune_ds.sh" else "qlora" if "qlora" in name else "lora"
    assert f["output_dir"] == f"output_{mode}"
    assert {k: f[k] for k in ("use_lora", "q_lora") if k in f} == mode_flags
    assert f["bf16"] == "True" and f["model_max_length"] == "512" and "use_cpu" not in f
    processes = int(torchrun_flags(launcher)["nproc_per_node"]) if name in DS_WRAPPERS else 1
    assert processes * int(per_device) * int(accumulation) == 16


@pytest.mark.parametrize("name, lr", [("finetune_ds.sh", "5e-7"), ("finetune_lora_ds.sh", "5e-6"),
                                      ("finetune_qlora_single_gpu.sh", "5e-6")])
@pytest.mark.parametrize("stage", [["--stage", "dpo"], ["--stage=dpo"]])
def test_preference_training_gets_preference_defaults(name, lr, stage, fake_bin):
    launcher, argv, _ = dry_run(name, "-m", "M", "-d", "pairs.jsonl", *stage, fake_bin=fake_bin, GPUS_PER_NODE=4)
    f = flags(argv)
    assert (f["learning_rate"], f["num_train_epochs"]) == (lr, "3")
    assert argv[-len(stage):] == stage  # passed on to finetune.py
    _, argv, _ = dry_run(name, "-m", "M", "-d", "pairs.jsonl", *stage, "--learning_rate", "1e-6", fake_bin=fake_bin)
    assert flags(argv)["learning_rate"] == "1e-6"  # the user's own flag still wins


@pytest.mark.parametrize("env, nproc", [
    ({"GPUS_PER_NODE": 3}, "3"),
    ({"GPUS_PER_NODE": 3, "CUDA_VISIBLE_DEVICES": "0,1"}, "3"),  # explicit wins
    ({"CUDA_VISIBLE_DEVICES": "2,5"}, "2"),
    ({"nvidia_smi": A100}, "4"),
    ({"CUDA_VISIBLE_DEVICES": "1", "nvidia_smi": A100}, "1"),
    ({}, "1"),  # no GPU found
])
def test_gpus_per_node_resolution(env, nproc, fake_bin):
    env = dict(env)
    if "nvidia_smi" in env:
        fake_bin.install("nvidia-smi", f"[ \"$1\" = -L ] && cat <<'EOF'\n{env.pop('nvidia_smi')}\nEOF")
    launcher, argv, stderr = dry_run("finetune_lora_ds.sh", "-m", "M", "-d", "D", fake_bin=fake_bin, **env)
    assert launcher == ["torchrun", "--nproc_per_node", nproc, "--nnodes", "1", "--node_rank", "0",
                        "--master_addr", "localhost", "--master_port", "6001"]
    assert flags(argv)["gradient_accumulation_steps"] == str(max(1, 16 // (2 * int(nproc))))
    assert stderr == f"launch: {nproc} process(es) per node x 1 node(s), node rank 0, rendezvous localhost:6001\n"


def test_slurm_variables_and_explicit_overrides(fake_bin):
    fake_bin.install("scontrol", '[ "$*" = "show hostnames gpu[07-08]" ] && printf "gpu07\\ngpu08\\n"')
    slurm = {"SLURM_NNODES": 2, "SLURM_NODEID": 1, "SLURM_JOB_NODELIST": "gpu[07-08]", "GPUS_PER_NODE": 4}
    launcher, argv, _ = dry_run("finetune_ds.sh", "-m", "M", "-d", "D", fake_bin=fake_bin, **slurm)
    assert torchrun_flags(launcher) == {"nproc_per_node": "4", "nnodes": "2", "node_rank": "1",
                                        "master_addr": "gpu07", "master_port": "6001"}
    assert flags(argv)["gradient_accumulation_steps"] == "2"  # 16 / (1 per device x 4 GPUs x 2 nodes)
    launcher, _, _ = dry_run("finetune_ds.sh", "-m", "M", "-d", "D", fake_bin=fake_bin, **slurm, NNODES=3,
                             NODE_RANK=2, MASTER_ADDR="10.0.0.1", MASTER_PORT=29555)
    assert torchrun_flags(launcher) == {"nproc_per_node": "4", "nnodes": "3", "node_rank": "2",
                                        "master_addr": "10.0.0.1", "master_port": "29555"}


def test_slurm_without_scontrol(fake_bin):
    # one node: the rendezvous is local anyway; several: MASTER_ADDR cannot be guessed, so say what to set
    launcher, _, _ = dry_run("finetune_lora_ds.sh", "-m", "M", "-d", "D", fake_bin=fake_bin, SLURM_NNODES=1,
                             SLURM_JOB_NODELIST="gpu07")
    assert torchrun_flags(launcher)["master_addr"] == "localhost"
    proc = run_wrapper("finetune_lora_ds.sh", "-m", "M", "-d", "D", fake_bin=fake_bin, CHATTUNE_DRY_RUN=1,
                       SLURM_NNODES=2, SLURM_JOB_NODELIST="gpu[07-08]")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("finetune_lora_ds.sh: cannot read the first host of SLURM_JOB_NODELIST=gpu[07-08] "
                           "(scontrol show hostnames failed); set MASTER_ADDR\n")


def test_bad_numbers_and_missing_options_are_errors(fake_bin):
    proc = run_wrapper("finetune_lora_ds.sh", "-m", "M", "-d", "D", fake_bin=fake_bin, CHATTUNE_DRY_RUN=1,
                       GPUS_PER_NODE="two")
    assert proc.returncode == 2 and proc.stderr == "finetune_lora_ds.sh: GPUS_PER_NODE=two is not a number\n"
    proc = run_wrapper("finetune_lora_ds.sh", "--lora_r", "8", fake_bin=fake_bin, CHATTUNE_DRY_RUN=1)
    assert proc.returncode == 2
    assert proc.stderr == ("finetune_lora_ds.sh: missing -m MODEL -d DATA (or the environment variables MODEL, "
                           "DATA); see -h\n")
    proc = run_wrapper("finetune_lora_ds.sh", "-m", "M", "-d", fake_bin=fake_bin, CHATTUNE_DRY_RUN=1)
    assert proc.returncode == 2 and proc.stderr == "finetune_lora_ds.sh: -d needs a value (see -h)\n"


def test_options_environment_and_pass_through(fake_bin):
    env = {"MODEL": "env-model", "DATA": "env.json", "OUTPUT_DIR": "env-out", "GPUS_PER_NODE": 2}
    _, argv, _ = dry_run("finetune_lora_ds.sh", fake_bin=fake_bin, **env)
    assert [flags(argv)[k] for k in ("model_name_or_path", "data_path", "output_dir")] == [
        "env-model", "env.json", "env-out"]
    _, argv, _ = dry_run("finetune_lora_ds.sh", "--model=opt-model", "--lora_r", "8", "-d", "opt.json",
                         "--output", "opt-out", "--deepspeed", "my_ds.json", "--learning_rate", "1e-4",
                         fake_bin=fake_bin, **env)
    f = flags(argv)
    assert [f[k] for k in ("model_name_or_path", "data_path", "output_dir", "deepspeed")] == [
        "opt-model", "opt.json", "opt-out", "my_ds.json"]
    # the user's arguments come last, in their order, after every default
    assert argv[-4:] == ["--lora_r", "8", "--learning_rate", "1e-4"]


def test_pass_through_overrides_the_defaults_in_finetune_py(fake_bin, tmp_path):
    from chattune.train.args import parse_args

    (tmp_path / "D").write_text("[]")
    _, argv, _ = dry_run("finetune_qlora_single_gpu.sh", "-m", "M", "-d", tmp_path / "D", "-o", tmp_path / "out",
                         "--learning_rate", "1e-4", "--lora_r", "8", "--model_max_length", "1024",
                         "--save_strategy", "no", fake_bin=fake_bin, CHATTUNE_CPU=1)
    model, data, training, lora = parse_args(argv)  # the line finetune.py receives is valid, and the last value wins
    assert (training.learning_rate, lora.lora_r, training.model_max_length, training.save_strategy) == (
        1e-4, 8, 1024, "no")
    assert (training.use_cpu, training.bf16, training.use_lora, lora.q_lora) == (True, False, True, True)
    assert (training.warmup_steps, training.lr_scheduler_type, training.num_train_epochs) == (0.01, "cosine", 5)
    assert (model.model_name_or_path, data.data_path, data.lazy_preprocess) == ("M", str(tmp_path / "D"), True)


@pytest.fixture
def echo_launcher(fake_bin):
    """A stand-in for python/torchrun that prints the argv and environment it was started with."""
    path = fake_bin.path / "echo_launcher"
    path.write_text(f"#!{sys.executable}\nimport json, os, sys\nprint(json.dumps({{'argv': sys.argv[1:], "
                    "'NCCL_P2P_DISABLE': os.environ.get('NCCL_P2P_DISABLE'), "
                    "'CUDA_VISIBLE_DEVICES': os.environ.get('CUDA_VISIBLE_DEVICES')}))\n")
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize("preset, gpus, disabled, message", [
    ({}, RTX3090, "1", "NCCL_P2P_DISABLE=1: NVIDIA GeForce RTX 3090 (consumer cards, no peer-to-peer over PCIe)\n"),
    ({"NCCL_P2P_DISABLE": "0"}, RTX3090, "0", ""),  # the user's choice stays
    ({}, A100, None, ""),
])
def test_nccl_p2p_disabled_on_consumer_cards(preset, gpus, disabled, message, fake_bin, echo_launcher):
    fake_bin.install("nvidia-smi", f"[ \"$1\" = -L ] && cat <<'EOF'\n{gpus}\nEOF")
    proc = run_wrapper("finetune_lora_ds.sh", "-m", "M", "-d", "D", fake_bin=fake_bin, TORCHRUN=echo_launcher,
                       **preset)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["NCCL_P2P_DISABLE"] == disabled
    assert seen["argv"][:2] == ["--nproc_per_node", "4"]
    launch = "launch: 4 process(es) per node x 1 node(s), node rank 0, rendezvous localhost:6001\n"
    assert proc.stderr == message + launch


@pytest.mark.parametrize("env, visible", [({}, "0"), ({"CUDA_VISIBLE_DEVICES": "3,5"}, "3"),
                                          ({"CHATTUNE_CPU": 1}, None)])
def test_single_gpu_wrapper_runs_one_process_on_one_gpu(env, visible, fake_bin, echo_launcher):
    proc = run_wrapper("finetune_lora_single_gpu.sh", "-m", "my model", "-d", "D", "--run_name", "a b",
                       fake_bin=fake_bin, PYTHON=echo_launcher, **env)
    assert proc.returncode == 0 and proc.stderr == ""
    seen = json.loads(proc.stdout)
    # one visible GPU: with several, a single process would make the Trainer fall back to DataParallel
    assert seen["CUDA_VISIBLE_DEVICES"] == visible
    assert seen["argv"][:3] == [FINETUNE, "--model_name_or_path", "my model"]
    assert seen["argv"][-2:] == ["--run_name", "a b"]


# --------------------------------------------------------------------------------------------------------------------
# End to end on CPU with the tiny Qwen2
# --------------------------------------------------------------------------------------------------------------------

LORA_FILES = {"adapter_model.safetensors", "adapter_config.json"}
FULL_FILES = {"model.safetensors", "config.json"}
COMMON_FILES = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                "chattune.json", "trainer_state.json", "run_report.json", "loss.png"}
LORA_R8_PARAMS = 16_384  # r=8 on q,k,v,o,gate,up,down of 2 layers (hidden 64, kv 32, mlp 128): 2 x 8 x 1024


@pytest.mark.slow
@pytest.mark.parametrize("name, processes, mode, config", [
    ("finetune_lora_single_gpu.sh", 1, "lora", "-"),
    ("finetune_qlora_single_gpu.sh", 1, "qlora", "-"),
    ("finetune_lora_ds.sh", 2, "lora", "zero2.json"),
    ("finetune_qlora_ds.sh", 2, "qlora", "zero2.json"),
    ("finetune_ds.sh", 2, "full", "zero3.json"),
    ("finetune_lora_ds.sh", 2, "lora", "none"),  # plain DDP: the same processes without DeepSpeed
])
@pytest.mark.slow
def test_wrapper_trains_end_to_end_on_cpu(name, processes, mode, config, model_dirs, tmp_path, fake_bin):
    out = tmp_path / "out"
    extra = (["--lora_r", "8"] if mode != "full" else []) + (["--deepspeed", "none"] if config == "none" else [])
    env = {"CHATTUNE_CPU": 1, "PYTHON": sys.executable, "TORCHRUN": Path(sys.executable).parent / "torchrun"}
    if name in DS_WRAPPERS:
        env["GPUS_PER_NODE"] = processes
    for _ in range(2):  # a second try only if another process took the free port before torchrun bound it
        proc = run_wrapper(name, "-m", model_dirs("qwen2"), "-d", DATA, "-o", out, "--max_steps", "2",
                           "--gradient_accumulation_steps", "1", "--save_strategy", "no", "--preview_data", "0",
                           "--data_cache_dir", tmp_path / "cache", *extra, fake_bin=fake_bin, timeout=600,
                           MASTER_PORT=free_port(), **env)
        if "Address already in use" not in proc.stderr:
            break
    assert proc.returncode == 0, proc.stderr[-4000:]
    files = {p.name for p in out.iterdir()}
    assert files == COMMON_FILES | (FULL_FILES if mode == "full" else LORA_FILES | {"README.md"}) | {
        "training_args.bin"}
    report = json.loads((out / "run_report.json").read_text())
    plan = report["plan"]
    assert (report["steps"], plan["mode"], plan["processes"], plan["dtype"]) == (2, mode, processes, "float32")
    assert plan["estimated_gb_per_gpu"] > 0  # under ZeRO-3 too (finetune_ds.sh)
    assert plan["deepspeed"] == (str(ROOT / "ds_configs" / config) if config not in ("-", "none") else "-")
    # processes x samples per device, no accumulation (the passed --gradient_accumulation_steps 1 won)
    assert plan["global_batch_samples"] == processes * (1 if mode == "full" else 2)
    if mode == "full":
        assert plan["trainable_params"] == plan["total_params"]
    else:  # the passed --lora_r 8 replaced Qwen's default 64
        assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
        assert plan["trainable_params"] == LORA_R8_PARAMS
    assert json.loads((out / "chattune.json").read_text())["mode"] == mode


@pytest.mark.parametrize("name", DS_WRAPPERS)
def test_deepspeed_none_launches_plain_ddp(name, fake_bin):
    launcher, argv, _ = dry_run(name, "-m", "M", "-d", "D", "--deepspeed", "none", fake_bin=fake_bin,
                                GPUS_PER_NODE=4)
    assert "--deepspeed" not in argv and launcher[:3] == ["torchrun", "--nproc_per_node", "4"]
    _, default, _ = dry_run(name, "-m", "M", "-d", "D", fake_bin=fake_bin, GPUS_PER_NODE=4)
    assert flags(default)["deepspeed"].startswith(str(ROOT / "ds_configs"))
