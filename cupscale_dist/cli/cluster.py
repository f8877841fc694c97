"""The commands that talk to a Ray cluster's services: serve (Ray Serve), submit and jobs (Ray Jobs)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..errors import UserError
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
  cupscale serve --results /tmp/cupscale-jobs --config cpu-demo          # http://127.0.0.1:8000/docs
  curl -s --data-binary @in.png 'http://127.0.0.1:8000/v1/upscale?scale=2&prompt=a+harbour'   # -> {"id": ...}
  curl -s http://127.0.0.1:8000/v1/jobs/ID; curl -so out.png http://127.0.0.1:8000/v1/jobs/ID/result
  cupscale serve --host 0.0.0.0 --token-file ~/.cupscale-token --results /data/jobs --config sdxl-4k --actors 4
Request knobs are the CLI's (`cupscale knobs`); model, device, dtype and limits are the service's (--config/--set).
"""


def add_serve_parser(sub) -> None:
    srv = sub.add_parser("serve", help="upscaling as an HTTP service (Ray Serve): submit, poll, fetch, cancel",
                         epilog=SERVE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; any other needs "
                                                          "--token-file)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--results", required=True, metavar="DIR",
                     help="job records and results (shared storage on a multi-node cluster); kept across restarts")
    srv.add_argument("--queue", type=int, default=16, metavar="N", help="jobs that may wait; past it 429 (default 16)")
    srv.add_argument("--token-file", dest="token_file", metavar="FILE",
                     help="bearer token every /v1 request must send (required off loopback)")
    srv.add_argument("--max-request-mb", dest="max_request_mb", type=float, default=64.0, metavar="MB",
                     help="largest request body (default 64)")
    srv.add_argument("--dry-run", action="store_true", help="check the options and print the service's settings")
    add_run_options(srv)
    add_cluster_options(srv)


def cmd_serve(args: argparse.Namespace) -> int:
    import time

    from ..execution.raycluster import ClusterOptions, connect
    from ..services.serve import ServiceOptions, check_bind, read_token

    token = read_token(args.token_file)
    check_bind(args.host, token)
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port}: use 1..65535")
    if args.queue < 1:
        raise UserError(f"--queue {args.queue}: use 1 or more")
    if not args.max_request_mb > 0:
        raise UserError(f"--max-request-mb {args.max_request_mb}: use a positive number")
    config = config_from_args(args)
    results = Path(args.results).expanduser().resolve()
    results.mkdir(parents=True, exist_ok=True)
    cluster = ClusterOptions(args.actors, args.address, args.gpus_per_actor, args.cpus_per_actor, args.start_timeout)
    options = ServiceOptions(str(results), config, args.queue, token, int(args.max_request_mb * 2**20), cluster)
    url = f"http://{args.host}:{args.port}"
    if args.dry_run:
        print(json.dumps({"url": url, "results": str(results), "queue": args.queue, "token": bool(token),
                          "model": config.model, "config_hash": config.config_hash()}, indent=2))
        return 0
    from ..services import serve as service

    for key, value in service.SLOW_START_ENV.items():
        os.environ.setdefault(key, value)
    ray = connect(cluster)

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


def add_jobs_parsers(sub) -> None:
    job_server = argparse.ArgumentParser(add_help=False)  # shared by submit and jobs (defined once)
    job_server.add_argument("--address", help="job server, e.g. http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, "
                                              "else http://127.0.0.1:8265)")
    submit = sub.add_parser("submit", help="run `upscale` or `batch` as a Ray Job on a cluster", parents=[job_server],
                            epilog=SUBMIT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    submit.add_argument("--wait", action="store_true", help="follow the job's log until it ends; exit 1 if it failed")
    submit.add_argument("--timeout", type=float, metavar="S", help="with --wait: give up waiting after S seconds")
    submit.add_argument("--working-dir", dest="working_dir", metavar="DIR", help="folder shipped to the job (its cwd)")
    submit.add_argument("--pip", action="append", default=[], metavar="SPEC", help="pip package for the job, repeatable")
    submit.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable, repeatable")
    submit.add_argument("--entrypoint-num-cpus", dest="entrypoint_num_cpus", type=float, metavar="N",
                        help="CPUs reserved for the job's driver")
    submit.add_argument("--entrypoint-num-gpus", dest="entrypoint_num_gpus", type=float, metavar="N",
                        help="GPUs reserved for the job's driver (default: 1 for `upscale --actors 0`, whose driver runs the "
                             "models; else none: drivers in Ray mode run no model)")
    submit.add_argument("--entrypoint-memory", dest="entrypoint_memory", type=int, metavar="BYTES",
                        help="memory reserved for the job's driver")
    submit.add_argument("--dry-run", action="store_true", help="print the submission (entrypoint, runtime_env) and exit")
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
        print(f"stop requested for {args.job_id} ({status})" if stopped else f"{args.job_id} had already ended ({status})")
    return 0
