"""The multi-host options without a host: --hosts, --hostfile, --ssh, --export, what the remote launchers get,
and the usage errors (one line, exit 2, before any ssh runs). The launches over ssh are in test_hosts_launch.py."""
import socket
import sys

import pytest
from helpers import run_launcher

from launcher import cli
from launcher.hosts import NOT_PASSED, Host, parse_export, parse_hosts, read_hostfile, remote_environment

pytestmark = pytest.mark.usefixtures("isolated_environment")


@pytest.mark.parametrize(
    "spec, hosts",
    [
        ("gpu1", [Host("gpu1")]),
        ("gpu1:8,gpu2:4", [Host("gpu1", 8), Host("gpu2", 4)]),
        (" a.example.org:2 , 10.0.0.7 ", [Host("a.example.org", 2), Host("10.0.0.7")]),
        ("[::1]:2,[fe80::2]", [Host("[::1]", 2), Host("[fe80::2]")]),
    ],
)
def test_hosts_spec(spec, hosts):
    assert parse_hosts(spec) == hosts


def test_an_ipv6_host_goes_to_ssh_without_brackets():
    assert [host.destination for host in parse_hosts("[::1]:2,gpu1")] == ["::1", "gpu1"]


@pytest.mark.parametrize(
    "spec, problem",
    [
        ("", "expected HOST\\[:SLOTS\\]"),
        ("a,,b", "got '' in"),
        ("a:", "got 'a:'"),
        ("a:0", "SLOTS, got '0'"),
        ("a:two", "SLOTS, got 'two'"),
        ("a b", "got 'a b'"),
        ("-oProxyCommand", "got '-oProxyCommand'"),
        ("[::1]x", "got '\\[::1\\]x'"),
        ("a:1,a:2", "host a is listed twice"),
    ],
)
def test_bad_hosts_spec(spec, problem):
    with pytest.raises(ValueError, match=problem):
        parse_hosts(spec)


def test_hostfile_in_deepspeed_and_open_mpi_format(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# the cluster\n\nworker-1 slots=4\n  worker-2   slots=2 max_slots=8  # Open MPI\nworker-3\n")
    assert read_hostfile(str(hostfile)) == [Host("worker-1", 4), Host("worker-2", 2), Host("worker-3")]


@pytest.mark.parametrize(
    "text, problem",
    [
        ("", "no hosts in hostfile"),
        ("# only a comment\n", "no hosts in hostfile"),
        ("a slots=2\nb slots=two\n", "line 2: slots: expected a number of workers >= 1 as SLOTS, got 'two'"),
        ("a slots=0\n", "line 1: slots: expected a number"),
        ("a cpus=2\n", "line 1: expected 'HOST slots=N' .*, got 'cpus=2'"),
        ("a 2\n", "line 1: expected 'HOST slots=N' .*, got '2'"),
        ("a/b slots=1\n", "line 1: expected 'HOST slots=N', got a bad host name 'a/b'"),
        ("a slots=1\n\nb\na slots=2\n", "line 4: host a is listed twice"),
    ],
)
def test_bad_hostfile_names_the_line(tmp_path, text, problem):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(text)
    with pytest.raises(ValueError, match=problem):
        read_hostfile(str(hostfile))


def test_missing_hostfile(tmp_path):
    with pytest.raises(ValueError, match="cannot read hostfile '.*/absent': No such file or directory"):
        read_hostfile(str(tmp_path / "absent"))


def test_export_names_and_prefixes():
    assert parse_export("WANDB_API_KEY, MY_*,X") == ["WANDB_API_KEY", "MY_*", "X"]
    for bad in ("A-B", "*", "A*B", "1X"):
        with pytest.raises(ValueError, match="expected variable names and prefixes"):
            parse_export(bad)


def test_remote_environment_has_what_the_workers_need_and_what_is_exported():
    environ = {
        "PATH": "/opt/bin:/usr/bin", "LD_LIBRARY_PATH": "/opt/lib", "HOME": "/home/me", "TERM": "xterm",
        "NCCL_DEBUG": "INFO", "PYTHONPATH": "/src", "TORCH_HOME": "/cache", "OMP_NUM_THREADS": "4",
        "OMP_PROC_BIND": "close", "PET_MAX_RESTARTS": "2", "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": "[${rank}]",
        "WANDB_API_KEY": "k", "MY_A": "1", "MY_B": "2", "MYSELF": "no",
        # never passed on: the remote launchers would start hosts of their own, or take a rendezvous set per host
        "PET_HOSTS": "a,b", "PET_HOSTFILE": "/f", "PET_SSH": "ssh -p 1", "PET_EXPORT": "X", "PET_RDZV_ID": "j",
        "PET_NPROC_PER_NODE": "2", "PET_SIGNALS_FROM_STDIN": "1",
        "NCCL_BAD-NAME": "not a shell name",
    }
    assert remote_environment(environ, ["WANDB_API_KEY", "MY_*"]) == {
        "PATH": "/opt/bin:/usr/bin", "LD_LIBRARY_PATH": "/opt/lib", "NCCL_DEBUG": "INFO", "PYTHONPATH": "/src",
        "TORCH_HOME": "/cache", "OMP_NUM_THREADS": "4", "PET_MAX_RESTARTS": "2",
        "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": "[${rank}]", "WANDB_API_KEY": "k", "MY_A": "1", "MY_B": "2",
    }


def test_multi_host_options_read_pet_variables(monkeypatch, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("b slots=2\n")
    for name, value in {"PET_HOSTS": "a:3", "PET_HOSTFILE": str(hostfile), "PET_SSH": "ssh -p 2222",
                        "PET_EXPORT": "X,Y*", "PET_SIGNALS_FROM_STDIN": "1"}.items():
        monkeypatch.setenv(name, value)
    args = cli.parse_args(["train.py"])
    assert (args.hosts, args.hostfile, args.ssh, args.export, args.signals_from_stdin) == (
        "a:3", str(hostfile), "ssh -p 2222", "X,Y*", True)


def test_given_options_parse_back_to_the_same_values(tmp_path):
    argv = [
        "--nproc-per-node=gpu", "--max-restarts=2", "--monitor-interval=0.5", "--role=trainer", "-m", "--no-python",
        "--run-path", "--virtual-local-rank", "--log-dir", str(tmp_path), "-r", "0:1,1:2", "--tee=3",
        "--local-ranks-filter=0,1", "--duplicate-stdout-filters=a,,b,,,c", "--duplicate-stderr-filters=,,x",
        "--signals-to-handle=SIGTERM,SIGUSR1", "--shutdown-timeout=7", "--event-log-handler=console",
        f"--python={sys.executable}", "--rdzv-conf=join_timeout=9", "--rdzv-id=job", "--hosts=a,b",
        "--ssh=ssh -p 2", "--export=X", "--logs-specs=default", "--numa-binding=node", "--start-method=fork",
    ]
    given = cli.parse_args([*argv, "train.py"])
    again = cli.parse_args([*cli.given_options(given), "train.py"])
    assert vars(again) == vars(given)
    passed = cli.parse_args([*cli.given_options(given, leave_out=NOT_PASSED), "train.py"])
    assert passed.explicit == given.explicit - set(NOT_PASSED)
    for dest in vars(given).keys() - {*NOT_PASSED, "explicit"}:
        assert getattr(passed, dest) == getattr(given, dest), dest
    assert (passed.hosts, passed.ssh, passed.rdzv_id) == (None, "ssh", "none")


def test_free_port_prints_a_port_free_here():
    result = run_launcher("--free-port")
    assert result.returncode == 0, result.stderr
    with socket.socket() as sock:
        sock.bind(("", int(result.stdout)))


BAD_INPUT = [
    (["--hosts=a:0"], "argument --hosts: 'a:0': expected a number of workers >= 1 as SLOTS, got '0'"),
    (["--hosts=a,,b"], "argument --hosts: expected HOST[:SLOTS],... such as gpu1:8,gpu2:8, got '' in 'a,,b'"),
    (["--hosts=a,a:2"], "argument --hosts: 'a,a:2': host a is listed twice; give it once, with its slots"),
    (["--hosts=-oProxyCommand=x"], "argument --hosts: expected HOST[:SLOTS],..."),
    (["--hostfile=/nonexistent/hosts"], "argument --hostfile: cannot read hostfile '/nonexistent/hosts': No such"),
    (["--hosts=a", "--hostfile={hostfile}"], "--hosts and --hostfile name the hosts twice; give one of them"),
    (["--hosts=a", "--nnodes=2"], "--nnodes (or PET_NNODES): set for every host by --hosts and --hostfile"),
    (["--hosts=a", "--standalone", "--master-port=1"],
     "--master-port (or PET_MASTER_PORT), --standalone (or PET_STANDALONE): set for every host"),
    (["--hosts=a", "--rdzv-backend=c10d"], "--rdzv-backend (or PET_RDZV_BACKEND): set for every host"),
    (["--hosts=a", "--local-addr=a"], "--local-addr (or PET_LOCAL_ADDR): set for every host"),
    (["--hosts=a", "--rdzv-conf=is_host=1"], "argument --rdzv-conf: is_host is set by --hosts and --hostfile"),
    (["--hosts=a", "--rdzv-conf=cacert=/ca.pem"], "argument --rdzv-conf: --rdzv-conf key 'cacert' does not apply"),
    (["--hosts=a", "--ssh="], "argument --ssh: expected an ssh command line such as 'ssh -F ~/.ssh/cluster'"),
    (["--hosts=a", "--ssh=ssh -o 'unclosed"], "argument --ssh: No closing quotation in \"ssh -o 'unclosed\""),
    (["--hosts=a", "--ssh=no-such-ssh -p 2"], "argument --ssh: 'no-such-ssh' is not a program on PATH"),
    (["--export=A-B"], "argument --export: expected variable names and prefixes such as NAME,PREFIX*, got 'A-B'"),
]


@pytest.mark.parametrize("argv, message", BAD_INPUT, ids=[" ".join(argv) for argv, _ in BAD_INPUT])
def test_bad_multi_host_input_is_one_line_and_exit_2(tmp_path, argv, message):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("b\n")
    result = run_launcher(*[arg.format(hostfile=hostfile) for arg in argv], "train.py")
    assert result.returncode == 2
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"launcher: error: {message}") and line.endswith("(see launcher --help)")


def test_a_bad_pet_hosts_names_the_variable():
    with pytest.raises(ValueError, match=r"argument --hosts: .*\(from PET_HOSTS\)"):
        with pytest.MonkeyPatch.context() as monkeypatch:
            monkeypatch.setenv("PET_HOSTS", "a:x")
            cli.parse_args(["train.py"])


def test_the_legacy_launcher_has_no_hosts():
    result = run_launcher("--legacy-launch", "--hosts=a", "train.py")
    assert result.returncode == 2
    assert "unrecognized arguments: --hosts=a" in result.stderr
