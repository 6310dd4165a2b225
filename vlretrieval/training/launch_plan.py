"""Where the ranks of a fine-tuning job go, from its configuration and its environment.

:func:`resolve_launch_plan` decides the ranks: one per GPU the node shows (``CUDA_VISIBLE_DEVICES``
or SLURM's GPU variables) or the configured CPU ranks, and the nodes. On several nodes every node
runs its own launcher with ``--nnodes N --master IP:PORT --rank NODE``; in a SLURM job of several
nodes the process on the first node (the batch script, or a one-node step inside the job) starts
them all with one ``srun`` (:func:`~vlretrieval.training.launcher.slurm_launch_command`), and by
hand each node is started with its own node rank. The nodes are the job's allocation
(``SLURM_JOB_*``), never a step's. SLURM host lists and ``scontrol`` output are parsed here too.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Mapping

from ..errors import ConfigError


@dataclass(frozen=True)
class LaunchPlan:
    """Where the ranks of a fine-tuning run go: ``nproc_per_node`` ranks on each of ``nnodes`` nodes.

    ``devices`` are the GPU labels of this node (empty on CPU). With several nodes, ``master`` is the
    rendezvous ``host:port`` (node 0's), ``node_rank`` this node's index, and ``slurm`` says that
    this process runs in the SLURM job on the first node and starts every node's launcher itself
    with ``srun`` (``node_rank`` is then each node's ``SLURM_NODEID``); ``inside_step`` that it
    runs inside a job step (``srun -n1``) rather than in the batch script, so that ``srun`` must
    share the resources the enclosing step holds.
    """

    nproc_per_node: int
    use_gpu: bool
    devices: tuple[str, ...] = ()
    nnodes: int = 1
    node_rank: int = 0
    master: str | None = None
    hosts: tuple[str, ...] = ()
    slurm: bool = False
    job_id: str | None = None
    inside_step: bool = False

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


#: Variables SLURM sets in a job step (what ``srun`` starts). Inside one, ``SLURM_NNODES``,
#: ``SLURM_NODELIST`` and ``SLURM_NTASKS`` describe the step, not the job: an ``srun -n1`` step
#: of a two-node job says one node. Only ``SLURM_JOB_*`` describe the job's allocation there.
SLURM_STEP_MARKERS = ("SLURM_STEP_ID", "SLURM_STEPID", "SLURM_STEP_NUM_NODES", "SLURM_STEP_NODELIST",
                      "SLURM_STEP_NUM_TASKS")

#: Default rendezvous port of a multi-node SLURM job: this plus the job id modulo 20000, so jobs
#: that share a first node are unlikely to collide and every node computes the same port.
SLURM_MASTER_PORT_BASE = 29500


def expand_hostlist(text: str) -> list[str]:
    """The host names of a SLURM host list: ``node[01-03,07],gpu-a[1-2]-x`` -> node01, ..., gpu-a2-x.

    Handles the forms ``scontrol show hostnames`` expands: comma-separated entries, each with any
    number of bracket groups of numbers and zero-padded ranges. Raises ValueError on anything else.
    """
    hosts: list[str] = []
    for entry in _split_top_level(text.strip()):
        hosts.extend(_expand_host_entry(entry))
    if not hosts:
        raise ValueError(f"empty host list {text!r}")
    return hosts


def _split_top_level(text: str) -> list[str]:
    entries, depth, current = [], 0, ""
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in host list {text!r}")
        if char == "," and depth == 0:
            entries.append(current)
            current = ""
        else:
            current += char
    if depth != 0:
        raise ValueError(f"unbalanced '[' in host list {text!r}")
    entries.append(current)
    return [entry.strip() for entry in entries if entry.strip()]


def _expand_host_entry(entry: str) -> list[str]:
    match = re.match(r"^([^\[\]]*)\[([^\[\]]+)\](.*)$", entry)
    if match is None:
        if "[" in entry or "]" in entry or not entry:
            raise ValueError(f"cannot parse host list entry {entry!r}")
        return [entry]
    prefix, ranges, rest = match.groups()
    numbers = []
    for part in ranges.split(","):
        bounds = part.strip().split("-")
        if len(bounds) == 1 and bounds[0].isdigit():
            numbers.append(bounds[0])
        elif len(bounds) == 2 and all(b.isdigit() for b in bounds) and int(bounds[0]) <= int(bounds[1]):
            width = len(bounds[0])
            numbers.extend(str(n).zfill(width) for n in range(int(bounds[0]), int(bounds[1]) + 1))
        else:
            raise ValueError(f"cannot parse range {part!r} in host list entry {entry!r}")
    tails = _expand_host_entry(rest) if rest else [""]
    return [f"{prefix}{number}{tail}" for number in numbers for tail in tails]


def _count_ids(text: str) -> list[str]:
    """``"0,1"``, ``"0-3"`` or ``"0-1,4"`` -> the listed ids (SLURM's GPU id lists)."""
    ids: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        low, _, high = part.partition("-")
        if high and low.isdigit() and high.isdigit():
            ids.extend(str(n) for n in range(int(low), int(high) + 1))
        else:
            ids.append(part)
    return ids


def visible_gpus(environ: Mapping[str, str]) -> tuple[list[str] | None, str]:
    """The GPU labels the environment gives this node, and where they come from.

    ``CUDA_VISIBLE_DEVICES`` first (the labels the launcher's ``--gpus`` refers to; SLURM sets it
    for a job with GPUs), then SLURM's ``SLURM_STEP_GPUS`` / ``SLURM_JOB_GPUS`` (physical ids, which
    are the labels when nothing restricts visibility) and ``SLURM_GPUS_ON_NODE`` (a count). ``None``
    when the environment says nothing about GPUs.
    """
    cvd = environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        cvd = cvd.strip()
        # "NoDevFiles" is what SLURM writes when a job has no GPU; "-1" hides every device.
        if cvd in ("", "-1", "NoDevFiles"):
            return [], "CUDA_VISIBLE_DEVICES"
        if cvd != "all":
            return [label.strip() for label in cvd.split(",") if label.strip()], "CUDA_VISIBLE_DEVICES"
    for name in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        if environ.get(name, "").strip():
            return _count_ids(environ[name]), name
    on_node = _int_or_none(environ.get("SLURM_GPUS_ON_NODE"))
    if on_node is not None:
        return [str(i) for i in range(on_node)], "SLURM_GPUS_ON_NODE"
    return None, ""


def parse_scontrol_job(text: str) -> dict[str, str]:
    """``SLURM_JOB_NUM_NODES`` and ``SLURM_JOB_NODELIST`` from ``scontrol show job -o <id>`` output."""
    found = {}
    nodes = re.search(r"(?:^|\s)NumNodes=(\d+)", text)
    nodelist = re.search(r"(?:^|\s)NodeList=(\S+)", text)
    if nodes:
        found["SLURM_JOB_NUM_NODES"] = nodes.group(1)
    if nodelist and nodelist.group(1) != "(null)":
        found["SLURM_JOB_NODELIST"] = nodelist.group(1)
    return found


def complete_slurm_environ(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` with the job's nodes filled in from ``scontrol`` when SLURM's variables are missing.

    snakemake-executor-plugin-slurm's job step removes every ``SLURM_*`` variable but the job id
    (and a few others) before it runs a job's command, so the command cannot see how many nodes its
    job has; the controller can tell. Without ``scontrol`` the environment is returned unchanged.
    """
    env = dict(environ)
    job_id = env.get("SLURM_JOB_ID")
    # The job's node list alone gives its nodes; SLURM_NNODES is no substitute, since inside a
    # step it counts the step's nodes.
    if not job_id or env.get("SLURM_JOB_NODELIST"):
        return env
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return env
    try:
        out = subprocess.run([scontrol, "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"SLURM job {job_id}: scontrol failed ({exc})", file=sys.stderr)
        return env
    if out.returncode != 0:
        print(f"SLURM job {job_id}: scontrol failed ({out.stderr.strip()})", file=sys.stderr)
        return env
    for key, value in parse_scontrol_job(out.stdout).items():
        env.setdefault(key, value)
    return env


def in_slurm_step(environ: Mapping[str, str]) -> bool:
    """Whether this process runs inside a SLURM job step (see :data:`SLURM_STEP_MARKERS`)."""
    return any(environ.get(name, "").strip() for name in SLURM_STEP_MARKERS)


def _slurm_job_nodes(environ: Mapping[str, str], inside_step: bool) -> tuple[int, tuple[str, ...] | None]:
    """The number of nodes of the SLURM job and their host names (``None`` when unknown).

    Read from the job's own variables: ``SLURM_JOB_NUM_NODES`` and ``SLURM_JOB_NODELIST``. Only
    in the batch script, where they describe the job too, do ``SLURM_NNODES`` and
    ``SLURM_NODELIST`` stand in for them; inside a step, a job whose node count is unknown is an
    error rather than a guess of one node.
    """
    nodelist_name = "SLURM_JOB_NODELIST"
    nodelist = environ.get(nodelist_name, "").strip()
    if not nodelist and not inside_step:
        nodelist_name = "SLURM_NODELIST"
        nodelist = environ.get(nodelist_name, "").strip()
    hosts: tuple[str, ...] | None = None
    nodes = _int_or_none(environ.get("SLURM_JOB_NUM_NODES"))
    if nodelist:
        try:
            hosts = tuple(expand_hostlist(nodelist))
        except ValueError as exc:
            if nodes != 1:  # a single node needs no host names
                raise ConfigError(f"{nodelist_name}: {exc}") from None
    if nodes is None and hosts is not None:
        nodes = len(hosts)
    if nodes is None and not inside_step:
        nodes = _int_or_none(environ.get("SLURM_NNODES")) or 1
    if nodes is None:
        step = ", ".join(f"{name}={environ[name]}" for name in ("SLURM_NNODES", "SLURM_NODELIST") if name in environ)
        raise ConfigError(
            "this runs inside a SLURM job step, whose variables describe the step and not the job"
            + (f" ({step})" if step else "")
            + ", and the job's allocation is unknown: SLURM_JOB_NUM_NODES and SLURM_JOB_NODELIST are not set "
            "and scontrol could not supply them. Run it where those variables or scontrol are available, "
            "so that a job of several nodes is not trained on one"
        )
    if hosts is not None and len(hosts) != nodes:
        raise ConfigError(f"{nodelist_name} {nodelist!r} names {len(hosts)} hosts, the job has {nodes} nodes")
    return nodes, hosts


def resolve_launch_plan(
    environ: Mapping[str, str],
    gpus: int,
    cpu_ranks: int,
    *,
    nnodes: int | None = None,
    node_rank: int | None = None,
    master: str | None = None,
    master_port: int | None = None,
) -> LaunchPlan:
    """The ranks of a fine-tuning job from its configuration and its environment (``os.environ``).

    Ranks on a node: with ``gpus > 0`` one per GPU, the first ``gpus`` of those the environment
    shows (:func:`visible_gpus`); fewer than ``gpus`` is a :class:`ConfigError`, and with no GPU
    information at all the labels ``0..gpus-1`` are assumed. With ``gpus == 0``, ``cpu_ranks`` CPU
    ranks.

    Nodes: explicit ``nnodes`` / ``node_rank`` / ``master`` (``host:port``) describe a run started
    by hand on every node. Otherwise a SLURM allocation of several nodes makes a SLURM plan: the
    nodes of the job (``SLURM_JOB_NUM_NODES``, ``SLURM_JOB_NODELIST``; see
    :func:`complete_slurm_environ` for a step that hid them), the first one as master, on
    ``master_port`` or a port derived from the job id. The job's allocation counts, not the step's:
    inside an ``srun -n1`` step of a two-node job, ``SLURM_NNODES=1`` and ``SLURM_NODELIST``
    describe the step, and the plan is still the job's two nodes.
    """
    if gpus < 0 or cpu_ranks < 1:
        raise ConfigError(f"finetune needs gpus >= 0 and cpu_ranks >= 1, got gpus={gpus}, cpu_ranks={cpu_ranks}")
    devices: tuple[str, ...] = ()
    if gpus > 0:
        labels, source = visible_gpus(environ)
        if labels is None:
            labels = [str(i) for i in range(gpus)]
        elif len(labels) < gpus:
            raise ConfigError(
                f"finetune.gpus is {gpus}, but this node has {len(labels)} GPU(s) "
                f"({source}={environ.get(source, '')!r}); request {gpus} GPUs per node from the "
                "scheduler or lower finetune.gpus"
            )
        devices = tuple(labels[:gpus])
    per_node = gpus if gpus > 0 else cpu_ranks

    if nnodes is not None or master is not None or node_rank is not None:
        nnodes = 1 if nnodes is None else nnodes
        if nnodes < 1:
            raise ConfigError(f"nnodes must be >= 1, got {nnodes}")
        if nnodes == 1:
            if node_rank not in (None, 0):
                raise ConfigError(f"node rank {node_rank} given for a single-node run")
            return LaunchPlan(per_node, gpus > 0, devices)
        if master is None or node_rank is None:
            raise ConfigError("a run on several nodes started by hand needs --master HOST:PORT and --node-rank on every node")
        if not 0 <= node_rank < nnodes:
            raise ConfigError(f"node rank must be in 0..{nnodes - 1}, got {node_rank}")
        _split_endpoint(master)
        return LaunchPlan(per_node, gpus > 0, devices, nnodes=nnodes, node_rank=node_rank, master=master)

    if not environ.get("SLURM_JOB_ID"):
        return LaunchPlan(per_node, gpus > 0, devices)
    inside_step = in_slurm_step(environ)
    job_nodes, hosts = _slurm_job_nodes(environ, inside_step)
    if job_nodes <= 1:
        return LaunchPlan(per_node, gpus > 0, devices)
    if hosts is None:
        raise ConfigError(f"SLURM_JOB_NODELIST is not set in a SLURM job of {job_nodes} nodes"
                          + (" (inside a job step SLURM_NODELIST lists only the step's nodes)" if inside_step else ""))
    job_id = environ["SLURM_JOB_ID"]
    port = master_port or SLURM_MASTER_PORT_BASE + (_int_or_none(job_id.split("_")[0]) or 0) % 20000
    return LaunchPlan(per_node, gpus > 0, devices, nnodes=job_nodes, node_rank=0, master=f"{hosts[0]}:{port}",
                      hosts=hosts, slurm=True, job_id=f"vlretrieval-{job_id}", inside_step=inside_step)


def _split_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"master must be HOST:PORT, got {endpoint!r}")
    return host, int(port)


def master_endpoint(master: str) -> str:
    """``host:port`` with the host as the IPv4 address ``paddle.distributed.launch`` needs.

    The launcher serves the rendezvous only on the node whose own address (its host name's fully
    qualified name, resolved) equals the master's, or when the master is 127.0.0.1; a host name
    would leave every node waiting. This machine's name is resolved the way the launcher resolves it.
    """
    import socket

    host, port = _split_endpoint(master)
    local = socket.gethostname()
    try:
        if host in (local, local.split(".")[0], socket.getfqdn(local)):
            address = socket.gethostbyname(socket.getfqdn(local))
        else:
            address = socket.gethostbyname(host)
    except OSError as exc:
        raise ConfigError(f"cannot resolve the master host {host!r}: {exc}") from None
    return f"{address}:{port}"


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text else None
    except ValueError:
        return None
