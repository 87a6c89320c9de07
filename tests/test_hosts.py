"""A host is a host: this machine is a LocalHost; what a host cannot do is refused in one place
(verifier.run.hosts.check_hosts), before any host is contacted. No QEMU, no ssh: the hosts here
are only described (192.0.2.0/24 is TEST-NET-1, never reached)."""

from __future__ import annotations

import pytest

from builder.machines import MACHINES
from verifier.errors import InputError
from verifier.run.hosts import LocalHost, SshHost, check_hosts, hosts_from_options
from verifier.run.options import VerifyOptions

VIRT = MACHINES["virt"]
FAR = "tester@192.0.2.7"


def _hosts(**kw):
    opts = VerifyOptions(**kw)
    return opts, hosts_from_options(opts, VIRT)


def test_one_host_runs_are_this_machine_direct():
    opts, hosts = _hosts()
    assert isinstance(hosts.src, LocalHost) and isinstance(hosts.dst, LocalHost)
    assert hosts.direct and hosts.src.direct and hosts.dst.direct
    check_hosts(opts, hosts)
    assert opts.transport == "unix"  # unchanged on one host


@pytest.mark.parametrize("src, dst", [("local", None), (None, "local"), ("local", "local"), (None, FAR)])
def test_across_hosts_this_machine_runs_under_the_agent_too(src, dst):
    opts, hosts = _hosts(src_host=src, dst_host=dst, migration_address="192.0.2.7")
    assert not hosts.direct and not hosts.src.direct and not hosts.dst.direct
    assert isinstance(hosts.dst, SshHost if dst == FAR else LocalHost)
    check_hosts(opts, hosts)
    assert opts.transport == "tcp"  # two hosts migrate over TCP


@pytest.mark.parametrize("kw, words", [
    ({"capture": "backing-file"}, "--capture backing-file: the source runs on tester@192.0.2.6 under dirtylog's agent"),
    ({"host_backing": "memfd-hugetlb"}, "--host-backing memfd-hugetlb: the source runs on tester@192.0.2.6"),
    ({"inject": ("corrupt-capture", 2)}, "--inject: the source runs on tester@192.0.2.6"),
    ({"accel": "kvm"}, "--accel kvm: the source runs on tester@192.0.2.6"),
])
def test_what_a_remote_host_cannot_do_is_one_input_error(kw, words):
    opts, hosts = _hosts(src_host="tester@192.0.2.6", dst_host=FAR, migration_address="192.0.2.7", **kw)
    with pytest.raises(InputError) as e:
        check_hosts(opts, hosts)
    assert str(e.value).startswith(words), e.value


def test_this_machine_under_the_agent_refuses_the_same_and_names_the_side():
    opts, hosts = _hosts(src_host="local", capture="backing-file")
    with pytest.raises(InputError, match="the source runs on localhost under dirtylog's agent"):
        check_hosts(opts, hosts)
    # the same plan on this machine alone, direct, is fine
    opts, hosts = _hosts(capture="backing-file", inject=("corrupt-capture", 2))
    check_hosts(opts, hosts)


@pytest.mark.parametrize("kw, words", [
    ({"dst_qemu": "/opt/qemu/bin/qemu-system-arm"}, "apply to runs with --src-host/--dst-host"),
    ({"allow_qemu_mismatch": True}, "apply to runs with --src-host/--dst-host"),
    ({"dst_host": FAR}, "--dst-host needs --migration-address"),
    ({"dst_host": FAR, "migration_address": "192.0.2.7", "ssh_identity": "/nonexistent/id"},
     "--ssh-identity /nonexistent/id: no such file"),
])
def test_options_that_need_the_other_kind_of_run(kw, words):
    opts, hosts = _hosts(**kw)
    with pytest.raises(InputError, match=words):
        check_hosts(opts, hosts)


def test_a_bad_host_spec_is_an_input_error():
    with pytest.raises(InputError, match="expected user@host"):
        _hosts(dst_host="a b")
