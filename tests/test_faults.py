"""Reliability under faults (issue 20): a kill -9 anywhere, Ctrl-C and SIGTERM, a full disk, damaged checkpoints and
two processes on one run folder, each tried on real ``b4m content`` runs of the built-in world (CPU, tiny settings),
and every resume compared tensor for tensor with an uninterrupted run of the same seed. ``pytest -m faults`` runs
them alone; docs/reliability.md lists the cases and their outcomes.

The runs that must die (SIGKILL at a point of the run, a file-size limit) are subprocesses of ``tests/fault_run.py``,
two at a time; the resumes and the reference run share one world model in this process. Every run uses one thread,
so a subprocess and this process compute bit for bit the same.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import b4m.runs.stages as stages_module
import b4m.training.checkpoint as checkpoint_module
import b4m.training.loop as loop_module
from b4m import B4MError
from b4m.adapter.file import PARTS, adapter_from_model, load_adapter, save_adapter
from b4m.cli import app
from b4m.cli.app import main
from b4m.files import load_safetensors, save_safetensors
from b4m.images import save_image_set
from b4m.loading import load_model
from b4m.runs.folder import LOCK_FILE, check_run_folder, run_folder_lock
from b4m.training.checkpoint import checkpoints, read_checkpoint
from b4m.training.config import TrainConfig
from b4m.training.loop import train
from b4m.world.catalog import default_catalog
from b4m.world.tasks import TaskConfig, make_task

pytestmark = pytest.mark.faults

HELPER = Path(__file__).parent / "fault_run.py"
TINY = ["--model", "world", "--resolution", "16", "--rank", "4", "--batch-size", "1", "--grad-accum", "1"]
TINY += ["--export-format", "diffusers", "--checkpoint-minutes", "0"]
REFERENCE_STEPS = 12
# Sizes at rank 4 on the world: a checkpoint's adapter file is ~503 kB, its state.pt ~609 kB.
STATE_FAILS, ADAPTER_FAILS = 560_000, 400_000


# --------------------------------------------------------------------------------------------------------------------
# Runs: the data, the world model, the command in this process and in subprocesses


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """A content's references and one auxiliary set, rendered by the world (as a user has them: image folders)."""
    root = tmp_path_factory.mktemp("faults")
    task = make_task(default_catalog(), "teapot", "sunburst", 16, TaskConfig(refs=2, aux_sets=1, aux_size=2))
    save_image_set(task.content_refs.images, task.content_refs.captions, root / "images")
    save_image_set(task.content_aux[0].images, task.content_aux[0].captions, root / "aux" / "00")
    (root / "tiny.toml").write_text("[train]\nkeep_checkpoints = 20\n[validation]\nseeds = []\n")
    return {"root": root, "prompt": task.content_refs.captions[0]}


def args(data: dict, out: Path, steps: int, every: int, *extra: str) -> list[str]:
    """``b4m content`` on ``data`` into ``out``: ``steps`` steps, a checkpoint every ``every``."""
    root = data["root"]
    paths = ["-c", root / "tiny.toml", "--images", root / "images", "--aux", root / "aux", "--prompt", data["prompt"]]
    paths += ["--placeholder", "sks"]
    return [
        str(a) for a in ["content", *paths, "-o", out, "--steps", steps, "--checkpoint-every", every, *TINY, *extra]
    ]


@pytest.fixture(scope="module")
def world():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses: bit-identical results
    yield load_model("world", resolution=16)
    torch.set_num_threads(threads)


def run_here(world, argv: list[str]):
    """The command in this process (CliRunner), on the loaded world model; returns the CliRunner result."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stages_module, "load_model", lambda *a, **k: world)
        return CliRunner().invoke(app, argv)


def ok(result) -> None:
    assert result.exit_code == 0, result.output + repr(result.exception)


def launch(point: str, argv: list[str], fsize: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if fsize is not None:
        env["B4M_TEST_FSIZE"] = str(fsize)
    cmd = [sys.executable, str(HELPER), point, *argv]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_jobs(jobs: dict[str, tuple]) -> dict[str, tuple[int, str]]:
    """Run ``{name: (point, argv, fsize)}`` two at a time (2 cores, one thread each); ``{name: (rc, stderr)}``."""
    results, queue, running = {}, list(jobs.items()), {}
    while queue or running:
        while queue and len(running) < 2:
            name, job = queue.pop(0)
            running[name] = launch(*job)
        done = [name for name, proc in running.items() if proc.poll() is not None]
        for name in done:
            proc = running.pop(name)
            results[name] = (proc.returncode, proc.communicate()[1])
        time.sleep(0.05)
    return results


def run_together(root: Path, argvs: dict[str, list[str]]) -> dict[str, tuple[int, str]]:
    """Start the commands ``argvs`` at once; whichever holds the run folder first trains only once another has
    ended (so the others surely met its lock, however slowly each started)."""
    gate = root / "gate"
    procs = {name: launch(f"hold:{gate}", argv) for name, argv in argvs.items()}
    deadline = time.monotonic() + 300
    while all(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    gate.touch()
    return {name: (p.wait(timeout=300), p.communicate()[1]) for name, p in procs.items()}


def assert_same(path: Path, tensors: dict) -> None:
    adapter = load_adapter(path)
    assert adapter.modules == sorted(tensors)
    for name in adapter.modules:
        for part in PARTS:
            assert torch.equal(adapter.tensors[name][part], tensors[name][part]), (name, part)


def leftovers(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name.endswith((".tmp", ".old")))


def assert_whole(out: Path) -> None:
    """Every checkpoint under its final name reads back whole (no half-written one, ever)."""
    for ckpt in checkpoints(out):
        read_checkpoint(ckpt)


@pytest.fixture(scope="module")
def reference(world, data, tmp_path_factory) -> dict[int, dict]:
    """An uninterrupted run of the same seed: its adapter after every step (the checkpoints' tensors)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    ok(run_here(world, args(data, out, REFERENCE_STEPS, 1)))
    return {int(c.name[5:]): load_adapter(c / "adapter.b4m.safetensors").tensors for c in checkpoints(out)}


@pytest.fixture(scope="module")
def finished(world, data, tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4 (copied by the tests that damage or extend it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    ok(run_here(world, args(data, out, 4, 2)))
    return out


KILLS = ["adapter-written:2", "state-written:4", "after-rename:4", "step:3", "final-adapter"]


@pytest.fixture(scope="module")
def subprocess_runs(data, finished, tmp_path_factory) -> dict:
    """Every run that must die or fail, as subprocesses: ``{name: (out, returncode, stderr)}``."""
    root = tmp_path_factory.mktemp("dying")
    jobs, outs = {}, {}
    for point in KILLS:
        outs[point] = root / point.replace(":", "-")
        jobs[point] = (point, args(data, outs[point], 4, 2), None)
    outs["full-first"] = root / "full-first"
    jobs["full-first"] = ("none", args(data, outs["full-first"], 4, 2), STATE_FAILS)
    outs["full-later"] = root / "full-later"
    shutil.copytree(finished, outs["full-later"])
    jobs["full-later"] = ("none", args(data, outs["full-later"], 6, 2, "--resume"), ADAPTER_FAILS)
    results = run_jobs(jobs)
    # Two runs started together on one folder: a content and a style run, -o the same.
    outs["content"] = outs["style"] = root / "both"
    both = args(data, outs["content"], 2, 2)
    results.update(run_together(root, {"content": both, "style": ["style", *both[1:]]}))
    return {name: (outs[name], *result) for name, result in results.items()}


# --------------------------------------------------------------------------------------------------------------------
# kill -9


@pytest.mark.parametrize("point", KILLS)
def test_kill_9_anywhere_then_resume_gives_the_uninterrupted_adapter(subprocess_runs, world, data, reference, point):
    """SIGKILL mid-step, at each phase of a checkpoint write (adapter written, state written, renamed) and inside the
    final adapter's write; ``--resume`` then finishes with the adapter of an uninterrupted run, bit for bit. No
    checkpoint is half-written under its final name; the dead process's lock is no obstacle."""
    out, rc, err = subprocess_runs[point]
    assert rc == -signal.SIGKILL, err
    assert (out / LOCK_FILE).exists()  # left by the killed process, whose lock the kernel released
    assert_whole(out)
    check_run_folder(out, "content", resume=True, overwrite=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok(run_here(world, args(data, out, 4, 2, "--resume")))
    said = [str(w.message) for w in caught]
    if point == "adapter-written:2":  # killed in the first checkpoint's write: nothing to resume from, and it says so
        assert any("--resume found no complete checkpoint; starting from step 0" in s for s in said), said
    assert_same(out / "content.b4m.safetensors", reference[4])
    assert_whole(out)
    assert leftovers(out) == [] and not (out / LOCK_FILE).exists()


# --------------------------------------------------------------------------------------------------------------------
# Signals


@pytest.mark.parametrize("signum", [signal.SIGINT])
def test_ctrl_c_checkpoints_says_how_to_resume_and_the_resume_is_exact(world, data, reference, tmp_path, signum):
    """A real Ctrl-C (SIGINT from outside, at whatever step the run is in): a checkpoint at the end of that step,
    one line with the command that resumes, exit 130; the resume ends with the uninterrupted run's adapter. While
    the run holds its folder, a second run on it is refused (a real second process)."""
    out = tmp_path / "run"
    proc = launch("none", args(data, out, REFERENCE_STEPS, 2))
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "step-000002").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    other = run_here(world, ["style", *args(data, out, 2, 2)[1:]])
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert isinstance(other.exception, B4MError) and str(other.exception) == (
        f"{out}: another b4m run (process {proc.pid}) is using this folder; wait for it to end or choose another -o"
    )
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("stopped by SIGINT after step "), err
    step = int(last.split("after step ")[1].split()[0])
    assert 2 <= step < REFERENCE_STEPS
    assert f"; checkpoint {out / 'checkpoints' / f'step-{step:06d}'}; resume with: b4m content " in last
    assert last.endswith(" --resume") and checkpoints(out)[-1].name == f"step-{step:06d}"
    ok(run_here(world, args(data, out, REFERENCE_STEPS, 2, "--resume")))
    assert_same(out / "content.b4m.safetensors", reference[REFERENCE_STEPS])


@contextlib.contextmanager
def guarded():
    """Signals that reach this process while b4m's handlers are not installed fail the test instead of pytest."""

    def fail(signum, frame):
        raise AssertionError(f"signal {signum} reached the test: b4m's handler was not installed")

    before = {s: signal.signal(s, fail) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield fail
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def self_signal(monkeypatch, at_step: int, signum: int, at_state: int | None = None) -> None:
    """Send this process ``signum`` at the start of optimizer step ``at_step`` (and again as the checkpoint of step
    ``at_state`` is written)."""
    real_step, real_state, calls = loop_module.train_step, checkpoint_module._write_state, []

    def train_step(*a, **k):
        calls.append(1)
        if len(calls) == at_step:
            os.kill(os.getpid(), signum)
        return real_step(*a, **k)

    def write_state(state, path):
        if state["step"] == at_state:
            os.kill(os.getpid(), signum)
        real_state(state, path)

    monkeypatch.setattr(loop_module, "train_step", train_step)
    monkeypatch.setattr(checkpoint_module, "_write_state", write_state)


def main_exits(world, monkeypatch, capsys, argv: list[str]) -> tuple[int, str]:
    """``b4m`` (its real entry point) in this process on the loaded world; returns its exit status and stderr."""
    monkeypatch.setattr(stages_module, "load_model", lambda *a, **k: world)
    monkeypatch.setattr(sys, "argv", ["b4m", *argv])
    with guarded() as fail:
        with pytest.raises(SystemExit) as exit_:
            main()
        assert signal.getsignal(signal.SIGINT) is fail and signal.getsignal(signal.SIGTERM) is fail  # restored
    monkeypatch.undo()
    return exit_.value.code, capsys.readouterr().err


def test_sigterm_checkpoints_at_the_end_of_the_step_and_exits_143(
    world, data, reference, tmp_path, monkeypatch, capsys
):
    """SIGTERM (a batch scheduler's notice before its SIGKILL) during step 3 of 4: checkpoint step 3, exit 143."""
    out = tmp_path / "run"
    self_signal(monkeypatch, 3, signal.SIGTERM)
    code, err = main_exits(world, monkeypatch, capsys, args(data, out, 4, 2))
    assert code == 143, err
    ckpt = out / "checkpoints" / "step-000003"
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"stopped by SIGTERM after step 3 of 4; checkpoint {ckpt}; resume with: b4m content ")
    assert last.endswith(" --resume") and "Traceback" not in err and checkpoints(out)[-1] == ckpt
    ok(run_here(world, args(data, out, 4, 2, "--resume")))
    assert_same(out / "content.b4m.safetensors", reference[4])


def test_a_second_ctrl_c_while_the_checkpoint_is_written_stops_at_once_and_corrupts_nothing(
    world, data, reference, tmp_path, monkeypatch, capsys
):
    """Ctrl-C in step 3, again while step 3's checkpoint is written: the run stops at once, the checkpoint being
    written is dropped whole (step 2's stays), exit 130, and the resume is still exact. The handlers are b4m's only
    while it trains."""
    out = tmp_path / "run"
    self_signal(monkeypatch, 3, signal.SIGINT, at_state=3)
    code, err = main_exits(world, monkeypatch, capsys, args(data, out, 4, 2))
    assert code == 130, err
    kept = out / "checkpoints" / "step-000002"
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"stopped at once by a second SIGINT after step 3; the last checkpoint is {kept}; resume ")
    assert [c.name for c in checkpoints(out)] == ["step-000002"] and leftovers(out) == []
    ok(run_here(world, args(data, out, 4, 2, "--resume")))
    assert_same(out / "content.b4m.safetensors", reference[4])


# --------------------------------------------------------------------------------------------------------------------
# A full disk (a real file-size limit: safetensors' SafetensorError, torch.save's RuntimeError)


def test_a_full_disk_at_the_first_checkpoint_is_one_line_and_no_dead_end(subprocess_runs, world, data, reference):
    """state.pt cannot be written (torch.save's RuntimeError): one line naming the folder, nothing left that looks
    like a checkpoint; then a plain run is accepted and ``--resume`` says there is nothing to resume and starts."""
    out, rc, err = subprocess_runs["full-first"]
    assert rc == 2, err
    assert err.count("\n") == 1 and err.startswith(
        f"error: {out / 'checkpoints'}: could not write the checkpoint of step 2 ("
    ), err
    assert err.rstrip().endswith("no earlier checkpoint exists (--resume starts over)")
    assert checkpoints(out) == [] and leftovers(out) == []
    check_run_folder(out, "content", resume=False, overwrite=False)  # not "an unfinished run": none was saved
    with pytest.warns(UserWarning, match="--resume found no complete checkpoint; starting from step 0"):
        ok(run_here(world, args(data, out, 4, 2, "--resume")))
    assert_same(out / "content.b4m.safetensors", reference[4])


def test_a_full_disk_later_keeps_the_last_good_checkpoint(subprocess_runs, world, data, reference):
    """The adapter file of step 6's checkpoint cannot be written (SafetensorError): one line naming the folder and
    the checkpoint kept; step 4's checkpoint is whole and the resume from it is exact."""
    out, rc, err = subprocess_runs["full-later"]
    assert rc == 2, err
    kept = out / "checkpoints" / "step-000004"
    assert err.count("\n") == 1 and err.startswith(
        f"error: {out / 'checkpoints'}: could not write the checkpoint of step 6 ("
    ), err
    assert "File too large" in err and err.rstrip().endswith(f"the previous one is kept ({kept})")
    assert [c.name for c in checkpoints(out)] == ["step-000002", "step-000004"] and leftovers(out) == []
    assert_whole(out)
    ok(run_here(world, args(data, out, 6, 2, "--resume")))
    assert_same(out / "content.b4m.safetensors", reference[6])


@contextlib.contextmanager
def file_size_limit(limit: int):
    import resource

    before = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, before[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, before)
        signal.signal(signal.SIGXFSZ, handler)


def test_a_full_disk_at_the_final_files_is_one_line_and_leaves_nothing(finished, tmp_path):
    """The final adapter, the plain LoRA exports (safetensors) and run.json (text): one line naming the file; no file
    under its name, no temporary one beside it."""
    from b4m.files import atomic_path

    adapter = load_adapter(finished / "content.b4m.safetensors")
    with file_size_limit(10_000):
        with pytest.raises(B4MError, match=r"content.b4m.safetensors: could not write \(.*File too large"):
            save_adapter(adapter, tmp_path / "content.b4m.safetensors")
        with pytest.raises(B4MError, match=r"lora.safetensors: could not write \(.*File too large"):
            save_safetensors({"x": torch.zeros(10_000)}, tmp_path / "lora.safetensors", {})
        with (
            pytest.raises(B4MError, match=r"run.json: could not write \(File too large\)"),
            atomic_path(tmp_path / "run.json") as tmp,
        ):
            tmp.write_text("x" * 20_000)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------------------------
# Damaged checkpoints


def _truncate(ckpt: Path) -> None:
    state = ckpt / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])


def _empty(ckpt: Path) -> None:
    (ckpt / "state.pt").write_bytes(b"")


def _retensor(ckpt: Path, part: str) -> None:
    file = ckpt / "adapter.b4m.safetensors"
    tensors, meta = load_safetensors(file)
    key = next(k for k in sorted(tensors) if k.endswith(part))
    tensors[key] = tensors[key] + 1e-3
    save_safetensors(tensors, file, meta)


def _bad_json(ckpt: Path) -> None:
    state = torch.load(ckpt / "state.pt", weights_only=True)
    state["fingerprint"] = '{"seed": 0, '
    torch.save(state, ckpt / "state.pt")


DAMAGES = {
    "truncated state.pt": (_truncate, "state.pt: unreadable"),
    "0-byte state.pt": (_empty, "state.pt: unreadable"),
    "frozen part altered (fingerprint)": (lambda c: _retensor(c, "up_frozen"), "not the file state.pt was saved"),
    "learned part altered": (lambda c: _retensor(c, "down_learned"), "not the file state.pt was saved"),
    "unreadable JSON": (_bad_json, "state.pt: unreadable"),
    "adapter file gone": (lambda c: (c / "adapter.b4m.safetensors").unlink(), "adapter.b4m.safetensors: missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_good_one(
    finished, world, data, reference, tmp_path, damage
):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    spoil, reason = DAMAGES[damage]
    spoil(out / "checkpoints" / "step-000004")
    with pytest.warns(UserWarning) as caught:
        ok(run_here(world, args(data, out, 6, 2, "--resume")))
    said = [str(w.message) for w in caught if "damaged" in str(w.message)]
    assert len(said) == 1 and said[0].startswith(f"{out / 'checkpoints'}: damaged (step-000004: "), said
    assert reason in said[0] and said[0].endswith("; resuming from step-000002"), said
    assert_same(out / "content.b4m.safetensors", reference[6])
    assert [c.name for c in checkpoints(out)] == ["step-000002", "step-000004", "step-000006"]
    assert_whole(out)  # step 4 written again, over the damaged one


def test_no_good_checkpoint_is_one_line_not_a_restart(finished, world, data, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    _empty(out / "checkpoints" / "step-000004")
    _truncate(out / "checkpoints" / "step-000002")
    result = run_here(world, args(data, out, 6, 2, "--resume"))
    assert isinstance(result.exception, B4MError), result.output
    message = str(result.exception)
    assert "\n" not in message and message.startswith(
        f"{out / 'checkpoints'}: no good checkpoint to resume from (step-000004: state.pt: unreadable ("
    )
    assert "; step-000002: state.pt: unreadable (" in message and message.endswith("); --overwrite starts again")
    assert [c.name for c in checkpoints(out)] == ["step-000002", "step-000004"]


# --------------------------------------------------------------------------------------------------------------------
# Two processes on one run folder


def test_two_runs_started_together_on_one_folder_one_is_refused(subprocess_runs):
    """A content and a style run started together with the same -o: one runs, the other is refused at once with a
    line naming the folder (before loading the model); the folder holds one run, whole."""
    out, rc_content, err_content = subprocess_runs["content"]
    _, rc_style, err_style = subprocess_runs["style"]
    assert sorted([rc_content, rc_style]) == [0, 2], (err_content, err_style)
    won, refused = ("content", err_style) if rc_content == 0 else ("style", err_content)
    # the holder's id, unless it had the lock but not yet written its id (then "another process")
    assert refused.startswith(f"error: {out}: another b4m run (") and refused.count("\n") == 1, refused
    assert re.match(r"\((process \d+|another process)\)", refused.split("another b4m run ")[1]), refused
    assert refused.rstrip().endswith("is using this folder; wait for it to end or choose another -o")
    load_adapter(out / f"{won}.b4m.safetensors")
    assert not (out / f"{'style' if won == 'content' else 'content'}.b4m.safetensors").exists()
    assert not (out / LOCK_FILE).exists()


def test_the_lock_is_one_per_folder_and_leaves_no_folder_behind(tmp_path):
    out = tmp_path / "new"
    with run_folder_lock(out):
        assert (out / LOCK_FILE).read_text().strip() == str(os.getpid())
        refused = f"^{re.escape(str(out))}: another b4m run \\(process {os.getpid()}\\) is using this folder"
        with pytest.raises(B4MError, match=refused), run_folder_lock(out):
            pass
    assert not out.exists()  # made for the lock, left empty: removed
    with run_folder_lock(out):
        (out / "run.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["run.json"]


# --------------------------------------------------------------------------------------------------------------------
# The loop: checkpoints every N minutes, NaN weights, handlers, several processes (the toy model of test_train)


def test_checkpoints_every_n_minutes_too(tmp_path):
    from test_train import attached, toy_sets

    model, plp = attached()
    base = dict(steps=3, routing="clean", owned="up", grad_accum=1, checkpoint_every=100, keep_checkpoints=10)
    train(model, plp, toy_sets(model), TrainConfig(**base, checkpoint_minutes=1e-9), tmp_path / "timed")
    assert [c.name for c in checkpoints(tmp_path / "timed")] == ["step-000001", "step-000002", "step-000003"]
    train(model, plp, toy_sets(model), TrainConfig(**base, checkpoint_minutes=0), tmp_path / "steps")
    assert [c.name for c in checkpoints(tmp_path / "steps")] == ["step-000003"]
    with pytest.raises(B4MError, match="checkpoint_minutes must be at least 0"):
        TrainConfig(checkpoint_minutes=-1)


def test_an_adapter_with_nan_is_never_written(tmp_path, monkeypatch):
    from test_train import attached, toy_sets

    model, plp = attached()
    adapter = adapter_from_model(model.denoiser, plp, "content")
    name = adapter.modules[0]
    adapter.tensors[name]["down_learned"][0, 0] = float("inf")
    with pytest.raises(B4MError, match=f"not written, {name}.down_learned holds NaN or Inf"):
        save_adapter(adapter, tmp_path / "a.b4m.safetensors")
    assert list(tmp_path.iterdir()) == []
    # A finite loss, then a step to NaN weights: the loop stops before writing them.
    real_step = loop_module.train_step

    calls = []

    def poisoned(*a, **k):
        loss = real_step(*a, **k)
        calls.append(1)
        if len(calls) == 2:  # after step 2's update, whose loss was finite
            next(iter(loop_module.plp_layers(model.denoiser).values())).up_learned.data.fill_(float("nan"))
        return loss

    monkeypatch.setattr(loop_module, "train_step", poisoned)
    config = TrainConfig(steps=4, routing="clean", owned="up", grad_accum=1, checkpoint_every=2)
    with pytest.raises(B4MError, match="the trained weights hold NaN/Inf after step 2; no checkpoint was written"):
        train(model, plp, toy_sets(model), config, tmp_path / "run")
    assert checkpoints(tmp_path / "run") == []


def test_handlers_only_while_training_and_only_in_the_main_thread(tmp_path):
    from test_train import attached, toy_sets

    model, plp = attached()
    config = TrainConfig(steps=1, routing="clean", owned="up", grad_accum=1)
    seen = []
    real_poll = checkpoint_module.Stopper.poll

    def poll(self, *a):
        seen.append(signal.getsignal(signal.SIGTERM))
        return real_poll(self, *a)

    with guarded() as fail, pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint_module.Stopper, "poll", poll)
        train(model, plp, toy_sets(model), config, tmp_path / "main")
        assert signal.getsignal(signal.SIGTERM) is fail and seen[-1] != fail  # b4m's while training, then back
        thread = threading.Thread(target=train, args=(model, plp, toy_sets(model), config, tmp_path / "thread"))
        thread.start()
        thread.join()
        assert seen[-1] is fail and checkpoints(tmp_path / "thread")  # a thread trains without touching them


def test_several_processes_stop_at_the_same_step(tmp_path):
    """Two gloo processes: SIGTERM reaches rank 1 only, in step 5; both stop after step 6 (the next loss read, where
    they agree), rank 0 with rank 1's signal. Rank 0's clock alone decides the timed checkpoints, the same steps on
    both."""
    import socket

    import torch.multiprocessing as mp

    from fault_run import stop_worker

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(stop_worker, args=(2, port, tmp_path), nprocs=2, join=True)
    decided = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for rank, steps in enumerate(decided):
        assert [(step, timed) for step, _, timed, _ in steps] == [(1, 0), (2, 1), (3, 0), (4, 1), (5, 0), (6, 1)]
        assert [step for step, stop, _, _ in steps if stop] == [6]
        assert steps[-1][3] == signal.SIGTERM and (rank == 1 or steps[-2][3] is None)
