"""The command line: torchrun's options, PET_ defaults, validation, worker commands, rendezvous rules.

Everything here is parsed in-process or run without launching workers; the
launches themselves are in test_cli_launch.py.
"""
import json
import logging
import os
import re
import subprocess
import sys
import uuid

import pytest
from helpers import WORKERS, clean_env, launcher_imports, run_launcher

from launcher import cli
from launcher.rendezvous.options import parse_min_max_nnodes, parse_rdzv_conf

pytestmark = pytest.mark.usefixtures("isolated_environment")


def parse(*argv):
    return cli.parse_args([*argv, "train.py"])


def prepare(*argv):
    return cli.prepare_launch(parse(*argv))


# Every option: spellings, PET_ defaults, torchrun parity ------------------------------------------

# (dest, spellings, a value to give, what the parsed Namespace holds)
OPTIONS = [
    ("nnodes", ["--nnodes"], "2:4", "2:4"),
    ("nproc_per_node", ["--nproc-per-node", "--nproc_per_node"], "3", "3"),
    ("rdzv_backend", ["--rdzv-backend", "--rdzv_backend"], "c10d", "c10d"),
    ("rdzv_endpoint", ["--rdzv-endpoint", "--rdzv_endpoint"], "head:1234", "head:1234"),
    ("rdzv_id", ["--rdzv-id", "--rdzv_id"], "job7", "job7"),
    ("rdzv_conf", ["--rdzv-conf", "--rdzv_conf"], "timeout=5,join_timeout=9", "timeout=5,join_timeout=9"),
    ("max_restarts", ["--max-restarts", "--max_restarts"], "3", 3),
    ("monitor_interval", ["--monitor-interval", "--monitor_interval"], "2.5", 2.5),
    ("start_method", ["--start-method", "--start_method"], "fork", "fork"),
    ("event_log_handler", ["--event-log-handler", "--event_log_handler"], "console", "console"),
    ("role", ["--role"], "trainer", "trainer"),
    ("log_dir", ["--log-dir", "--log_dir"], "/tmp/launcher-logs", "/tmp/launcher-logs"),
    ("redirects", ["-r", "--redirects"], "3", "3"),
    ("tee", ["-t", "--tee"], "0:1,1:2", "0:1,1:2"),
    ("local_ranks_filter", ["--local-ranks-filter", "--local_ranks_filter"], "0,2", "0,2"),
    ("duplicate_stdout_filters", ["--duplicate-stdout-filters", "--duplicate_stdout_filters"], "a,,b,c", ["a,b", "c"]),
    ("duplicate_stderr_filters", ["--duplicate-stderr-filters", "--duplicate_stderr_filters"], "loss", ["loss"]),
    ("node_rank", ["--node-rank", "--node_rank"], "1", 1),
    ("master_addr", ["--master-addr", "--master_addr"], "[::1]", "[::1]"),
    ("master_port", ["--master-port", "--master_port"], "1234", 1234),
    ("local_addr", ["--local-addr", "--local_addr"], "fe80::2", "fe80::2"),
    ("logs_specs", ["--logs-specs", "--logs_specs"], "default", "default"),
    ("numa_binding", ["--numa-binding", "--numa_binding"], "socket", "socket"),
    ("signals_to_handle", ["--signals-to-handle", "--signals_to_handle"], "SIGUSR1,SIGTERM", "SIGUSR1,SIGTERM"),
    ("shutdown_timeout", ["--shutdown-timeout", "--shutdown_timeout"], "7", 7),
    ("python", ["--python"], sys.executable, sys.executable),
]
FLAGS = [
    ("standalone", ["--standalone"]),
    ("module", ["-m", "--module"]),
    ("no_python", ["--no-python", "--no_python"]),
    ("run_path", ["--run-path", "--run_path"]),
    ("virtual_local_rank", ["--virtual-local-rank", "--virtual_local_rank"]),
]


@pytest.mark.parametrize(
    "dest, spelling, value, parsed",
    [(dest, spelling, value, parsed) for dest, spellings, value, parsed in OPTIONS for spelling in spellings],
)
def test_option_spellings(dest, spelling, value, parsed):
    assert getattr(parse(spelling, value), dest) == parsed
    if spelling.startswith("--"):
        assert getattr(parse(f"{spelling}={value}"), dest) == parsed


@pytest.mark.parametrize("dest, spellings, value, parsed", OPTIONS)
def test_option_defaults_from_pet(monkeypatch, dest, spellings, value, parsed):
    monkeypatch.setenv(f"PET_{dest.upper()}", value)
    args = parse()
    assert getattr(args, dest) == parsed
    assert dest in args.explicit


@pytest.mark.parametrize("dest, spelling", [(dest, spelling) for dest, spellings in FLAGS for spelling in spellings])
def test_flag_spellings(dest, spelling):
    assert getattr(parse(), dest) is False
    assert getattr(parse(spelling), dest) is True


@pytest.mark.parametrize("dest, spellings", FLAGS)
def test_flag_defaults_from_pet(monkeypatch, dest, spellings):
    monkeypatch.setenv(f"PET_{dest.upper()}", "1")
    assert getattr(parse(), dest) is True
    monkeypatch.setenv(f"PET_{dest.upper()}", "0")
    assert getattr(parse(), dest) is False
    assert getattr(parse(spellings[0]), dest) is True  # the flag wins over PET_...=0


def test_command_line_wins_over_pet(monkeypatch):
    monkeypatch.setenv("PET_NPROC_PER_NODE", "5")
    monkeypatch.setenv("PET_MAX_RESTARTS", "not a number")  # never read: the flag is given
    assert parse("--nproc-per-node=2", "--max-restarts=1").nproc_per_node == "2"


@pytest.fixture(scope="module")
def torchrun_parser_factory():
    """torch's own parser (torch is imported in the test process only, for parity)."""
    from torch.distributed.run import get_args_parser

    return get_args_parser


def test_every_torchrun_option_string_is_accepted(torchrun_parser_factory):
    ours = set(cli.get_args_parser()._option_string_actions)
    theirs = set(torchrun_parser_factory()._option_string_actions)
    assert theirs <= ours
    assert ours - theirs == {"--python", "--version", "--hosts", "--hostfile", "--ssh", "--export",
                             "--signals-from-stdin", "--signals_from_stdin", "--free-port"}


def test_defaults_match_torchrun(torchrun_parser_factory):
    theirs = vars(torchrun_parser_factory().parse_args(["train.py"]))
    ours = vars(parse())
    assert {dest: ours[dest] for dest in theirs} == theirs


# Ours only: torchrun has no --python, and reads no PET_ variable for these two.
EXTENDED_WITH_PET = ("python", "logs_specs", "numa_binding")


@pytest.mark.parametrize(
    "dest, spellings, value, parsed", [option for option in OPTIONS if option[0] not in EXTENDED_WITH_PET]
)
def test_pet_values_parse_as_torchrun_parses_them(monkeypatch, torchrun_parser_factory, dest, spellings, value, parsed):
    monkeypatch.setenv(f"PET_{dest.upper()}", value)
    assert getattr(torchrun_parser_factory().parse_args(["train.py"]), dest) == getattr(parse(), dest)


def test_script_arguments_that_look_like_options_are_passed_through():
    script_args = ["--nproc-per-node", "4", "-m", "--standalone", "--help", "-h", "--version", "--", "--bogus=1"]
    args = cli.parse_args(["--nproc-per-node=2", "train.py", *script_args])
    assert (args.nproc_per_node, args.module, args.standalone) == ("2", False, False)
    assert args.training_script_args == script_args
    _, _, worker_args = cli.prepare_launch(args)
    assert worker_args == ["-u", "train.py", *script_args]


def test_abbreviated_options_work_as_in_torchrun():
    # torch's own tests write --redirect=3.
    assert parse("--redirect=3", "--nproc-per=2").redirects == "3"


# Bad input --------------------------------------------------------------------------------------

BAD_INPUT = [
    (["--nnodes=0"], "--nnodes"),
    (["--nnodes=2:1"], "--nnodes"),
    (["--nnodes=2:20:30"], "--nnodes"),
    (["--nnodes=two"], "--nnodes"),
    (["--nproc-per-node=0"], "--nproc-per-node"),
    (["--nproc-per-node=unknown"], "--nproc-per-node"),
    (["--rdzv-backend=zookeeper"], "--rdzv-backend"),
    (["--rdzv-endpoint=head:99999"], "--rdzv-endpoint"),
    (["--rdzv-endpoint=::1:29400"], "--rdzv-endpoint"),
    (["--rdzv-endpoint=he ad:1"], "--rdzv-endpoint"),
    (["--rdzv-backend=c10d", "--rdzv-endpoint=a:1,b:2"], "--rdzv-endpoint"),
    (["--rdzv-backend=c10d", "--rdzv-endpoint=http://a:1"], "--rdzv-endpoint"),
    (["--rdzv-id="], "--rdzv-id"),
    (["--rdzv-conf=timeout"], "--rdzv-conf"),
    (["--rdzv-conf==5"], "--rdzv-conf"),
    (["--rdzv-conf=join_timeout=1,,read_timeout=2"], "--rdzv-conf"),
    (["--rdzv-conf=no_such_key=1"], "--rdzv-conf"),
    (["--rdzv-backend=c10d", "--rdzv-conf=cacert=/ca.pem"], "--rdzv-conf"),  # an etcd key
    (["--rdzv-backend=c10d", "--rdzv-conf=join_timeout=soon"], "--rdzv-conf"),
    (["--max-restarts=-1"], "--max-restarts"),
    (["--max-restarts=x"], "--max-restarts"),
    (["--monitor-interval=-1"], "--monitor-interval"),
    (["--start-method=thread"], "--start-method"),
    (["--event-log-handler=dynamic_rendezvous"], "--event-log-handler"),
    (["--role="], "--role"),
    (["--redirects=4"], "--redirects"),
    (["--tee=0:5"], "--tee"),
    (["--local-ranks-filter=a"], "--local-ranks-filter"),
    (["--local-ranks-filter=0,,1"], "--local-ranks-filter"),
    (["--master-port="], "--master-port"),
    (["--node-rank=-1"], "--node-rank"),
    (["--node-rank=2", "--nnodes=2", "--master-port=29511"], "--node-rank"),
    (["--master-addr=::1"], "--master-addr"),
    (["--master-port=70000"], "--master-port"),
    (["--local-addr=a b"], "--local-addr"),
    (["--logs-specs=DOESNOT_EXIST"], "torchrun.logs_specs[DOESNOT_EXIST]"),
    (["--numa-binding=cpu"], "--numa-binding"),
    (["--signals-to-handle=SIGKILL"], "--signals-to-handle"),
    (["--signals-to-handle=SIGSTOP"], "--signals-to-handle"),
    (["--signals-to-handle=SIGNOPE"], "--signals-to-handle"),
    (["--signals-to-handle=,"], "--signals-to-handle"),
    (["--shutdown-timeout=-5"], "--shutdown-timeout"),
    (["--log-dir", os.path.abspath(__file__)], "--log-dir"),
    (["--python=/nonexistent/python"], "--python"),
    (["--no-python", "--module"], "'--no-python' flag and the '--module' flag"),
    (["--run-path", "--module"], "--run-path"),
    (["--no-python", f"--python={sys.executable}"], "--python"),
    (["--bogus"], "--bogus"),
    (["--rdzv"], "--rdzv"),  # ambiguous abbreviation
]


@pytest.mark.parametrize("argv, named", BAD_INPUT, ids=[" ".join(argv) for argv, _ in BAD_INPUT])
def test_bad_input_raises_value_error_in_process(argv, named):
    with pytest.raises(ValueError) as error:
        prepare(*argv)
    assert named in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("argv, named", BAD_INPUT, ids=[" ".join(argv) for argv, _ in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_2(argv, named):
    result = run_launcher(*argv, "train.py")
    assert result.returncode == 2
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("launcher: error: ") and named in line and line.endswith("(see launcher --help)")


def test_missing_script_is_a_usage_error():
    result = run_launcher("--nproc-per-node=2")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "launcher: error: no program to launch: give a script (or -m module, or --no-python program) and its "
        "arguments (see launcher --help)"
    ]


@pytest.mark.parametrize(
    "name, value, named",
    [
        ("PET_MAX_RESTARTS", "x",
         "argument --max-restarts/--max_restarts: expected an integer >= 0, got 'x' (from PET_MAX_RESTARTS)"),
        ("PET_NNODES", "0", "(from PET_NNODES)"),
        ("PET_NO_PYTHON", "yes", "PET_NO_PYTHON: expected 1 (on) or 0 (off), got 'yes'"),
        ("PET_STANDALONE", "true", "PET_STANDALONE"),
        ("LOGLEVEL", "LOUD", "LOGLEVEL"),
    ],
)
def test_bad_environment_values_name_the_variable(name, value, named):
    result = run_launcher("train.py", env=clean_env(**{name: value}))
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert named in line


def test_bad_pet_values_raise_value_error_in_process(monkeypatch):
    monkeypatch.setenv("PET_NO_PYTHON", "yes")
    with pytest.raises(ValueError, match="PET_NO_PYTHON"):
        cli.main(["train.py"])


# torch's seeds (test_run.py) that end before a launch ---------------------------------------------


def test_module_with_no_python_fails(tmp_path):
    # test_launch_user_script_bash / _default_nproc: ValueError in-process.
    args = ["--nnodes=1", "--nproc-per-node=4", "--monitor-interval=1", "--start-method=spawn", "--no-python"]
    with pytest.raises(ValueError):
        cli.main(args + ["--module", os.path.join(WORKERS, "cli_record.sh"), str(tmp_path)])


def test_launch_with_env_vars_module_and_no_python_fails(monkeypatch, tmp_path):
    # test_launch_with_env_vars, first half: PET_MODULE=1 with PET_NO_PYTHON=1.
    for name, value in {"PET_NNODES": "1", "PET_NPROC_PER_NODE": "4", "PET_RDZV_ID": str(uuid.uuid4().int),
                        "PET_MONITOR_INTERVAL": "1", "PET_START_METHOD": "spawn", "PET_NO_PYTHON": "1",
                        "PET_MODULE": "1"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError):
        cli.main([os.path.join(WORKERS, "cli_record.sh"), str(tmp_path)])


def test_nproc_launch_unknown_configurations():
    with pytest.raises(ValueError):
        cli.main(["--nnodes=1", "--nproc-per-node=unknown", "--no-python", "train.sh"])


def test_min_max_nodes_parse():
    assert parse_min_max_nnodes("1") == (1, 1)
    assert parse_min_max_nnodes("2:20") == (2, 20)
    with pytest.raises(RuntimeError):
        parse_min_max_nnodes("2:20:30")


def test_logs_logs_spec_entrypoint_must_be_defined():
    with pytest.raises(ValueError):
        cli.main(["--run-path", "--nnodes=1", "--nproc-per-node=1", "--monitor-interval=1",
                  "--logs_specs=DOESNOT_EXIST", os.path.join(WORKERS, "cli_torchelastic.py")])


def test_logs_specs_entry_point_found_is_reported_and_our_layout_kept(tmp_path, monkeypatch, caplog):
    dist_info = tmp_path / "custom_logs-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: custom-logs\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text("[torchrun.logs_specs]\ncustom = custom_logs:CustomLogsSpecs\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="launcher"):
        config, _, _ = prepare("--logs-specs=custom", "--log-dir", str(tmp_path / "logs"))
    assert config.logs_specs.log_dir == str(tmp_path / "logs")
    assert "custom_logs:CustomLogsSpecs" in caplog.text and "default log layout" in caplog.text


# Worker commands ----------------------------------------------------------------------------------


def test_script_runs_under_this_python_unbuffered():
    _, entrypoint, args = cli.prepare_launch(cli.parse_args(["train.py", "--lr", "1"]))
    assert (entrypoint, args) == (sys.executable, ["-u", "train.py", "--lr", "1"])


def test_module_runs_with_dash_m():
    _, entrypoint, args = cli.prepare_launch(cli.parse_args(["-m", "pkg.train", "--lr", "1"]))
    assert (entrypoint, args) == (sys.executable, ["-u", "-m", "pkg.train", "--lr", "1"])


def test_no_python_runs_the_program_itself():
    _, entrypoint, args = cli.prepare_launch(cli.parse_args(["--no-python", "./train.sh", "a"]))
    assert (entrypoint, args) == ("./train.sh", ["a"])


def test_run_path_runs_runpy_in_the_worker_interpreter():
    _, entrypoint, args = cli.prepare_launch(cli.parse_args(["--run-path", "/abs/train.py", "a"]))
    assert (entrypoint, args) == (sys.executable, ["-u", "-c", cli.RUN_PATH_CODE, "/abs/train.py", "a"])


def test_run_path_and_module_commands_really_run(tmp_path):
    """The commands given to the agent, run by hand: the script sees its own argv and runs as __main__."""
    environment = clean_env(CLI_RECORD_DIR=str(tmp_path), RANK="0", PYTHONPATH=WORKERS)
    script = os.path.join(WORKERS, "cli_record.py")
    for argv, recorded_argv0 in [(["--run-path", script], script),
                                 (["-m", "cli_record"], os.path.join(WORKERS, "cli_record.py"))]:
        _, entrypoint, args = cli.prepare_launch(cli.parse_args([*argv, "--local-rank=3", "x y"]))
        subprocess.run([entrypoint, *args], env=environment, check=True, timeout=60)
        record = json.loads((tmp_path / "0.json").read_text())
        assert record["argv"] == [recorded_argv0, "--local-rank=3", "x y"]
        assert record["name"] == "__main__"


def test_worker_interpreter_precedence(monkeypatch, tmp_path):
    other = tmp_path / "python-other"
    other.symlink_to(sys.executable)
    assert prepare()[1] == sys.executable
    monkeypatch.setenv("PYTHON_EXEC", "/opt/py/bin/python")
    assert prepare()[1] == "/opt/py/bin/python"
    assert prepare("--python", str(other))[1] == str(other)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert prepare("--python", "python-other")[1] == str(other)  # a name is looked up on PATH


def test_frozen_launcher_finds_python3_then_python_on_path(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    (tmp_path / "python").symlink_to(sys.executable)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert prepare()[1] == str(tmp_path / "python")
    (tmp_path / "python3").symlink_to(sys.executable)
    assert prepare()[1] == str(tmp_path / "python3")


def test_frozen_launcher_without_python_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ValueError, match="give --python PATH .*--no-python"):
        prepare()
    assert prepare("--no-python")[1] == "train.py"


def test_use_env_false_puts_local_rank_before_the_script_arguments():
    args = cli.parse_args(["train.py", "--lr", "1"])
    args.use_env = False  # as the legacy launch's parser sets it
    _, _, args = cli.prepare_launch(args)
    assert args == ["-u", "train.py", "--local-rank=${local_rank}", "--lr", "1"]


# Rendezvous rules -------------------------------------------------------------------------------


def test_single_node_static_becomes_c10d_on_a_free_loopback_port():
    config, _, _ = prepare()
    assert (config.rdzv_backend, config.rdzv_endpoint) == ("c10d", "localhost:0")
    assert str(uuid.UUID(config.run_id)) == config.run_id
    assert prepare("--rdzv-id=mine")[0].run_id == "mine"


def test_static_with_master_port_stays_static():
    config, _, _ = prepare("--master-port=29511", "--master-addr=head")
    assert (config.rdzv_backend, config.rdzv_endpoint, config.rdzv_configs["rank"]) == ("static", "head:29511", 0)


def test_multi_node_static_defaults_to_master_port_29500():
    config, _, _ = prepare("--nnodes=2", "--node-rank=1")
    assert (config.rdzv_backend, config.rdzv_endpoint, config.rdzv_configs["rank"]) == ("static", "127.0.0.1:29500", 1)


def test_standalone_uses_a_fresh_local_store():
    config, _, _ = prepare("--standalone", "--nproc-per-node=2")
    assert (config.rdzv_backend, config.rdzv_endpoint) == ("c10d", "localhost:0")
    assert str(uuid.UUID(config.run_id)) == config.run_id


def test_a_run_id_made_up_is_a_random_uuid_as_torchrun_makes_it():
    made = [prepare("--standalone")[0].run_id for _ in range(200)]
    assert len(set(made)) == len(made)
    for run_id in made:
        assert str(uuid.UUID(run_id)) == run_id
        assert (uuid.UUID(run_id).version, uuid.UUID(run_id).variant) == (4, uuid.RFC_4122)


def test_standalone_ignores_given_rendezvous_flags_with_one_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="launcher"):
        config, _, _ = prepare("--standalone", "--rdzv-backend=etcd", "--rdzv-endpoint=etcd:2379", "--rdzv-id=x")
    assert (config.rdzv_backend, config.rdzv_endpoint) == ("c10d", "localhost:0") and config.run_id != "x"
    (record,) = caplog.records
    assert "--rdzv-backend=etcd --rdzv-endpoint=etcd:2379 --rdzv-id=x" in record.getMessage()


def test_rdzv_conf_parsing_strips_quotes():
    config, _, _ = prepare("--rdzv-backend=c10d", "--rdzv-endpoint=head:29400",
                           "--rdzv-conf='join_timeout=5,last_call_timeout=1,timeout=5'")
    assert config.rdzv_configs == {"join_timeout": "5", "last_call_timeout": "1", "timeout": "5"}
    assert parse_rdzv_conf('"read_timeout=7"') == {"read_timeout": "7"}


@pytest.mark.parametrize("endpoint", ["head", "head:29400", "10.0.0.1:1", "[::1]:29400", "[fe80::1]",
                                      "etcd1:2379,etcd2:2379", "http://etcd:2379", "https://etcd:2379/"])
def test_rendezvous_endpoints_accepted(endpoint):
    config, _, _ = prepare("--rdzv-backend=etcd", f"--rdzv-endpoint={endpoint}")
    assert config.rdzv_endpoint == endpoint


def test_master_addr_warning_only_when_given_and_unused(caplog):
    with caplog.at_level(logging.WARNING, logger="launcher"):
        prepare("--rdzv-backend=c10d", "--rdzv-endpoint=head:1")
        assert caplog.text == ""
        prepare("--rdzv-backend=c10d", "--master-addr=head", "--node-rank=1", "--nnodes=2")
    messages = [record.getMessage() for record in caplog.records]
    assert any("master_addr is only used for static rdzv_backend" in m for m in messages)
    assert any("node_rank is only used for static rdzv_backend" in m for m in messages)


# LaunchConfig ------------------------------------------------------------------------------------


def test_config_carries_every_option(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE", "[rank${rank}]: ")
    config, _, _ = prepare(
        "--nnodes=1:3", "--nproc-per-node=2", "--rdzv-backend=c10d", "--rdzv-endpoint=head:29400", "--rdzv-id=run9",
        "--rdzv-conf=timeout=60", "--max-restarts=2", "--monitor-interval=1", "--start-method=fork",
        "--event-log-handler=console", "--role=trainer", "--log-dir", str(tmp_path), "-r", "1", "-t", "0:2",
        "--local-ranks-filter=1", "--duplicate-stdout-filters=loss", "--duplicate-stderr-filters=err,warn",
        "--local-addr=10.1.1.1", "--signals-to-handle=SIGTERM,SIGUSR1", "--shutdown-timeout=5",
        "--virtual-local-rank",
    )
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (1, 3, 2)
    assert (config.rdzv_backend, config.rdzv_endpoint, config.run_id) == ("c10d", "head:29400", "run9")
    assert config.rdzv_configs == {"timeout": "60"}
    assert (config.max_restarts, config.monitor_interval, config.start_method) == (2, 1.0, "fork")
    assert (config.event_log_handler, config.role, config.local_addr) == ("console", "trainer", "10.1.1.1")
    logs_specs = config.logs_specs
    assert (logs_specs.log_dir, int(logs_specs.redirects), logs_specs.tee) == (str(tmp_path), 1, {0: 2})
    assert logs_specs.local_ranks_filter == {1}
    assert (config.duplicate_stdout_filters, config.duplicate_stderr_filters) == (["loss"], ["err", "warn"])
    assert (config.signals_to_handle, config.shutdown_timeout) == ("SIGTERM,SIGUSR1", 5)
    assert config.virtual_local_rank is True
    assert config.log_line_prefix_template == "[rank${rank}]: "


def test_omp_num_threads_for_several_workers(caplog):
    with caplog.at_level(logging.WARNING, logger="launcher"):
        prepare("--nproc-per-node=1")
        assert "OMP_NUM_THREADS" not in os.environ
        prepare("--nproc-per-node=2")
    assert os.environ["OMP_NUM_THREADS"] == "1"
    (record,) = caplog.records
    assert "Setting OMP_NUM_THREADS environment variable for each process to be 1" in record.getMessage()


def test_omp_num_threads_of_the_user_is_kept(monkeypatch, caplog):
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    with caplog.at_level(logging.WARNING, logger="launcher"):
        prepare("--nproc-per-node=4")
    assert os.environ["OMP_NUM_THREADS"] == "8" and caplog.text == ""


@pytest.mark.usefixtures("fake_nvml")
def test_numa_binding_without_gpus_is_ignored_with_one_line(monkeypatch, caplog):
    monkeypatch.setenv("FAKE_NVML_UUIDS", "")
    with caplog.at_level(logging.WARNING, logger="launcher"):
        config, _, _ = prepare("--numa-binding=node")
    assert config.numa_binding is None
    (record,) = caplog.records
    assert record.getMessage() == "--numa-binding=node is ignored: no GPUs are visible on this node"


@pytest.mark.usefixtures("fake_nvml")
def test_numa_binding_with_gpus_is_checked_before_launch():
    with pytest.raises(ValueError, match="--numa-binding"):
        prepare("--numa-binding=exclusive", "--nproc-per-node=4")  # 3 fake GPUs


@pytest.mark.usefixtures("fake_nvml")
def test_nproc_gpu_with_three_fake_gpus():
    assert prepare("--nproc-per-node=gpu")[0].nproc_per_node == 3
    assert prepare("--nproc-per-node=auto")[0].nproc_per_node == 3


# Console ----------------------------------------------------------------------------------------


def test_help_imports_no_torch_and_lists_every_option():
    help_text, imported = launcher_imports("--help")
    assert "launcher.cli" in imported
    assert not [name for name in imported
                if name.split(".")[0] == "torch" or name in ("launcher.api", "launcher.agent")]
    for _, spellings, *_ in OPTIONS + FLAGS:
        assert all(spelling in help_text for spelling in spellings)


def test_version():
    result = run_launcher("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"launcher {__import__('launcher').__version__} (torchrun 2.13 compatible)"


def test_log_lines_are_glog_like():
    result = run_launcher("--standalone", "--rdzv-id=x", "--logs-specs=NOPE", "train.py")
    warning, error = result.stderr.splitlines()
    assert re.fullmatch(r"W\d{4} \d\d:\d\d:\d\d\.\d{3} \d+ launcher\] --standalone: ignoring --rdzv-id=x; .*", warning)
    assert error.startswith("launcher: error: Could not find entrypoint under 'torchrun.logs_specs[NOPE]' key")
