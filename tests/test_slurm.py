"""Slurm defaults: hostlist expansion and what an srun step fills in."""
import logging

import pytest
from helpers import clean_env, run_launcher

from launcher import cli
from launcher.slurm import apply_slurm_defaults, expand_hostlist

pytestmark = pytest.mark.usefixtures("isolated_environment")


@pytest.mark.parametrize(
    "hostlist, hosts",
    [
        ("node1", ["node1"]),
        ("a,b,c", ["a", "b", "c"]),
        ("gpu[01-04,07],cpu3", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07", "cpu3"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("n[008-010]", ["n008", "n009", "n010"]),
        ("node[1-2]-ib[0-1]", ["node1-ib0", "node1-ib1", "node2-ib0", "node2-ib1"]),
        ("rack[1,3]-n[1-2],login", ["rack1-n1", "rack1-n2", "rack3-n1", "rack3-n2", "login"]),
        ("[1-2]x", ["1x", "2x"]),
        ("gpu[5]", ["gpu5"]),
        ("a.b-c_d[1-2].example.org", ["a.b-c_d1.example.org", "a.b-c_d2.example.org"]),
    ],
)
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize(
    "hostlist, problem",
    [
        ("", "empty host name"),
        ("a,,b", "empty host name"),
        ("gpu[01-04", "never closed"),
        ("gpu01-04]", "without '\\['"),
        ("gpu[1-[2]]", "inside brackets"),
        ("gpu[]", "not numbers and ranges"),
        ("gpu[a-c]", "not numbers and ranges"),
        ("gpu[1-2-3]", "not numbers and ranges"),
        ("gpu[1,]", "not numbers and ranges"),
        ("gpu[4-1]", "runs backwards"),
        ("gpu 1", "unexpected character"),
    ],
)
def test_malformed_hostlist(hostlist, problem):
    with pytest.raises(ValueError, match=problem):
        expand_hostlist(hostlist)


SRUN_STEP = {
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_ID": "0",
    "SLURM_STEP_NUM_NODES": "4",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_STEP_NODELIST": "gpu[03-05],cpu1",
    "SLURM_JOB_NODELIST": "gpu[01-09],cpu[1-4]",
    "SLURM_NNODES": "4",
    "SLURM_JOB_NUM_NODES": "13",
    "SLURM_NODEID": "2",
}


def slurm_args(argv, environ, monkeypatch):
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    args = cli.parse_args(argv + ["train.py"])
    return args, apply_slurm_defaults(args, environ)


def test_srun_step_fills_nnodes_and_c10d_rendezvous_on_the_first_host(monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger="launcher"):
        args, taken = slurm_args([], SRUN_STEP, monkeypatch)
    assert (args.nnodes, args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id) == ("4", "c10d", "gpu03:29400", "4242")
    assert args.node_rank == 0  # the c10d rendezvous assigns ranks
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1
    assert "Slurm job 4242 step 0" in messages[0] and "SLURM_STEP_NUM_NODES" in messages[0]
    assert "gpu03:29400 (first host of SLURM_STEP_NODELIST)" in messages[0]
    assert len(taken) == 3


def test_job_variables_serve_when_step_ones_are_missing(monkeypatch):
    environ = {k: v for k, v in SRUN_STEP.items() if not k.startswith("SLURM_STEP_") or k == "SLURM_STEP_ID"}
    args, _ = slurm_args([], environ, monkeypatch)
    assert (args.nnodes, args.rdzv_endpoint) == ("4", "gpu01:29400")


def test_flags_and_pet_variables_win(monkeypatch):
    monkeypatch.setenv("PET_RDZV_ID", "mine")
    flags = ["--nnodes=2:8", "--rdzv-endpoint=head:1234", "--rdzv-backend=c10d"]
    args, taken = slurm_args(flags, SRUN_STEP, monkeypatch)
    assert (args.nnodes, args.rdzv_endpoint, args.rdzv_id) == ("2:8", "head:1234", "mine")
    assert taken == []


def test_explicit_c10d_without_endpoint_gets_the_first_host(monkeypatch):
    args, _ = slurm_args(["--rdzv-backend=c10d"], SRUN_STEP, monkeypatch)
    assert args.rdzv_endpoint == "gpu03:29400"


def test_etcd_backend_keeps_its_own_endpoint(monkeypatch):
    args, _ = slurm_args(["--rdzv-backend=etcd"], SRUN_STEP, monkeypatch)
    assert (args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id) == ("etcd", "", "4242")


@pytest.mark.parametrize("flag", ["--rdzv-backend=static", "--master-port=29555"])
def test_static_rendezvous_takes_master_addr_and_node_rank(monkeypatch, flag):
    args, _ = slurm_args([flag], SRUN_STEP, monkeypatch)
    assert (args.rdzv_backend, args.master_addr, args.node_rank) == ("static", "gpu03", 2)


def test_static_keeps_the_users_master_addr_and_node_rank(monkeypatch):
    args, _ = slurm_args(["--master-addr=head", "--node-rank=0"], SRUN_STEP, monkeypatch)
    assert (args.rdzv_backend, args.master_addr, args.node_rank) == ("static", "head", 0)


def test_one_node_step_keeps_torchruns_single_node_rule(monkeypatch):
    environ = dict(SRUN_STEP, SLURM_STEP_NUM_NODES="1", SLURM_STEP_NUM_TASKS="1")
    args, taken = slurm_args([], environ, monkeypatch)
    assert (args.nnodes, args.rdzv_backend, args.rdzv_endpoint) == ("1", "static", "")
    config, _, _ = cli.prepare_launch(args)
    assert (config.rdzv_backend, config.rdzv_endpoint) == ("c10d", "localhost:0")


def test_batch_script_without_srun_takes_nothing(monkeypatch):
    environ = {k: v for k, v in SRUN_STEP.items() if k != "SLURM_STEP_ID"}
    args, taken = slurm_args([], environ, monkeypatch)
    assert (args.nnodes, taken) == ("1:1", [])


def test_several_tasks_per_node_is_an_error(monkeypatch):
    with pytest.raises(ValueError, match="8 tasks on 4 node.*--ntasks-per-node=1"):
        slurm_args([], dict(SRUN_STEP, SLURM_STEP_NUM_TASKS="8"), monkeypatch)


@pytest.mark.parametrize(
    "name, value, problem",
    [
        ("SLURM_STEP_NUM_NODES", "four", "SLURM_STEP_NUM_NODES='four' is not a number >= 1"),
        ("SLURM_STEP_NODELIST", "gpu[03-", "SLURM_STEP_NODELIST: malformed host list"),
    ],
)
def test_bad_slurm_values_name_the_variable(monkeypatch, name, value, problem):
    with pytest.raises(ValueError, match=problem.replace("[", "\\[")):
        slurm_args([], dict(SRUN_STEP, **{name: value}), monkeypatch)


def test_standalone_ignores_slurm(monkeypatch):
    for name, value in SRUN_STEP.items():
        monkeypatch.setenv(name, value)
    config, _, _ = cli.prepare_launch(cli.parse_args(["--standalone", "train.py"]))
    assert (config.min_nodes, config.rdzv_endpoint) == (1, "localhost:0")


def test_prepare_launch_under_srun(monkeypatch):
    for name, value in SRUN_STEP.items():
        monkeypatch.setenv(name, value)
    config, _, _ = cli.prepare_launch(cli.parse_args(["train.py"]))
    assert (config.min_nodes, config.max_nodes, config.rdzv_backend) == (4, 4, "c10d")
    assert (config.rdzv_endpoint, config.run_id) == ("gpu03:29400", "4242")


def test_cli_malformed_nodelist_is_one_line_exit_2():
    result = run_launcher("train.py", env=clean_env(**dict(SRUN_STEP, SLURM_STEP_NODELIST="gpu[01-")))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "launcher: error: SLURM_STEP_NODELIST: malformed host list 'gpu[01-': '[' is never closed "
        "(see launcher --help)"
    ]
