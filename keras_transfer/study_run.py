"""Running a study (`keras_transfer.study`): its tasks in this process or as Ray tasks, the study directory
(prepared, locked against a second process) and the time estimate. Each task is an ordinary pretrain or
fine-tuning run directory, resumed where it stopped; a failure is recorded in it as one line."""

from __future__ import annotations

import contextlib
import os
import time
import traceback

import yaml

from keras_transfer import accel, rundir
from keras_transfer import config as config_lib
from keras_transfer.errors import ConfigError, KTransferError
from keras_transfer.io import atomic_write_text, read_json
from keras_transfer.study import check_compatible, plan, pretrain_path, run_config, run_path


def execute(task):
    """Run one study task in this process: a pretrain run or a fine-tuning run, resumed where it started.

    ``task``: ``{"kind": "pretrain" | "run", "dir": str, "config": dict}`` and optionally ``"devices"`` and
    ``"accel"`` (the torch fast path's mode, `keras_transfer.accel.MODES`, for a Ray worker) (plain
    data, so a Ray worker can take it). Returns ``{"dir", "ok", "error", "seconds"}``; an error is recorded in the run's
    ``error.txt`` as one line, and never raised (``KeyboardInterrupt`` aside).
    """
    import keras

    from keras_transfer import runner

    d, t0 = task["dir"], time.perf_counter()
    if task.get("accel", accel.mode()) != accel.mode():  # a Ray worker: the fast path as the command has it
        accel.configure(task["accel"])
    try:
        cfg = config_lib.merge(config_lib.RunConfig(), task["config"], keep_none=True)
        resume = os.path.isfile(rundir.config_path(d))
        os.makedirs(d, exist_ok=True)
        if os.path.exists(rundir.error_path(d)):
            os.remove(rundir.error_path(d))
        if not resume:
            config_lib.save(cfg, rundir.config_path(d))
        echo = task.get("echo")
        devices = task.get("devices", 1)
        if task["kind"] == "pretrain":
            runner.pretrain(cfg, d, echo=echo, resume=resume, devices=devices)
        else:
            runner.finetune(cfg, d, echo=echo, resume=resume, devices=devices)
        return {"dir": d, "ok": True, "error": None, "seconds": time.perf_counter() - t0}
    except Exception as e:  # fault containment: the study records it and goes on
        line = str(e).splitlines()[0] if str(e) else ""
        line = f"{type(e).__name__}: {line}" if not isinstance(e, KTransferError) else line
        atomic_write_text(rundir.error_path(d), line + "\n\n" + traceback.format_exc())
        return {"dir": d, "ok": False, "error": line, "seconds": time.perf_counter() - t0}
    finally:
        keras.backend.clear_session()


def read_error(d):
    try:
        with open(rundir.error_path(d)) as f:
            return f.readline().strip()
    except OSError:
        return None


def tasks(study, study_dir):
    """The pretrain tasks, then the run tasks, of what is not finished yet."""
    states = {d: state for _, _, d, state in plan(study, study_dir)}
    needed = {r.pretrain for r in study.runs if states[run_path(study_dir, r)] != "finished"}
    pre = [{"kind": "pretrain", "dir": pretrain_path(study_dir, n), "config": config_lib.to_dict(c),
            "accel": accel.mode()}
           for n, c in study.pretrains.items() if states[pretrain_path(study_dir, n)] != "finished" and n in needed]
    runs = [{"kind": "run", "dir": run_path(study_dir, r),
             "config": config_lib.to_dict(run_config(study, r, study_dir)),
             "pretrain": pretrain_path(study_dir, r.pretrain) if r.pretrain else None, "accel": accel.mode()}
            for r in study.runs if states[run_path(study_dir, r)] != "finished"]
    return pre, runs


def run_local(pre, runs, echo=None):
    """Run the tasks one after another in this process."""
    results = []
    for i, task in enumerate(pre + runs, 1):
        blocked = _blocked(task)
        if blocked:
            results.append(blocked)
        else:
            if echo:
                echo(f"[{i}/{len(pre) + len(runs)}] {task['kind']} {os.path.relpath(task['dir'])}")
            results.append(execute({**task, "echo": echo}))
        if echo and not results[-1]["ok"]:
            echo(f"  failed: {results[-1]['error']}")
    return results


def _blocked(task):
    """The one-line error of a run whose shared pretraining failed (recorded in its directory), or None."""
    failed = task.get("pretrain") and read_error(task["pretrain"])
    if not failed:
        return None
    line = f"pretraining {os.path.basename(task['pretrain'])} failed: {failed}"
    os.makedirs(task["dir"], exist_ok=True)
    atomic_write_text(rundir.error_path(task["dir"]), line + "\n")
    return {"dir": task["dir"], "ok": False, "error": line, "seconds": 0.0}


def ray_env(gpus_per_run):
    """Environment of a Ray task: this process's backend; no GPU pre-allocation (several tasks may share one
    GPU); with no GPU asked for, none visible (Ray no longer hides GPUs from tasks that ask for none)."""
    env = {"KERAS_BACKEND": _backend(), "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
           "TF_FORCE_GPU_ALLOW_GROWTH": "true"}
    if not gpus_per_run:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_ray(pre, runs, address=None, cpus_per_run=1.0, gpus_per_run=0.0, echo=None):
    """Hand each task to a Ray cluster (``address``; None: the running instance, or a new local one): the
    pretrain runs first, then the fine-tuning runs, one task each, with the resources given. A task whose
    worker dies (out of memory, a crash) is recorded as failed like any other."""
    try:
        import ray
    except ImportError as e:
        raise ConfigError("--executor ray: expected Ray to be installed (pip install 'keras-transfer[ray]'). "
                          "Received: import ray failed") from e
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(execute).options(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=0,
                                         runtime_env={"env_vars": ray_env(gpus_per_run)})
    results = []
    try:
        for wave in (pre, runs):
            pending = {}
            for task in wave:
                blocked = _blocked(task)
                if blocked:
                    results.append(blocked)
                else:
                    pending[remote.remote(task)] = task
            if echo and pending:
                echo(f"ray: {len(pending)} {wave[0]['kind']} task(s) submitted")
            while pending:
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                task = pending.pop(ref)
                try:
                    r = ray.get(ref)
                except ray.exceptions.RayError as e:  # the worker died: execute() could not record it
                    line = f"Ray task failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    os.makedirs(task["dir"], exist_ok=True)
                    atomic_write_text(rundir.error_path(task["dir"]), line + "\n")
                    r = {"dir": task["dir"], "ok": False, "error": line, "seconds": 0.0}
                results.append(r)
                if echo:
                    echo(f"  {'done' if r['ok'] else 'failed'} {os.path.relpath(r['dir'])}"
                         + ("" if r["ok"] else f": {r['error']}"))
    finally:
        if started:
            ray.shutdown()
    return results


def _backend():
    import keras

    return keras.config.backend()


def prepare_dir(study, out):
    """Create (or reuse) the study directory and record the study file in it."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"Expected a directory for the study output. Received: {out} is a file")
    existing = os.path.isdir(out) and os.listdir(out)
    if existing and not os.path.isfile(os.path.join(out, rundir.STUDY_FILE)):
        raise ConfigError(f"{out} exists and holds no study ({rundir.STUDY_FILE}): expected a new directory or "
                          f"this study's own. Received: --out {out}")
    check_compatible(study, out)
    try:
        os.makedirs(out, exist_ok=True)
        atomic_write_text(os.path.join(out, rundir.STUDY_FILE), yaml.safe_dump(study.document, sort_keys=False))
    except OSError as e:
        raise ConfigError(f"Expected a writable study directory. Received: {out} ({e.strerror})") from None
    return out


@contextlib.contextmanager
def lock(study_dir):
    """Hold ``STUDY/.lock`` (this process's id) while the study runs: a second ``ktransfer study`` on the same
    directory is refused while the first is alive; the lock of a process that died (``kill -9``) is taken
    over."""
    path = os.path.join(study_dir, ".lock")
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                with open(path) as f:
                    pid = int(f.read().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                raise ConfigError(f"{study_dir} is in use by another ktransfer study (process {pid}): expected one "
                                  f"study at a time per directory. Received: a second one") from None
            os.remove(path)
    else:
        raise ConfigError(f"Could not lock {study_dir}: expected to create {path}. Received: it reappeared")
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    try:
        yield
    finally:
        if os.path.exists(path):
            os.remove(path)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def estimate(study, study_dir):
    """A line on how much work is left, with a time estimate from the finished runs' wall times."""
    states = plan(study, study_dir)
    n_pre = sum(1 for k, *_ in states if k == "pretrain")
    left = [(k, d) for k, _, d, s in states if s != "finished"]
    trainings = len(study.runs) * len(study.base.transfer.strategies) + n_pre
    line = (f"{len(study.conditions)} condition(s) x {len(study.seeds)} seed(s) = {len(study.runs)} run(s) of "
            f"{len(study.base.transfer.strategies)} strategies, {n_pre} shared pretrain run(s): {trainings} "
            f"trainings; {len(left)} of {len(states)} run directories to do")
    times = []
    for k, _, d, s in states:
        if s == "finished" and k == "run":
            try:
                summary = read_json(rundir.summary_path(d))
                times.append(sum(v["wall_time"] for v in summary["strategies"].values()))
            except (OSError, ValueError, KeyError, TypeError):
                pass
    runs_left = sum(1 for k, _ in left if k == "run")
    if times and runs_left:
        per = sum(times) / len(times)
        left_s = per * runs_left
        left_text = f"{left_s / 60:.0f} min" if left_s >= 90 else f"{left_s:.0f} s"
        line += f"; about {left_text} of training left at {per:.0f} s per finished run"
    return line
