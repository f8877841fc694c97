"""The commands that talk to a Ray cluster's services: serve (Ray Serve), submit and jobs (Ray Jobs)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..errors import UserError, shown
from .options import add_cluster_options, add_run_options, config_from_args

SUBMIT_EXAMPLES = """examples:
  cluster/start-local-head.sh /tmp/ray-head                      # a local head; prints the addresses
  cupscale submit --wait -- upscale /data/in.png -o /data/out.png --config cpu-demo
  cupscale submit --address http://head:8265 --working-dir . --entrypoint-num-gpus 1 -- upscale ...
  cupscale submit -- batch --input /data/in --output /data/out --config sdxl-4k
  cupscale jobs list; cupscale jobs logs raysubmit_XYZ --follow; cupscale jobs stop raysubmit_XYZ
Token auth: the token comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.
"""


SERVE_EXAMPLES = """examples:
  cupscale serve --config cpu-demo            # http://127.0.0.1:8000/docs; results in ~/.local/state/cupscale/serve
  cupscale serve --results /tmp/cupscale-jobs --config cpu-demo --retention-days 1
  curl -s --data-binary @in.png 'http://127.0.0.1:8000/v1/upscale?scale=2&prompt=a+harbour'   # -> {"id": ...}
  curl -s http://127.0.0.1:8000/v1/jobs/ID; curl -so out.png http://127.0.0.1:8000/v1/jobs/ID/result
  cupscale serve --host 0.0.0.0 --token-file ~/.cupscale-token --results /data/jobs --config sdxl-4k --actors 4
Request knobs are the CLI's (`cupscale knobs`); model, device, dtype and limits are the service's (--config/--set).
Knobs that lift memory bounds have per-request ceilings (docs/security.md); --set KNOB=VALUE raises that knob's.
Uploads hold only the bytes that arrived; a body bringing under 4 KiB in 10 s is answered 408.
SIGTERM stops it as Ctrl-C does: running jobs are recorded as interrupted, Ray is shut down, exit 0.
"""


def add_serve_parser(sub) -> None:
    srv = sub.add_parser("serve", help="upscaling as an HTTP service (Ray Serve): submit, poll, fetch, cancel",
                         epilog=SERVE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; any other needs "
                                                          "--token-file)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--results", metavar="DIR",
                     help="job records and results (shared storage on a multi-node cluster); kept across restarts "
                          "(default: $XDG_STATE_HOME/cupscale/serve, else ~/.local/state/cupscale/serve)")
    srv.add_argument("--queue", type=int, default=16, metavar="N", help="jobs that may wait; past it 429 (default 16)")
    srv.add_argument("--token-file", dest="token_file", metavar="FILE",
                     help="bearer token every /v1 request must send (required off loopback)")
    srv.add_argument("--max-request-mb", dest="max_request_mb", type=float, default=64.0, metavar="MB",
                     help="largest request body, in (0, 4096] (default 64)")
    srv.add_argument("--max-inflight-mb", dest="max_inflight_mb", type=float, metavar="MB",
                     help="request bodies being received at once, all together; past it 429 before a body is read "
                          "(default 4 x --max-request-mb)")
    srv.add_argument("--retention-days", dest="retention_days", type=float, default=7.0, metavar="D",
                     help="finished jobs (record and result) are deleted after D days (default 7; 0 = keep forever)")
    srv.add_argument("--dry-run", action="store_true", help="check the options and print the service's settings")
    add_run_options(srv)
    add_cluster_options(srv)


def default_results() -> Path:
    """Where `cupscale serve` keeps its jobs without ``--results``: the per-user state folder of the XDG Base
    Directory spec ($XDG_STATE_HOME when it is an absolute path, else ~/.local/state)."""
    state = os.environ.get("XDG_STATE_HOME", "")
    return (Path(state) if os.path.isabs(state) else Path.home() / ".local" / "state") / "cupscale" / "serve"


def stop_on_sigterm():
    """SIGTERM (systemd, `docker stop`, process managers) takes Ctrl-C's path: KeyboardInterrupt in the main thread,
    then Serve and Ray shut down in order. Installed after ``ray.init``, whose own handler (``sys.exit``, and for a
    local head: kill its processes first) left Serve's shutdown talking to a dead cluster (SIGABRT, exit 134)."""
    import signal

    def on_term(_signum, _frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the stop is under way: a second TERM must not break it
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, on_term)  # the handler it replaced, put back when the service is down


def interrupt_left_jobs(results: Path) -> None:
    """After the replica is gone: the jobs it left queued or running are failed as interrupted now, not at the next
    start (the replica does this itself when Serve lets it stop; this covers one that was killed)."""
    from ..services.jobstore import JobStore

    store = JobStore(results)
    try:
        store.claim(f" (cupscale serve pid {os.getpid()}, stopping)")
    except UserError:
        return  # the replica still holds it (it records its own jobs) or another service took the folder
    try:
        store.recover("stopped")
    finally:
        store.release()


def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import time

    from ..execution.raycluster import ClusterOptions, connect
    from ..services.jobstore import JobStore
    from ..services.serve import ServiceOptions, check_bind, read_token, retention_seconds
    from ..services.servelimits import request_megabytes

    token = read_token(args.token_file)
    check_bind(args.host, token)
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port}: use 1..65535")
    if args.queue < 1:
        raise UserError(f"--queue {args.queue}: use 1 or more")
    max_request_bytes = request_megabytes("--max-request-mb", args.max_request_mb)  # inf, nan, 0, 1e300: one line
    max_inflight_bytes = (request_megabytes("--max-inflight-mb", args.max_inflight_mb)
                          if args.max_inflight_mb is not None else None)
    retention_s = retention_seconds(args.retention_days)
    config = config_from_args(args)
    if args.results:  # a path no file system takes (5,000 characters, NUL): one line, the path cut
        from ..files.userfile import check_path_text

        check_path_text(args.results, "--results")
    results = Path(os.path.expanduser(args.results)).resolve() if args.results else default_results()
    if not args.results:
        print(f"cupscale serve: no --results given; jobs and results are kept in {results}", file=sys.stderr)
    try:
        results.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--results {shown(str(results))}: can't create it ({exc.strerror or exc}); choose "
                        "another folder") from None
    JobStore(results).check_free()  # a second service on this folder: refused now, naming the lock's holder
    cluster = ClusterOptions(args.actors, args.address, args.gpus_per_actor, args.cpus_per_actor, args.start_timeout)
    url = f"http://{args.host}:{args.port}"
    options = ServiceOptions(str(results), config, args.queue, token, max_request_bytes, cluster,
                             max_inflight_bytes=max_inflight_bytes,
                             retention_s=retention_s, torch_threads=cli_torch_threads(config),
                             owner=f" (the replica of cupscale serve pid {os.getpid()} at {url})")
    if args.dry_run:
        print(json.dumps({"url": url, "results": str(results), "queue": args.queue, "token": bool(token),
                          "model": config.model, "config_hash": config.config_hash(),
                          "max_inflight_bytes": options.inflight_limit, "retention_days": args.retention_days,
                          "torch_threads": config.torch_threads or options.torch_threads}, indent=2))
        return 0
    from ..services import serve as service

    for key, value in service.SLOW_START_ENV.items():
        os.environ.setdefault(key, value)
    ray = connect(cluster)
    previous = stop_on_sigterm()
    try:
        service.deploy(options, args.host, args.port)
        print(f"cupscale serve: {url} (API docs {url}/docs), results in {results}; Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("cupscale serve: stopped; finished results stay in the results folder", file=sys.stderr)
        return 0
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        interrupt_left_jobs(results)
        signal.signal(signal.SIGTERM, previous)


def cli_torch_threads(config) -> int | None:
    """The torch CPU threads `cupscale upscale` would run with here (this process's default), for the replica, which
    Ray starts with OMP_NUM_THREADS=1: the same knobs then give the CLI's bytes. None when the config pins them."""
    if config.torch_threads:
        return None
    import torch

    return torch.get_num_threads()


def add_jobs_parsers(sub) -> None:
    job_server = argparse.ArgumentParser(add_help=False)  # shared by submit and jobs (defined once)
    job_server.add_argument("--address", help="job server, e.g. http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, "
                                              "else http://127.0.0.1:8265)")
    submit = sub.add_parser("submit", help="run `upscale` or `batch` as a Ray Job on a cluster", parents=[job_server],
                            epilog=SUBMIT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    submit.add_argument("--wait", action="store_true", help="follow the job's log until it ends; exit 1 if it failed")
    submit.add_argument("--timeout", type=float, metavar="S", help="with --wait: give up waiting after S seconds")
    submit.add_argument("--working-dir", dest="working_dir", metavar="DIR", help="folder shipped to the job (its cwd)")
    submit.add_argument("--pip", action="append", default=[], metavar="SPEC",
                        help="pip package for the job, repeatable")
    submit.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment variable, repeatable")
    submit.add_argument("--entrypoint-num-cpus", dest="entrypoint_num_cpus", type=float, metavar="N",
                        help="CPUs reserved for the job's driver")
    submit.add_argument("--entrypoint-num-gpus", dest="entrypoint_num_gpus", type=float, metavar="N",
                        help="GPUs reserved for the job's driver (default: 1 for `upscale --actors 0`, whose "
                             "driver runs the models; else none: drivers in Ray mode run no model)")
    submit.add_argument("--entrypoint-memory", dest="entrypoint_memory", type=int, metavar="BYTES",
                        help="memory reserved for the job's driver")
    submit.add_argument("--dry-run", action="store_true",
                        help="print the submission (entrypoint, runtime_env) and exit")
    submit.add_argument("-q", "--quiet", action="store_true", help="with --wait: don't echo the job's log")
    submit.add_argument("job", nargs=argparse.REMAINDER, metavar="-- upscale|batch ARGS",
                        help="the cupscale command the job runs")
    jobs = sub.add_parser("jobs", help="list, inspect, follow or stop Ray Jobs", epilog=SUBMIT_EXAMPLES,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = jobs.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)
    actions.add_parser("list", help="every job on the cluster", parents=[job_server])
    for name, text in (("status", "a job's status and message"), ("logs", "a job's log"), ("stop", "stop a job")):
        action = actions.add_parser(name, help=text, parents=[job_server])
        action.add_argument("job_id", metavar="ID", help="the submission id (raysubmit_...)")
        if name == "logs":
            action.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")


def cmd_submit(args: argparse.Namespace) -> int:
    from ..services import jobs

    argv = args.job[1:] if args.job[:1] == ["--"] else args.job
    env_vars = {}
    for pair in args.env:
        if "=" not in pair:
            raise UserError(f"--env {pair!r} is not KEY=VALUE; use e.g. --env HF_HUB_OFFLINE=1")
        key, value = pair.split("=", 1)
        env_vars[key] = value
    spec = jobs.JobSpec(argv, args.working_dir, args.pip, env_vars, args.entrypoint_num_cpus,
                        args.entrypoint_num_gpus, args.entrypoint_memory)
    job = args.parse_argv(argv)  # the job's own flags are checked here, before anything is sent
    if spec.entrypoint_num_gpus is None and driver_runs_models(job):
        spec.entrypoint_num_gpus = 1.0
        print("submit: reserving 1 GPU for the job's driver (`upscale --actors 0` runs every model in the driver); "
              "--entrypoint-num-gpus 0 runs it on CPU", file=sys.stderr)
    if args.dry_run:
        print(json.dumps({"address": jobs.job_server_address(args.address), **spec.request()}, indent=2))
        return 0
    job_id, address = jobs.submit(spec, args.address)
    print(f"submitted {job_id} to {address}", flush=True)
    if not args.wait:
        print(f"follow it with `cupscale jobs logs {job_id} --follow`")
        return 0
    try:
        info = jobs.follow(job_id, address, echo=not args.quiet, timeout_s=args.timeout)
    except KeyboardInterrupt:
        print(f"cupscale: stopped waiting; {job_id} keeps running (`cupscale jobs stop {job_id}` stops it)",
              file=sys.stderr)
        return 130
    if str(info.status) != "SUCCEEDED":
        raise UserError(f"job {job_id} {info.status}: {info.message}; see `cupscale jobs logs {job_id}`")
    print(f"job {job_id} SUCCEEDED")
    return 0


def driver_runs_models(job: argparse.Namespace) -> bool:
    """The one layout whose driver needs a GPU: the single-process reference (`upscale --actors 0`) on a GPU
    device. Every other job's driver runs no model (Ray mode, Ray Data workers) and fits a CPU-only head."""
    if job.command != "upscale" or job.actors != 0:
        return False
    return not config_from_args(job).device.startswith("cpu")


def cmd_jobs(args: argparse.Namespace) -> int:
    from ..services import jobs

    if args.jobs_command == "list":
        for job in jobs.list_jobs(args.address):
            print(jobs.format_job(job))
    elif args.jobs_command == "status":
        info = jobs.job_info(args.job_id, args.address)
        print(f"{args.job_id} {info.status}: {info.message or ''}".rstrip(": "))
    elif args.jobs_command == "logs" and args.follow:
        info = jobs.follow(args.job_id, args.address)
        print(f"job {args.job_id} {info.status}")
    elif args.jobs_command == "logs":
        print(jobs.job_logs(args.job_id, args.address), end="")
    else:
        stopped = jobs.stop_job(args.job_id, args.address)
        status = jobs.job_info(args.job_id, args.address).status
        print(f"stop requested for {args.job_id} ({status})" if stopped
              else f"{args.job_id} had already ended ({status})")
    return 0
