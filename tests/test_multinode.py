"""Where the ranks of a fine-tuning job go: devices from the environment, nodes, and a real two-node run.

The launch plan is worked out from environment variables; the unit tests give it the environments a
workstation, a SLURM GPU job and a SLURM multi-node job have. The slow test runs two real
``paddle.distributed.launch`` launchers on this machine as two nodes (one CPU rank each, rendezvous
over loopback) through the workflow script, and checks that they train exactly like one node with two
ranks.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from vlretrieval.errors import ConfigError
from vlretrieval.training.launch_plan import (
    SLURM_MASTER_PORT_BASE,
    LaunchPlan,
    complete_slurm_environ,
    expand_hostlist,
    master_endpoint,
    parse_scontrol_job,
    resolve_launch_plan,
    visible_gpus,
)
from vlretrieval.training.launcher import launch_command, launch_env, slurm_launch_command

REPO = Path(__file__).resolve().parent.parent


# -- host lists and devices ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, hosts",
    [
        ("node07", ["node07"]),
        ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
        ("gpu[8-11]", ["gpu8", "gpu9", "gpu10", "gpu11"]),
        ("a1,b[2-3],c", ["a1", "b2", "b3", "c"]),
        ("rack[1-2]-n[09-10]", ["rack1-n09", "rack1-n10", "rack2-n09", "rack2-n10"]),
        ("node[001-002].cluster", ["node001.cluster", "node002.cluster"]),
    ],
)
def test_expand_hostlist(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("text", ["", "node[01-03", "node01]", "node[3-1]", "node[a-b]"])
def test_expand_hostlist_rejects_malformed_lists(text):
    with pytest.raises(ValueError):
        expand_hostlist(text)


def test_visible_gpus_sources():
    assert visible_gpus({}) == (None, "")
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == (["2", "3"], "CUDA_VISIBLE_DEVICES")
    # CUDA_VISIBLE_DEVICES wins: SLURM sets it, and its labels are what the launcher's --gpus means.
    env = {"CUDA_VISIBLE_DEVICES": "GPU-aa,GPU-bb", "SLURM_JOB_GPUS": "4,5", "SLURM_GPUS_ON_NODE": "2"}
    assert visible_gpus(env) == (["GPU-aa", "GPU-bb"], "CUDA_VISIBLE_DEVICES")
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""})[0] == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "NoDevFiles"})[0] == []
    assert visible_gpus({"SLURM_JOB_GPUS": "4,5", "SLURM_GPUS_ON_NODE": "2"}) == (["4", "5"], "SLURM_JOB_GPUS")
    assert visible_gpus({"SLURM_STEP_GPUS": "0-2,6", "SLURM_JOB_GPUS": "0-7"})[0] == ["0", "1", "2", "6"]
    assert visible_gpus({"SLURM_GPUS_ON_NODE": "4"}) == (["0", "1", "2", "3"], "SLURM_GPUS_ON_NODE")


# -- ranks on one node --------------------------------------------------------------------------------


def test_cpu_ranks_when_no_gpus_are_configured():
    plan = resolve_launch_plan({"CUDA_VISIBLE_DEVICES": "0,1"}, gpus=0, cpu_ranks=3)
    assert plan == LaunchPlan(nproc_per_node=3, use_gpu=False)
    assert plan.world_size == 3


def test_gpu_ranks_from_the_environment():
    plan = resolve_launch_plan({"CUDA_VISIBLE_DEVICES": "2,3"}, gpus=2, cpu_ranks=2)
    assert (plan.nproc_per_node, plan.use_gpu, plan.devices, plan.nnodes) == (2, True, ("2", "3"), 1)
    # More GPUs than configured: the configured number, the first ones.
    assert resolve_launch_plan({"CUDA_VISIBLE_DEVICES": "4,5,6,7"}, gpus=2, cpu_ranks=2).devices == ("4", "5")
    # A SLURM GPU job without CUDA_VISIBLE_DEVICES.
    slurm = {"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_GPUS": "1,3"}
    assert resolve_launch_plan(slurm, gpus=2, cpu_ranks=2).devices == ("1", "3")
    # Nothing in the environment: the configured count, labels 0..n-1.
    assert resolve_launch_plan({}, gpus=4, cpu_ranks=2).devices == ("0", "1", "2", "3")


def test_fewer_gpus_than_configured_is_an_error():
    with pytest.raises(ConfigError, match=r"finetune.gpus is 4, but this node has 2 GPU\(s\).*CUDA_VISIBLE_DEVICES"):
        resolve_launch_plan({"CUDA_VISIBLE_DEVICES": "0,1"}, gpus=4, cpu_ranks=2)
    with pytest.raises(ConfigError, match="SLURM_GPUS_ON_NODE"):
        resolve_launch_plan({"SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": "1"}, gpus=2, cpu_ranks=2)
    with pytest.raises(ConfigError, match="has 0 GPU"):
        resolve_launch_plan({"CUDA_VISIBLE_DEVICES": ""}, gpus=1, cpu_ranks=2)


def test_single_node_commands_use_the_device_labels(tmp_path):
    plan = resolve_launch_plan({"CUDA_VISIBLE_DEVICES": "2,3"}, gpus=2, cpu_ranks=2)
    cmd = launch_command(plan.nproc_per_node, plan.use_gpu, tmp_path, ["--x"], python="py", devices=plan.devices)
    # The launcher looks --gpus values up among CUDA_VISIBLE_DEVICES; "0,1" would not be found there.
    assert cmd[cmd.index("--gpus") + 1] == "2,3" and "--nnodes" not in cmd and "--device" not in cmd


def test_launch_env_drops_inherited_launcher_settings():
    base = {"PADDLE_MASTER": "10.0.0.9:1", "PADDLE_TRAINER_ID": "3", "PADDLE_NNODES": "4", "OMP_NUM_THREADS": "4", "HOME": "/h"}
    env = launch_env(2, use_gpu=False, base=base)
    assert not {"PADDLE_MASTER", "PADDLE_TRAINER_ID", "PADDLE_NNODES"} & set(env)
    assert env["OMP_NUM_THREADS"] == "2" and env["HOME"] == "/h"


# -- several nodes ------------------------------------------------------------------------------------


def _slurm_env(**extra) -> dict[str, str]:
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "3", "SLURM_JOB_NODELIST": "gpu[07-08,11]",
           "SLURM_CPUS_PER_TASK": "4"}
    env.update(extra)
    return env


def test_slurm_job_of_several_nodes():
    plan = resolve_launch_plan(_slurm_env(SLURM_GPUS_ON_NODE="4"), gpus=4, cpu_ranks=2)
    assert plan.slurm and plan.nnodes == 3 and plan.world_size == 12
    assert plan.hosts == ("gpu07", "gpu08", "gpu11")
    assert plan.master == f"gpu07:{SLURM_MASTER_PORT_BASE + 4242}"
    assert plan.job_id == "vlretrieval-4242"
    # In the batch script (no step variables) SLURM_NNODES and SLURM_NODELIST are the job's and
    # stand in for the job variables; an explicit port wins.
    env = _slurm_env(SLURM_NNODES="3", SLURM_NODELIST="gpu[07-08,11]")
    del env["SLURM_JOB_NUM_NODES"], env["SLURM_JOB_NODELIST"]
    plan = resolve_launch_plan(env, gpus=0, cpu_ranks=2, master_port=12345)
    assert (plan.nnodes, plan.nproc_per_node, plan.master, plan.inside_step) == (3, 2, "gpu07:12345", False)
    assert "--overlap" not in slurm_launch_command(plan, "logs", [], master="10.1.2.3:5000", python="py", environ=env)


def test_slurm_single_node_job_is_a_single_node_plan():
    plan = resolve_launch_plan(_slurm_env(SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="gpu07"), gpus=0, cpu_ranks=2)
    assert plan == LaunchPlan(nproc_per_node=2, use_gpu=False)


# What a command sees inside `srun -n1` (the executor plugin's step for a job without the mpi
# resource) on the first node of a two-node job: the step variables say one node and one task.
# (A real step of SLURM 22.05 under the plugin's stripped environment sets SLURM_JOB_NODELIST but
# not SLURM_JOB_NUM_NODES; both cases are below.)
TWO_NODE_JOB_FROM_A_ONE_TASK_STEP = {
    "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "node[1-2]",
    "SLURM_NNODES": "1", "SLURM_NODELIST": "node1", "SLURM_NTASKS": "1", "SLURM_NPROCS": "1",
    "SLURM_STEP_ID": "0", "SLURM_STEPID": "0", "SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_NODELIST": "node1",
    "SLURM_STEP_NUM_TASKS": "1", "SLURM_STEP_TASKS_PER_NODE": "1", "SLURM_TASKS_PER_NODE": "1",
    "SLURM_NODEID": "0", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURMD_NODENAME": "node1",
    "SLURM_CPUS_PER_TASK": "4",
}


def test_two_node_job_seen_from_a_one_task_step_is_a_two_node_plan(tmp_path):
    env = dict(TWO_NODE_JOB_FROM_A_ONE_TASK_STEP)
    plan = resolve_launch_plan(env, gpus=0, cpu_ranks=2)
    assert (plan.slurm, plan.inside_step, plan.nnodes, plan.nproc_per_node, plan.world_size) == (True, True, 2, 2, 4)
    assert plan.hosts == ("node1", "node2")
    assert plan.master == f"node1:{SLURM_MASTER_PORT_BASE + 4242}"
    # The srun that starts both nodes' launchers shares the CPUs the enclosing step holds.
    cmd = slurm_launch_command(plan, tmp_path, [], master="10.1.2.3:5000", python="py", environ=env)
    assert cmd[:8] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                       "--cpu-bind=none", "--overlap", "--cpus-per-task=4"]
    assert "--nnodes 2 --master 10.1.2.3:5000" in cmd[-1]
    # The job's node list alone is enough: its length is the node count, whatever SLURM_NNODES says.
    del env["SLURM_JOB_NUM_NODES"]
    assert resolve_launch_plan(env, gpus=0, cpu_ranks=2) == plan
    # With the job variables gone and nothing to restore them, the step's one node is not taken
    # for the job's: the plan is refused, naming what it saw.
    del env["SLURM_JOB_NODELIST"]
    with pytest.raises(ConfigError, match=r"inside a SLURM job step.*SLURM_NNODES=1, SLURM_NODELIST=node1.*"
                                          r"SLURM_JOB_NUM_NODES and SLURM_JOB_NODELIST are not set"):
        resolve_launch_plan(env, gpus=0, cpu_ranks=2)
    # Nor is a step's node list taken for the job's.
    env["SLURM_JOB_NUM_NODES"] = "2"
    with pytest.raises(ConfigError, match=r"SLURM_JOB_NODELIST is not set in a SLURM job of 2 nodes \(inside a job step"):
        resolve_launch_plan(env, gpus=0, cpu_ranks=2)


def test_one_node_job_stays_one_node_in_a_step_and_in_the_batch_script():
    step = {**TWO_NODE_JOB_FROM_A_ONE_TASK_STEP, "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "node1"}
    assert resolve_launch_plan(step, gpus=0, cpu_ranks=2) == LaunchPlan(nproc_per_node=2, use_gpu=False)
    batch = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "1", "SLURM_NODELIST": "node1", "SLURM_NTASKS": "1"}
    assert resolve_launch_plan(batch, gpus=0, cpu_ranks=2) == LaunchPlan(nproc_per_node=2, use_gpu=False)
    # A job whose variables disagree is refused rather than run on one node.
    with pytest.raises(ConfigError, match="names 2 hosts, the job has 1 nodes"):
        resolve_launch_plan({**step, "SLURM_JOB_NODELIST": "node[1-2]"}, gpus=0, cpu_ranks=2)
    with pytest.raises(ConfigError, match="names 2 hosts, the job has 3 nodes"):
        resolve_launch_plan(_slurm_env(SLURM_JOB_NODELIST="gpu[07-08]"), gpus=0, cpu_ranks=2)


def test_nodes_from_scontrol_when_the_job_step_hid_them(monkeypatch, tmp_path):
    line = ("JobId=4242 JobName=rule_finetune UserId=u(1) Comment=rule_finetune_wildcards_demo NumNodes=3 "
            "NumCPUs=12 NumTasks=3 CPUs/Task=4 ReqNodeList=(null) NodeList=gpu[07-08,11] BatchHost=gpu07")
    found = parse_scontrol_job(line)
    assert found == {"SLURM_JOB_NUM_NODES": "3", "SLURM_JOB_NODELIST": "gpu[07-08,11]"}
    plan = resolve_launch_plan({"SLURM_JOB_ID": "4242", **found}, gpus=0, cpu_ranks=2)
    assert plan.slurm and plan.hosts == ("gpu07", "gpu08", "gpu11")
    assert parse_scontrol_job("JobId=1 NumNodes=2-2 NodeList=(null)") == {"SLURM_JOB_NUM_NODES": "2"}
    # Nothing to ask when SLURM's variables are there, or when there is no scontrol.
    env = _slurm_env()
    assert complete_slurm_environ(env) == env
    monkeypatch.setenv("PATH", str(tmp_path))
    assert complete_slurm_environ({"SLURM_JOB_ID": "1"}) == {"SLURM_JOB_ID": "1"}


def test_slurm_command_starts_one_launcher_per_node(tmp_path):
    plan = resolve_launch_plan(_slurm_env(), gpus=0, cpu_ranks=2)
    log_dir = tmp_path / "launch logs"
    cmd = slurm_launch_command(plan, log_dir, ["--model-dir", "a b", "--hparams-json", '{"x": 1}'],
                               master="10.1.2.3:5000", python="py", environ=_slurm_env())
    assert cmd[:7] == ["srun", "--nodes=3", "--ntasks=3", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                       "--cpu-bind=none", "--cpus-per-task=4"]
    assert cmd[7:9] == ["sh", "-c"]
    # What each node's shell runs: its own node rank and log directory, every argument intact.
    script = cmd[9].replace("exec ", "exec printf '%s\\n' ", 1)
    out = subprocess.run(["sh", "-c", script], env={"SLURM_NODEID": "2", "PATH": os.environ["PATH"]},
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == [
        "py", "-m", "paddle.distributed.launch", "--log_dir", f"{log_dir}/node2", "--max_restart", "0",
        "--nnodes", "3", "--master", "10.1.2.3:5000", "--rank", "2", "--job_id", "vlretrieval-4242",
        "--nproc_per_node", "2", "py", "-m", "vlretrieval.training.finetune",
        "--model-dir", "a b", "--hparams-json", '{"x": 1}', "--device", "cpu",
    ]


def test_slurm_gpu_nodes_take_their_own_visible_gpus(tmp_path):
    plan = resolve_launch_plan(_slurm_env(CUDA_VISIBLE_DEVICES="2,3"), gpus=2, cpu_ranks=2)
    cmd = slurm_launch_command(plan, tmp_path, [], master="10.1.2.3:5000", python="py", environ={})
    # Node 0's labels (2,3) need not be node 1's: each launcher uses its node's first two GPUs.
    assert "--gpus" not in cmd[-1] and "--nproc_per_node 2" in cmd[-1] and "--device" not in cmd[-1]
    assert "--cpus-per-task" not in " ".join(cmd)


def test_manual_nodes_need_master_and_rank(tmp_path):
    plan = resolve_launch_plan({}, gpus=0, cpu_ranks=1, nnodes=2, node_rank=1, master="127.0.0.1:6000")
    assert (plan.nnodes, plan.node_rank, plan.master, plan.slurm, plan.world_size) == (2, 1, "127.0.0.1:6000", False, 2)
    cmd = launch_command(1, False, tmp_path, [], python="py", nnodes=2, node_rank=1, master="127.0.0.1:6000")
    assert cmd[3:13] == ["--log_dir", str(tmp_path / "node1"), "--max_restart", "0",
                         "--nnodes", "2", "--master", "127.0.0.1:6000", "--rank", "1"]
    # Explicit options win over a SLURM allocation (a hand-made run inside a salloc).
    assert not resolve_launch_plan(_slurm_env(), 0, 1, nnodes=2, node_rank=0, master="h:1").slurm
    with pytest.raises(ConfigError, match="--master HOST:PORT and --node-rank"):
        resolve_launch_plan({}, gpus=0, cpu_ranks=1, nnodes=2, node_rank=0)
    with pytest.raises(ConfigError, match="node rank must be in 0..1"):
        resolve_launch_plan({}, gpus=0, cpu_ranks=1, nnodes=2, node_rank=2, master="h:1")
    with pytest.raises(ConfigError, match="HOST:PORT"):
        resolve_launch_plan({}, gpus=0, cpu_ranks=1, nnodes=2, node_rank=0, master="h")


def test_master_endpoint_is_an_address():
    assert master_endpoint("127.0.0.1:6000") == "127.0.0.1:6000"
    address = master_endpoint(f"{socket.gethostname()}:6000")
    assert address.split(":")[0].count(".") == 3 and address.endswith(":6000")


# -- two nodes on this machine ------------------------------------------------------------------------

HPARAMS = {
    "per_device_train_batch_size": 8,
    "learning_rate": 1e-3,
    "warmup_steps": 1,
    "max_steps": 3,
    "save_steps": 100,
    "hflip": False,
    "seed": 11,
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from vlretrieval.data.demo import DemoSpec, write_demo_archive
    from vlretrieval.data.lmdb_store import serialize_split
    from vlretrieval.models.prepare import prepare_initial_model, vocab_texts_from_split

    root = tmp_path_factory.mktemp("multinode")
    write_demo_archive(DemoSpec(name="demo_mn", seed=5, sizes={"train": 8}), root / "demo_mn.zip")
    with zipfile.ZipFile(root / "demo_mn.zip") as archive:
        archive.extractall(root / "sources")
    split = root / "lmdb" / "train"
    serialize_split("raw_tsv", root / "sources", "train", split, entry={"root": "demo_mn"}, progress=False)
    model_dir = prepare_initial_model("ernie_vil", "tiny", root / "init", vocab_texts=vocab_texts_from_split(split), seed=0)
    return {"root": root, "split": split, "model_dir": model_dir}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _logs(log_dir: Path) -> str:
    return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(log_dir.rglob("workerlog.*")))


def _script_cmd(tiny, work: Path, final: Path, train_log: Path, *extra: str) -> list[str]:
    return [
        sys.executable, str(REPO / "workflow_scripts" / "finetune.py"),
        "--model-dir", str(tiny["model_dir"]), "--train-data", str(tiny["split"]),
        "--work-dir", str(work), "--final-dir", str(final), "--train-log", str(train_log),
        "--gpus", "0", "--hparams", json.dumps(HPARAMS), *extra,
    ]


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    # The same threads per rank in both runs, so that the comparison is about the topology alone.
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def _losses(train_log: Path) -> list[float]:
    records = [json.loads(line) for line in train_log.read_text(encoding="utf-8").splitlines()]
    return [r["loss"] for r in records if r["event"] == "train"]


@pytest.mark.slow
def test_two_nodes_train_like_one_node_with_two_ranks(tiny):
    root = tiny["root"]
    timeout = 240

    # One node, two CPU ranks: the reference.
    single = subprocess.run(
        _script_cmd(tiny, root / "work_single", root / "final_single", root / "single_log.jsonl", "--ranks", "2"),
        env=_env(2), capture_output=True, text=True, timeout=timeout,
    )
    assert single.returncode == 0, f"{single.stderr[-3000:]}\n{_logs(root / 'work_single' / 'launch_logs')}"

    # Two "nodes", one CPU rank each, rendezvous at 127.0.0.1; both share the work directory as
    # nodes on a cluster filesystem do.
    master = f"127.0.0.1:{_free_port()}"
    work, final = root / "work_multi", root / "final_multi"
    nodes = [
        subprocess.Popen(
            _script_cmd(tiny, work, final, root / f"multi_log_{rank}.jsonl",
                        "--ranks", "1", "--nnodes", "2", "--node-rank", str(rank), "--master", master),
            env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for rank in (0, 1)
    ]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=timeout))
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    for rank, (node, (_, err)) in enumerate(zip(nodes, outputs)):
        # Exit status 0 on both nodes: the ranks ended through exit_after_peers, not a gloo abort.
        assert node.returncode == 0, f"node {rank} failed:\n{err[-3000:]}\n{_logs(work / 'launch_logs')}"
    assert sorted(p.relative_to(work / "launch_logs").as_posix() for p in (work / "launch_logs").rglob("workerlog.*")) == [
        "node0/workerlog.0", "node1/workerlog.0"
    ]
    # Only node 0 owns the results.
    assert (root / "multi_log_0.jsonl").is_file() and not (root / "multi_log_1.jsonl").exists()

    records = [json.loads(line) for line in (root / "multi_log_0.jsonl").read_text().splitlines()]
    assert records[0]["event"] == "start" and records[0]["world_size"] == 2 and records[0]["global_batch_size"] == 16
    single_losses, multi_losses = _losses(root / "single_log.jsonl"), _losses(root / "multi_log_0.jsonl")
    assert len(single_losses) == len(multi_losses) == HPARAMS["max_steps"]
    # Same world size, data order, seeds and collectives: the losses agree to the last bit.
    assert multi_losses == single_losses, (multi_losses, single_losses)

    import paddle

    single_weights = paddle.load(str(root / "final_single" / "model_state.pdparams"))
    multi_weights = paddle.load(str(final / "model_state.pdparams"))
    assert sorted(single_weights) == sorted(multi_weights)
    for name, value in single_weights.items():
        np.testing.assert_array_equal(np.asarray(multi_weights[name]), np.asarray(value), err_msg=name)
