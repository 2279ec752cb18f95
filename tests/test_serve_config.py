"""The supervisord config `pagedfleet serve` generates, read back by supervisor's own parser: every process
restarts on exit, the control socket is a unix socket in the state directory (no network port), and a
literal % in a path survives supervisor's %(name)s expansion."""

from __future__ import annotations

import argparse

from pagedfleet.serve import add_serve_arguments, build_processes, supervision_policy
from pagedfleet.supervision import state_paths, supervisord_config


def _parse(config_text: str, path):
    from supervisor.options import ServerOptions

    path.write_text(config_text)
    opts = ServerOptions()
    opts.realize(args=["-c", str(path)])
    return opts


def test_generated_config_supervises_every_process(tmp_path):
    from supervisor.datatypes import RestartUnconditionally

    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    state = tmp_path / "state 100%"
    args = p.parse_args(["--workers", "2", "--state-dir", str(state), "--redis-port", "6390", "--start-retries", "7"])
    procs, _env = build_processes(args, "/models/smol 5%", "smollm2-135m-instruct")
    assert set(procs) == {"redis", "scheduler", "worker0", "worker1", "gateway", "housekeeping", "batch"}
    state_paths(state)["logs"].mkdir(parents=True)  # serve makes it before supervisord starts
    opts = _parse(supervisord_config(procs, state, "/repo 1%", supervision_policy(args)), tmp_path / "supervisord.conf")
    assert not any(type(s).__name__ == "InetServerConfig" for s in opts.server_configs)
    assert [s["file"] for s in opts.server_configs] == [str(state_paths(state)["socket"])]
    programs = {g.name: g.process_configs[0] for g in opts.process_group_configs}
    assert set(programs) == set(procs)
    for name, pc in programs.items():
        assert pc.autorestart is RestartUnconditionally and pc.stopasgroup and pc.killasgroup, name
        assert pc.stdout_logfile == str(state / "logs" / f"{name}.log")
    assert programs["worker0"].startretries == 7
    assert "/models/smol 5%" in programs["gateway"].command and programs["gateway"].directory == "/repo 1%"
    assert "gateway.batch.worker" in programs["batch"].command and "/models/smol 5%" in programs["batch"].command
    assert "--appendonly yes" in programs["redis"].command and str(state / "redis") in programs["redis"].command
    order = sorted(programs, key=lambda n: programs[n].priority)
    assert order[0] == "redis" and order.index("scheduler") < order.index("worker0") < order.index("gateway")
