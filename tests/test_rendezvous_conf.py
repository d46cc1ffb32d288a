"""--rdzv-conf and --rdzv-endpoint: what is accepted; bad input is one clear ValueError saying what is valid."""
import re

import pytest
from helpers import run_launcher

from launcher.rendezvous import RendezvousParameters, create_handler
from launcher.rendezvous.options import OPTIONS, backend_config, parse_endpoint, parse_rdzv_conf
from launcher.store import get_free_port


def params(**overrides):
    values = dict(backend="c10d", endpoint="127.0.0.1:0", run_id="conf", min_nodes=1, max_nodes=1, local_world_size=1)
    values.update(overrides)
    return RendezvousParameters(**values)


def test_rdzv_conf_parses_torchrun_syntax():
    assert parse_rdzv_conf("") == {}
    assert parse_rdzv_conf("'join_timeout=5'") == {"join_timeout": "5"}
    assert parse_rdzv_conf("'\"join_timeout=5\"'") == {"join_timeout": "5"}
    assert parse_rdzv_conf("\"'join_timeout=5'\"") == {"join_timeout": "5"}
    assert parse_rdzv_conf('cacert="/a b/ca.pem",timeout=7') == {"cacert": "/a b/ca.pem", "timeout": "7"}
    assert parse_rdzv_conf(" join_timeout = 10 , is_host=true,last_call_timeout=1") == {
        "join_timeout": "10",
        "is_host": "true",
        "last_call_timeout": "1",
    }


# The quotes a shell would remove may reach the launcher: one pair, or two where a program quoted twice.
@pytest.mark.parametrize("conf", ["'\"timeout=1\"'", "\"'timeout=1'\"", "'timeout=1'", "timeout='1'", 'timeout="1"'])
def test_quoted_rdzv_conf_applies_through_the_command_line(conf):
    # Node rank 0 of 2 alone: it waits the timeout, 1 s, not the default 900 s, then fails with one line.
    result = run_launcher("--nnodes=2", "--node-rank=0", f"--master-port={get_free_port()}", f"--rdzv-conf={conf}",
                          "--no-python", "true")
    assert result.returncode == 1, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("launcher: error: static rendezvous") and "timed out" in line


@pytest.mark.parametrize(
    "text, says",
    [
        ("bogus=1", "unknown --rdzv-conf key 'bogus'; valid keys: cacert, cert, close_timeout,"),
        ("join_timeout", "has no value"),
        ("join_timeout=", "has no value"),
        ("=5", "expected key1=value1"),
        ("rank=1", "unknown --rdzv-conf key 'rank'"),
    ],
)
def test_rdzv_conf_errors(text, says):
    with pytest.raises(ValueError, match=re.escape(says)) as error:
        parse_rdzv_conf(text)
    assert "\n" not in str(error.value)


def test_every_option_is_listed_when_a_key_is_unknown():
    with pytest.raises(ValueError) as error:
        parse_rdzv_conf("nope=1")
    for key in OPTIONS:
        assert key in str(error.value)


def test_conf_defaults_are_torchruns():
    config = backend_config("c10d", {})
    assert config["join_timeout"] == 600
    assert config["last_call_timeout"] == 30
    assert config["close_timeout"] == 30
    assert config["read_timeout"] == 60
    assert config["keep_alive_interval"] == 5
    assert config["keep_alive_max_attempt"] == 3
    assert config["heartbeat_timeout"] == 5
    assert config["is_host"] is None
    assert backend_config("etcd", {"keep_alive_interval": "2"})["keep_alive_interval"] == 2


@pytest.mark.parametrize(
    "backend, config, says",
    [
        ("c10d", {"join_timeout": "soon"}, "join_timeout=soon: expected a positive whole number"),
        ("c10d", {"last_call_timeout": "0"}, "last_call_timeout=0: expected a positive"),
        ("c10d", {"is_host": "maybe"}, "is_host=maybe: expected true or false"),
        ("c10d", {"store_type": "file"}, "store_type=file: expected one of tcp"),
        ("c10d", {"cacert": "/x"}, "'cacert' does not apply to the c10d rendezvous backend; valid keys for c10d:"),
        ("static", {"join_timeout": "5", "rank": 0}, "'join_timeout' does not apply to the static"),
        ("etcd", {"is_host": "1"}, "'is_host' does not apply to the etcd"),
        ("etcd", {"protocol": "ftp"}, "protocol=ftp: expected one of http, https"),
    ],
)
def test_conf_values_are_checked_per_backend(backend, config, says):
    with pytest.raises(ValueError, match=says):
        backend_config(backend, config)


@pytest.mark.parametrize(
    "endpoint, default, expected",
    [
        ("node1:29400", None, ("node1", 29400)),
        ("node1", 29400, ("node1", 29400)),
        ("10.0.0.1:0", None, ("10.0.0.1", 0)),
        ("[::1]:2379", None, ("::1", 2379)),
        ("[::1]", 2379, ("::1", 2379)),
        (" host-a.example.com:1 ", None, ("host-a.example.com", 1)),
    ],
)
def test_endpoints(endpoint, default, expected):
    assert parse_endpoint(endpoint, default) == expected


@pytest.mark.parametrize(
    "endpoint, says",
    [
        ("node1:port", "port 'port' is not 0-65535"),
        ("node1:70000", "port '70000' is not 0-65535"),
        ("node1:", "port '' is not 0-65535"),
        ("no de:1", "bad host 'no de'"),
        (":29400", "bad host ''"),
        ("", "is empty"),
        ("node1", "has no port"),
        ("[::1", "malformed"),
        ("::1:29400", "in brackets"),
    ],
)
def test_malformed_endpoints(endpoint, says):
    with pytest.raises(ValueError, match=says) as error:
        parse_endpoint(endpoint, None)
    assert "HOST:PORT" in str(error.value)


@pytest.mark.parametrize(
    "overrides, says",
    [
        ({"backend": "zookeeper"}, "unknown rendezvous backend 'zookeeper'; valid backends: c10d, etcd, static"),
        ({"backend": "etcd-v2"}, "unknown rendezvous backend 'etcd-v2'"),
        ({"min_nodes": 3, "max_nodes": 2}, r"minimum number of nodes \(3\) is greater than the maximum \(2\)"),
        ({"min_nodes": 0}, "at least 1"),
        ({"run_id": ""}, "run id"),
        ({"local_world_size": 0}, "at least 1 worker"),
        ({"endpoint": "host:99999"}, "port '99999' is not 0-65535"),
        ({"endpoint": "a:1,b:2"}, r"c10d takes one <host>\[:<port>\] \(lists and URLs are for etcd\)"),
        ({"backend": "static", "endpoint": "http://a:1", "config": {"rank": 0}}, "static takes one <host>"),
        ({"config": {"bogus": "1"}}, "'bogus' does not apply to the c10d"),
        ({"backend": "static", "endpoint": "127.0.0.1:29500", "min_nodes": 1, "max_nodes": 2, "config": {"rank": 0}},
         "static rendezvous needs a fixed number of nodes"),
        ({"backend": "static", "endpoint": "127.0.0.1:29500", "max_nodes": 2, "min_nodes": 2, "config": {"rank": 2}},
         r"--node-rank=2 is not in 0..1"),
        ({"backend": "static", "endpoint": "127.0.0.1:29500", "config": {}}, "--node-rank must be a number"),
        ({"backend": "static", "endpoint": "127.0.0.1", "config": {"rank": 0}}, "has no port"),
        ({"backend": "static", "endpoint": "127.0.0.1:0", "min_nodes": 2, "max_nodes": 2, "config": {"rank": 0}},
         "--master-port=0 only works with a single node"),
        ({"backend": "etcd", "endpoint": "ftp://127.0.0.1:2379"}, "scheme 'ftp' is not http or https"),
        ({"backend": "etcd", "endpoint": "127.0.0.1:2379/v3"}, "has a path"),
        ({"backend": "etcd", "endpoint": "127.0.0.1:2379,:1"}, "bad host ''"),
        ({"backend": "etcd", "endpoint": "https://127.0.0.1:2379", "config": {"protocol": "http"}}, "contradicts"),
        ({"backend": "etcd", "endpoint": "127.0.0.1:2379", "config": {"cacert": "/ca.pem"}}, "need https"),
        ({"backend": "etcd", "endpoint": "https://127.0.0.1:2379", "config": {"cacert": "/nonexistent/ca.pem"}},
         "cacert=/nonexistent/ca.pem: no such file"),
    ],
)
def test_bad_parameters(overrides, says):
    with pytest.raises(ValueError, match=says) as error:
        create_handler(params(**overrides))
    assert "\n" not in str(error.value)
