"""b4m sweep (b4m.sweep): jobs at once on 2 CPU workers, a retry, a skipped dependent, the ranked summary."""

from __future__ import annotations

import json
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from b4m import B4MError
from b4m.cli import app
from b4m.loading import load_model
from b4m.sweep import Job, load_jobs, make_slots, parse_jobs, read_metric, run_jobs
from b4m.world.bench.run import run_bench
from b4m.world.bench.variants import quick_config
from b4m.world.bench.workers import waves
from b4m.world.weights import load_shipped_oracle

runner = CliRunner()

# Small job scripts (python -c): no torch, a few tens of milliseconds each.
MEET = (
    "import pathlib, sys, time; d = pathlib.Path(sys.argv[1]); (d / sys.argv[2]).touch(); t = time.time()\n"
    "while not (d / sys.argv[3]).exists():\n"
    "    time.sleep(0.02)\n"
    "    if time.time() - t > 20: sys.exit('the other job never ran alongside')\n"
)
FLAKY = (
    "import pathlib, sys; m = pathlib.Path(sys.argv[1])\n"
    "if not m.exists():\n"
    "    m.touch(); sys.exit('error: first attempt fails')\n"
    "print('second attempt works')\n"
)
SCORE = "import json, sys; json.dump({'eval': {'score': float(sys.argv[2])}}, open(sys.argv[1], 'w'))"


def py(code: str, *args) -> list[str]:
    return [sys.executable, "-c", code, *map(str, args)]


def test_jobs_run_two_at_a_time_retry_once_and_skip_after_a_failure(tmp_path):
    jobs = [
        Job("ping", py(MEET, tmp_path, "ping", "pong")),  # each waits for the other: only passes if both run at once
        Job("pong", py(MEET, tmp_path, "pong", "ping")),
        Job("flaky", py(FLAKY, tmp_path / "marker")),
        Job("broken", py("import sys; print('error: no such folder'); sys.exit(3)")),
        Job("after-broken", py("print('never')"), depends_on=["broken"]),
        Job("after-after", py("print('never')"), depends_on=["after-broken"]),
        Job("after-flaky", py("print('ran')"), depends_on=["flaky", "ping"]),
    ]
    finished = []
    summary = run_jobs(
        jobs, tmp_path / "sweep", slots=make_slots(workers=2, gpus=[]), retries=1, poll=0.02, on_finish=finished.append
    )
    rows = {r["name"]: r for r in summary["jobs"]}
    assert {n: r["status"] for n, r in rows.items()} == {
        "ping": "done",
        "pong": "done",
        "flaky": "done",
        "broken": "failed",
        "after-broken": "skipped",
        "after-after": "skipped",
        "after-flaky": "done",
    }
    assert rows["flaky"]["attempts"] == 2 and rows["broken"]["attempts"] == 2 and rows["ping"]["attempts"] == 1
    assert rows["broken"]["returncode"] == 3 and rows["broken"]["note"] == "exit 3: error: no such folder"
    assert rows["after-broken"]["note"] == "broken failed" and rows["after-after"]["note"] == "after-broken skipped"
    assert rows["after-broken"]["attempts"] == 0 and rows["after-broken"]["log"] is None
    assert (summary["done"], summary["failed"], summary["skipped"]) == (4, 1, 2)
    assert {r["slot"] for r in summary["jobs"] if r["slot"]} == {"cpu0", "cpu1"}
    assert sorted(s.job.name for s in finished) == sorted(rows)
    # the log keeps every attempt; the summary file is what was returned
    log = (tmp_path / "sweep" / "logs" / "flaky.log").read_text()
    assert log.count("# attempt") == 2 and "error: first attempt fails" in log and "second attempt works" in log
    assert json.loads((tmp_path / "sweep" / "summary.json").read_text()) == summary


def test_seeds_expand_and_the_summary_ranks_them_by_the_metric(tmp_path):
    jobs_file = tmp_path / "jobs.toml"
    jobs_file.write_text(
        f"""
[sweep]
metric = "eval.score"
goal = "max"

[[jobs]]
name = "dog"
command = {json.dumps(py(SCORE, str(tmp_path / "s{seed}.json"), "0.{seed}"))}
seeds = [3, 7, 5]
result = "{tmp_path}/s{{seed}}.json"

[[jobs]]
name = "best"
command = {json.dumps(py("print('after all seeds')"))}
depends_on = ["dog"]
"""
    )
    jobs, settings = load_jobs(jobs_file)
    assert [j.name for j in jobs] == ["dog-s3", "dog-s7", "dog-s5", "best"]
    assert jobs[-1].depends_on == ["dog-s3", "dog-s7", "dog-s5"]  # a seed group's name stands for all its jobs
    assert jobs[1].result == f"{tmp_path}/s7.json" and jobs[1].command[-1] == "0.7"
    summary = run_jobs(jobs, tmp_path / "out", slots=make_slots(workers=2, gpus=[]), poll=0.02, **settings)
    assert summary["ranking"] == ["dog-s7", "dog-s5", "dog-s3"]
    assert summary["best_per_group"] == {"dog": "dog-s7"}
    assert [r["metric"] for r in summary["jobs"]] == [0.3, 0.7, 0.5, None]


def test_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "jobs.json").write_text(
        json.dumps(
            {
                "jobs": [
                    {"name": "version", "argv": ["b4m", "--version"]},  # a b4m command, run as python -m b4m.cli
                    {"name": "fails", "command": py("import sys; sys.exit(1)")},
                    {"name": "blocked", "command": py("pass"), "depends_on": "fails"},
                ]
            }
        )
    )
    result = runner.invoke(app, ["sweep", "jobs.json", "-o", "out", "--workers", "2", "--retries", "0"])
    assert result.exit_code == 1, result.output
    assert "1 done, 1 failed, 1 skipped" in result.output
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["status"] for r in summary["jobs"]] == ["done", "failed", "skipped"]
    assert summary["jobs"][0]["command"] == "b4m --version"
    assert (tmp_path / "out" / "logs" / "version.log").read_text().splitlines()[-1].startswith("b4m ")
    dry = runner.invoke(app, ["sweep", "jobs.json", "--dry-run", "--workers", "2"])
    assert dry.exit_code == 0 and "blocked: " in dry.output and "(after fails)" in dry.output


def test_each_job_sees_only_its_gpu(tmp_path):
    code = "import os, sys; open(sys.argv[1], 'w').write(os.environ['CUDA_VISIBLE_DEVICES'])"
    jobs = [Job(f"j{i}", py(code, tmp_path / f"j{i}")) for i in range(3)]
    slots = make_slots(gpus="3,5")
    assert [s.name for s in slots] == ["gpu3", "gpu5"]
    summary = run_jobs(jobs, tmp_path / "out", slots=slots, poll=0.02)
    assert summary["done"] == 3
    for i in range(3):
        row = summary["jobs"][i]
        assert (tmp_path / f"j{i}").read_text() == row["slot"][len("gpu") :]
    assert [s.name for s in make_slots(gpus="0,1", jobs_per_gpu=2)] == ["gpu0.0", "gpu1.0", "gpu0.1", "gpu1.1"]
    assert len(make_slots(workers=3, gpus=[])) == 3 and make_slots(workers=1, gpus="0,1")[0].gpu == "0"


def test_bad_jobs_files_fail_in_one_line(tmp_path):
    def bad(entries, match):
        with pytest.raises(B4MError, match=match):
            parse_jobs(entries)

    bad([{"name": "a", "argv": ["content"], "depends_on": ["b"]}], "job a depends on 'b', which is not a job")
    bad([{"name": "a", "argv": ["x"]}, {"name": "a", "argv": ["y"]}], "job name\\(s\\) used twice: a")
    bad([{"name": "a", "argv": ["x"], "command": ["y"]}], "give either argv")
    bad([{"name": "a"}], "give either argv")
    bad([{"name": "a b", "argv": ["x"]}], "needs a name")
    bad([{"name": "a", "argv": ["x"], "gpu": 1}], "unknown key\\(s\\) gpu")
    bad(
        [{"name": "a", "argv": ["x"], "depends_on": ["b"]}, {"name": "b", "argv": ["x"], "depends_on": ["a"]}],
        "dependency cycle among a, b",
    )
    (tmp_path / "empty.toml").write_text("[sweep]\nretries = 2\n")
    with pytest.raises(B4MError, match="no jobs"):
        load_jobs(tmp_path / "empty.toml")
    (tmp_path / "typo.toml").write_text("[sweep]\nretry = 2\n[[jobs]]\nname='a'\nargv=['x']\n")
    with pytest.raises(B4MError, match="unknown \\[sweep\\] setting\\(s\\): retry"):
        load_jobs(tmp_path / "typo.toml")


def test_the_metric_is_read_from_the_output_folder(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text(json.dumps({"final_loss": 0.25, "train": {"steps": 3}}))
    job = Job("c", ["b4m", "content", "-o", str(tmp_path / "run")])
    assert read_metric(job, "final_loss") == 0.25
    assert read_metric(job, "train.steps") == 3.0
    assert read_metric(job, "missing") is None
    assert read_metric(Job("x", ["true"]), "final_loss") is None


def test_an_interrupted_sweep_stops_its_jobs(tmp_path, monkeypatch):
    jobs = [Job("slow", py("import time; time.sleep(60)"))]
    calls = {"n": 0}
    real_sleep = time.sleep

    def interrupt(seconds):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        real_sleep(seconds)

    monkeypatch.setattr("b4m.sweep.scheduler.time.sleep", interrupt)
    started = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        run_jobs(jobs, tmp_path, slots=make_slots(workers=1, gpus=[]), poll=0.02)
    assert time.perf_counter() - started < 15
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["jobs"][0]["status"] == "failed" and summary["jobs"][0]["note"] == "interrupted"


# --------------------------------------------------------------------------------------------------------------------
# b4m bench through the runner


def test_waves_give_every_worker_its_own_stage1_runs():
    grid = [(c, s) for c in ("dog", "cat", "owl") for s in ("ink", "oil", "wax")]
    first, last = waves(grid)
    assert first == [("dog", "ink"), ("cat", "oil"), ("owl", "wax")]  # the diagonal: distinct contents and styles
    assert sorted(first + last) == sorted(grid)
    # a shared content: the second pair waits for the first's content run (its style is new), nothing is left
    assert waves([("dog", "ink"), ("dog", "oil")]) == [[("dog", "ink")], [("dog", "oil")]]


def test_bench_in_two_workers_scores_what_one_process_scores(tmp_path, monkeypatch):
    """A 2 × 2 grid of pairs (a wave of whole pairs, then a wave of single units) in 2 CPU workers: the same images,
    scores and losses as one process, stage-1 runs trained once each.

    All processes run one thread: CPU GEMMs may sum in another order with another thread count, which moves cosines in
    the 5th digit; equality is the claim, so the order must match."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the workers'
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # this process's
    try:
        pairs = [("teapot", "sunburst"), ("dog", "brick"), ("teapot", "brick"), ("dog", "sunburst")]
        config = quick_config(pairs=pairs, methods=["b4m"], steps=1, make_steps=1)
        loaded = {"model": load_model("world"), "oracle": load_shipped_oracle("a")}  # workers load their own
        one = run_bench(tmp_path / "one", config, **loaded)
        two = run_bench(tmp_path / "two", config, workers=2, **loaded)
    finally:
        torch.set_num_threads(threads)
    assert two["workers"] == 2 and "workers" not in one
    for key in ("per_image", "stage1_runs", "items", "summary"):
        assert two[key] == one[key], key
    # Losses are read before rounding: a worker's thread count may change the last bits of a float32 mean.
    flat = [(m, p, k) for m, pairs in one["final_losses"].items() for p, runs in pairs.items() for k in runs]
    assert flat == [(m, p, k) for m, pairs in two["final_losses"].items() for p, runs in pairs.items() for k in runs]
    for m, p, k in flat:
        assert two["final_losses"][m][p][k] == pytest.approx(one["final_losses"][m][p][k], rel=1e-5)
    assert one["stage1_runs"]["b4m"] == {"trained": 4, "reused": 4}
    jobs = json.loads((tmp_path / "two" / "workers" / "summary.json").read_text())["jobs"]
    assert [(j["name"], j["status"]) for j in jobs] == [
        ("wave1-1", "done"),
        ("wave1-2", "done"),
        ("wave2-1", "done"),
        ("wave2-2", "done"),
    ]
    assert jobs[2]["depends_on"] == ["wave1-1", "wave1-2"]
    # resumed with nothing left to run: no worker starts, the results are read back
    again = run_bench(tmp_path / "two", config, workers=2, resume=True, **loaded)
    assert again["per_image"] == one["per_image"] and again["commands"][-1]["units_run"] == 0


def test_sigterm_stops_the_jobs_too(tmp_path):
    import os
    import signal
    import threading

    jobs = [Job("slow", py("import time; time.sleep(60)"))]
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    with pytest.raises(SystemExit):
        run_jobs(jobs, tmp_path, slots=make_slots(workers=1, gpus=[]), poll=0.02)
    timer.join()
    assert json.loads((tmp_path / "summary.json").read_text())["jobs"][0]["note"] == "interrupted"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back
