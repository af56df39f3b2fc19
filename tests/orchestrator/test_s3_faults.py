"""Object storage under real conditions (C11 and wrong credentials): the moto S3 server behind a proxy that
answers chosen requests with 503 SlowDown or 403 InvalidAccessKeyId. Saves go through the real DCP writer
and the commit protocol in this process (no ranks)."""

from __future__ import annotations

import json
import uuid

import pytest
import torch
import torch.distributed.checkpoint as dcp

from support.jobs import tiny_job
from support.s3_proxy import S3Proxy
from v4train.orchestrator import checkpoint
from v4train.orchestrator.checkpoint import storage as storage_module
from v4train.orchestrator.checkpoint.storage import Storage
from v4train.orchestrator.control.fake_group import FakeRankGroup, Script
from v4train.orchestrator.control.supervisor import Phase, Supervisor
from v4train.orchestrator.control.telemetry import Telemetry
from v4train.orchestrator.spec import ClusterSpec, JobSpec
from v4train.orchestrator.tools import cli

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def proxy(s3_server):
    p = S3Proxy(s3_server["endpoint_url"])
    yield p
    p.close()


def _prefix() -> str:
    return f"s3://ckpts/faults-{uuid.uuid4().hex[:8]}"


def _save(storage: Storage, step: int) -> str:
    """One rank's DCP save of a small state into a fresh attempt; returns the attempt."""
    attempt = checkpoint.begin_attempt(storage, step)
    state = {"model.w": torch.arange(64.0) * step, "optim.w.exp_avg": torch.ones(16) * step}
    dcp.save(state, storage_writer=storage.dcp_writer(attempt), no_dist=True)
    return attempt


def test_c11_slowdown_on_uploads_and_on_the_publish_copy_is_retried_and_the_step_commits(proxy):
    storage = Storage(_prefix(), endpoint_url=proxy.url)
    injected = {"upload": 2, "copy": 1}

    def rule(request):
        if request.method != "PUT" or ".attempt-" not in request.path and not request.copy:
            return None
        kind = "copy" if request.copy else "upload"
        if request.path.split("?")[0].endswith(".distcp") or request.copy:
            if injected[kind] > 0:
                injected[kind] -= 1
                return 503, "SlowDown"
        return None

    proxy.rule = rule
    attempt = _save(storage, 2)
    final = checkpoint.commit(storage, attempt, 2, {"step": 2})
    assert injected == {"upload": 0, "copy": 0}
    assert [r.status for r in proxy.requests].count(503) == 3
    assert checkpoint.verify(storage, final)["step"] == 2 and checkpoint.latest_committed(storage) == final
    assert proxy.creates_bucket() == []


def test_c11_a_resave_after_a_half_written_attempt_and_publish_commits(proxy):
    storage = Storage(_prefix(), endpoint_url=proxy.url)
    first = _save(storage, 4)
    storage.remove(f"{first}/.metadata")  # the first attempt died before its metadata
    storage.write_text("step_00000004/__0_0.distcp", "half a publish")  # and a publish was cut short
    attempt = _save(storage, 4)
    final = checkpoint.commit(storage, attempt, 4, {"step": 4})
    assert checkpoint.verify(storage, final)["step"] == 4
    assert first in checkpoint.apply_retention(storage, keep=0)
    assert [c["name"] for c in checkpoint.list_checkpoints(storage)] == ["step_00000004"]
    assert proxy.creates_bucket() == []


def test_c11_no_create_bucket_is_ever_sent(proxy):
    """DCP's fsspec writer asks s3fs for the checkpoint "directory", which becomes CreateBucket when the bucket
    is missing; the Storage's writer never sends it. (The first half fails when torch stops doing so.)"""
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    url = f"s3://missing-{uuid.uuid4().hex[:8]}/prefix/attempt"
    options = Storage("s3://ckpts", endpoint_url=proxy.url).options
    dcp.save({"w": torch.ones(4)}, storage_writer=FsspecWriter(url, **options), no_dist=True)  # creates the bucket
    assert proxy.creates_bucket(), "torch's writer no longer creates the directory: drop _object_store_writer"
    proxy.requests.clear()
    url = f"s3://missing-{uuid.uuid4().hex[:8]}/prefix/attempt"
    with pytest.raises(BaseException) as info:  # noqa: B017 - DCP gathers it into a CheckpointException
        dcp.save({"w": torch.ones(4)}, storage_writer=Storage(url, endpoint_url=proxy.url).dcp_writer(""),
                 no_dist=True)
    assert "NoSuchBucket" in str(info.value) or "does not exist" in str(info.value)
    assert proxy.creates_bucket() == []


def test_c11_a_save_whose_publish_keeps_failing_is_recorded_and_the_next_commits(proxy, tmp_path, monkeypatch):
    from s3fs import S3FileSystem

    # fewer retries, so the copy's failure outlives them quickly
    monkeypatch.setattr(storage_module, "S3_RETRIES", {"mode": "standard", "max_attempts": 2})
    monkeypatch.setattr(S3FileSystem, "retries", 1)
    root = _prefix()
    job = JobSpec.model_validate(tiny_job(tmp_path / "no-dataset", train={"steps": 4},
                                          checkpoint={"every_steps": 2, "at_end": False, "async_save": False,
                                                      "root": root, "endpoint_url": proxy.url}))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)  # the fake ranks' own Storage has no endpoint of its own
    proxy.rule = _fail_copies_of("step_00000002")
    telemetry = Telemetry(tmp_path, 4, live=False)
    sup = Supervisor(job, ClusterSpec(name="fake", devices_per_node=2), str(tmp_path),
                     lambda: FakeRankGroup(2, Script()), telemetry)
    try:
        assert sup.run() is Phase.FINISHED, sup.failure
    finally:
        telemetry.close()
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    failed = [e for e in events if e["event"] == "checkpoint_failed"]
    assert len(failed) == 1 and failed[0]["step"] == 2 and "SlowDown" in failed[0]["error"]
    assert failed[0]["latest"] is None
    storage = Storage(root, endpoint_url=proxy.url)
    assert checkpoint.latest_committed(storage) == "step_00000004"
    assert checkpoint.verify(storage, "step_00000004")["step"] == 4
    assert proxy.creates_bucket() == []


def _fail_copies_of(step_dir: str):
    """A rule answering 503 SlowDown to every server-side copy into ``step_dir`` (a publish of that step)."""

    def rule(request):
        path = request.path.split("?")[0]
        return (503, "SlowDown") if request.copy and f"/{step_dir}/" in path else None

    return rule


# ---------------------------------------------------------------- wrong credentials
def test_wrong_credentials_are_refused_in_preflight_and_by_ckpt_list_with_one_line(proxy, tiny_dataset, tmp_path,
                                                                                   monkeypatch, capsys):
    """Seen on main: training two steps, then a 58-line PermissionError from recovery; `ckpt list` a traceback."""
    import yaml

    root = _prefix()
    proxy.rule = lambda r: (403, "InvalidAccessKeyId") if r.access_key == "WRONGKEY" else None
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "WRONGKEY")
    job = tiny_job(tmp_path / "unused", checkpoint={"root": root, "endpoint_url": proxy.url})
    job_path = tmp_path / "job.yaml"
    job_path.write_text(yaml.safe_dump(job))
    spec = JobSpec.model_validate(job)

    from v4train.orchestrator.control.preflight import check_checkpoint_root
    from v4train.orchestrator.spec import SpecError

    with pytest.raises(SpecError) as info:
        check_checkpoint_root(spec, root)
    assert str(info.value).startswith(f"checkpoint.root: {root} refused a probe write with the credentials")
    assert "\n" not in str(info.value)

    assert cli.main(["ckpt", "list", root, "--endpoint-url", proxy.url]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"v4train: error: {root}: PermissionError")

    # resume from the root alone looks for its newest commit before any other check
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump({"name": "sim1", "devices_per_node": 1}))
    job_path.write_text(yaml.safe_dump(tiny_job(tiny_dataset, checkpoint={"endpoint_url": proxy.url})))
    argv = ["resume", "--from", root, str(job_path), "--cluster", str(tmp_path / "cluster.yaml"), "--run-dir",
            str(tmp_path / "resumed")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"v4train: error: --from: cannot read {root} (PermissionError: Forbidden)"
    assert not (tmp_path / "resumed").exists()

    # submit, as a user runs it: exit 2 in preflight, before any rank trains
    job_path.write_text(yaml.safe_dump(tiny_job(tiny_dataset, checkpoint={"root": root, "endpoint_url": proxy.url})))
    argv = ["submit", str(job_path), "--cluster", str(tmp_path / "cluster.yaml"), "--run-dir", str(tmp_path / "run")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"v4train: error: checkpoint.root: {root} refused a probe write") and "\n" not in err
    assert not (tmp_path / "run").exists()
    assert not [r for r in proxy.requests if r.method == "PUT" and r.status == 200]  # nothing written


def test_an_unreachable_endpoint_is_one_line_and_exit_1_for_ckpt_and_exit_2_for_resume(tiny_dataset, tmp_path,
                                                                                       monkeypatch, capsys):
    """botocore's own errors (EndpointConnectionError: no OSError) were a 99-line traceback from `ckpt list`."""
    import yaml

    from v4train.orchestrator.control.rendezvous import free_port

    monkeypatch.setitem(storage_module.S3_RETRIES, "max_attempts", 1)  # the same error, without 60 s of backoff
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    endpoint, root = f"http://127.0.0.1:{free_port()}", "s3://ckpts/nowhere"
    for command in ("list", "verify"):
        assert cli.main(["ckpt", command, root, "--endpoint-url", endpoint]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"v4train: error: {root}: EndpointConnectionError: Could not connect") and "\n" not in err
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(tiny_job(tiny_dataset, checkpoint={"endpoint_url": endpoint})))
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump({"name": "sim1", "devices_per_node": 1}))
    assert cli.main(["resume", "--from", root, str(tmp_path / "job.yaml"), "--cluster", str(tmp_path / "cluster.yaml"),
                     "--run-dir", str(tmp_path / "resumed")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"v4train: error: --from: cannot read {root} (EndpointConnectionError: ") and "\n" not in err
    assert not (tmp_path / "resumed").exists()


def test_no_credentials_at_all_is_one_line(tmp_path, monkeypatch, capsys):
    """botocore's NoCredentialsError (no OSError) was a traceback from `ckpt list`."""
    from v4train.orchestrator.control.rendezvous import free_port

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert cli.main(["ckpt", "list", "s3://ckpts/x", "--endpoint-url", f"http://127.0.0.1:{free_port()}"]) == 1
    assert capsys.readouterr().err.strip() == ("v4train: error: s3://ckpts/x: NoCredentialsError: Unable to locate "
                                               "credentials")
