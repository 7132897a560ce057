"""The pipeline on object storage: source and store on a real S3-protocol server (moto behind a
restartable loopback proxy, see tests/s3server.py), reached through s3fs exactly as in production.
Nothing is mocked: endpoint, region and credentials come from the environment."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import os
import signal
import socket
import subprocess
import tarfile
import time
import uuid
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import s3fs
import zarr
from torch.utils.data import DataLoader, IterableDataset

from pipeline.cli import main as cli_main
from pipeline.config import public_config
from pipeline.endpoints import quiet_lost_connections, unreachable_message
from pipeline.sources import read_items
from storage_specs.provenance import provenance, redact_url
from storage_specs.validate import validate_store
from tests.conftest import SMALL, cli, featinv, make_config, snakemake, store_objects, write_config
from tests.s3server import ACCESS_KEY, SECRET_KEY

# Small and fast: 9 photos (one truncated) in 9 shards (two jobs of 5 and 4: a run is caught
# between commits), one backbone at 64 px, two layers.
CONFIG = {
    "shard_size": 1,
    "backbones": [
        {
            "name": "resnet18",
            "weights": "random",
            "layers": ["layer2", "layer4"],
            "preprocessing": {"input_size": 64},
        }
    ],
}
N_SHARDS = 9
KEYS = sorted(k.rsplit(".", 1)[0] for k in SMALL)
CREDENTIALS = (ACCESS_KEY.encode(), SECRET_KEY.encode())


def _bucket_path(url: str) -> str:
    return url.removeprefix("s3://").rstrip("/")


def _commits(fs, store: str) -> int:
    return len(fs.glob(f"{_bucket_path(store)}/commits/main/*/zarr.json"))


def _run_until(proc: subprocess.Popen, done, timeout: float) -> bool:
    """Poll `done()` while `proc` runs; True once it holds (bounded by `timeout`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if done():
            return True
        time.sleep(0.2)
    return done()


def _background(tmp: Path, name: str, *args: str) -> tuple[subprocess.Popen, Path]:
    """Snakemake in its own process group, its output in a file (read after it ends)."""
    log = tmp / f"{name}.out"
    with log.open("w") as out:
        proc = snakemake(
            tmp / "config.yaml", tmp, *args, background=True, stdout=out, stderr=subprocess.STDOUT
        )
    return proc, log


def _no_credentials(where: str, data: bytes) -> None:
    for secret in CREDENTIALS:
        assert secret not in data, f"{secret.decode()} found in {where}"


@pytest.fixture(scope="module")
def images(s3_server, small_dir) -> str:
    """The small photo collection, uploaded to a fresh bucket; returns the bucket URL."""
    s3_server.restart()
    bucket = s3_server.make_bucket()
    s3_server.filesystem().put(f"{small_dir}/", f"{bucket}/images/", recursive=True)
    return f"s3://{bucket}"


def _config(tmp: Path, bucket: str, store: str) -> dict:
    config = make_config(tmp, f"{bucket}/images", store=f"{bucket}/{store}", **CONFIG)
    write_config(tmp, config)
    return config


@pytest.fixture(scope="module")
def reference(s3_server, images, tmp_path_factory):
    """One uninterrupted `snakemake extract_features` run, source and store on S3."""
    s3_server.restart()
    tmp = tmp_path_factory.mktemp("s3ref")
    config = _config(tmp, images, "feats/reference.zarr")
    result = snakemake(tmp / "config.yaml", tmp, "--cores", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    return config, result, tmp


def test_full_run_on_s3(s3, reference):
    config, result, tmp = reference
    store = config["store"]
    assert store.startswith("s3://")
    assert not list(tmp.glob("s3*")) and not Path("s3:").exists()  # no local "s3:/..." folder

    ok = featinv("validate", store)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert f"{store}: valid" in ok.stdout

    root = zarr.open_group(store, mode="r")
    assert root.attrs["complete"] is True and root.attrs["n_samples"] == len(SMALL)
    keys = root["samples/key"][:].tolist()
    assert keys == KEYS
    assert root["samples/source"][:].tolist() == [
        f"{config['source']}/{name}" for name in sorted(SMALL)
    ]
    assert root["samples/label"][:].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4]
    valid = root["samples/valid"][:]
    assert valid.tolist() == [k != "food/coffee_truncated" for k in keys]
    assert root["samples/width"][:][keys.index("animals/chelsea")] == 451
    layer4 = root["features/resnet18/layer4"]
    assert layer4.shape == (9, 1, 512, 2, 2) and layer4.shards == (1, 1, 512, 2, 2)
    assert np.isfinite(layer4[:][valid]).all() and np.abs(layer4[:][valid]).sum() > 0
    assert not layer4[keys.index("food/coffee_truncated")].any()  # skipped row: fill value
    assert root.attrs["provenance"]["config"]["store"] == store
    assert "8 written, 1 skipped" in result.stdout + result.stderr


def test_credentials_not_in_store_or_logs(s3, reference):
    """Neither the access key nor the secret key: not in any store object (zarr.json metadata,
    commit records, shards), nor in Snakemake's output, logs and working files."""
    config, result, tmp = reference
    fs = s3.filesystem()
    objects = fs.find(_bucket_path(config["store"]))
    assert any(p.endswith("/zarr.json") for p in objects)
    for path, data in fs.cat(objects).items():
        _no_credentials(path, data)
    _no_credentials("snakemake stdout/stderr", (result.stdout + result.stderr).encode())
    logs = [p for p in tmp.rglob("*") if p.is_file()]
    assert any(".snakemake/log" in str(p) for p in logs)
    for path in logs:
        _no_credentials(str(path), path.read_bytes())


def test_killed_run_resumes_bitwise(s3, images, reference, tmp_path):
    fs = s3.filesystem()
    config = _config(tmp_path, images, "feats/resumed.zarr")
    # Two jobs at a time, each committing its shards one by one: killed after the second commit.
    proc, log = _background(tmp_path, "killed", "--cores", "2")
    try:
        reached = _run_until(proc, lambda: _commits(fs, config["store"]) >= 2, timeout=300)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    interrupted = _commits(fs, config["store"])
    assert reached and 2 <= interrupted < N_SHARDS, log.read_text()[-3000:]
    assert validate_store(config["store"], check_data=False)  # not finalized: invalid

    unlock = snakemake(tmp_path / "config.yaml", tmp_path, "--unlock")
    assert unlock.returncode == 0, unlock.stderr[-2000:]
    again = snakemake(tmp_path / "config.yaml", tmp_path, "--cores", "2")
    assert again.returncode == 0, again.stderr[-3000:]
    s3fs.S3FileSystem.clear_instance_cache()  # zarr's client above cached listings of the store
    assert validate_store(config["store"]) == []
    assert store_objects(config["store"], fs) == store_objects(reference[0]["store"], fs)


def test_server_outage_mid_run_then_rerun(s3, images, reference, tmp_path, monkeypatch):
    """The server goes away after the first shard is committed and comes back later: the run
    stops with an error naming the endpoint (or rides it out); a rerun completes, same bytes."""
    fs = s3.filesystem()
    config = _config(tmp_path, images, "feats/outage.zarr")
    with monkeypatch.context() as env:
        env.setenv("AWS_MAX_ATTEMPTS", "2")  # botocore gives up after one retry, not four
        proc, log = _background(tmp_path, "outage", "--cores", "2")
    try:
        assert _run_until(proc, lambda: _commits(fs, config["store"]) >= 1, timeout=300)
        before = _commits(fs, config["store"])
        s3.stop()
        outage = time.monotonic()
        try:
            proc.wait(timeout=180)  # botocore's retries give up long before this
        except subprocess.TimeoutExpired:
            pass  # still retrying: bring the server back and let it finish
        finally:
            down_for = time.monotonic() - outage
            s3.restart()
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    output = log.read_text()
    _no_credentials("snakemake output during the outage", output.encode())
    if proc.returncode != 0:  # each failed job: one line naming the endpoint, no traceback
        assert f"featinv: error: object store at {s3.endpoint} unreachable (" in output, output
        assert "Traceback" not in output, output[-3000:]
    assert down_for > 1 and before < N_SHARDS  # the server was gone mid-run
    fs = s3.filesystem()
    assert _commits(fs, config["store"]) >= 1  # committed work survived the outage

    again = snakemake(tmp_path / "config.yaml", tmp_path, "--cores", "2")
    if again.returncode != 0 and "--unlock" in again.stderr:
        assert snakemake(tmp_path / "config.yaml", tmp_path, "--unlock").returncode == 0
        again = snakemake(tmp_path / "config.yaml", tmp_path, "--cores", "2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert validate_store(config["store"]) == []
    assert store_objects(config["store"], fs) == store_objects(reference[0]["store"], fs)


def test_validate_names_flipped_shard_on_s3(s3, reference):
    fs = s3.filesystem()
    source = _bucket_path(reference[0]["store"])
    copy = source.rsplit("/", 1)[0] + "/flipped.zarr"
    fs.copy(f"{source}/", f"{copy}/", recursive=True)
    assert len(fs.find(copy)) == len(fs.find(source))
    shard = f"{copy}/features/resnet18/layer4/c/1/0/0/0/0"
    data = bytearray(fs.cat_file(shard))
    data[len(data) // 3] ^= 0x01
    fs.pipe_file(shard, bytes(data))

    bad = featinv("validate", f"s3://{copy}")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "features/resnet18/layer4 shard 1" in bad.stderr
    assert "features/resnet18/layer2" not in bad.stderr
    assert "shard 0" not in bad.stderr and "shard 2" not in bad.stderr


def test_unreachable_storage_fails_reads_instead_of_skipping(s3, images, small_dir, monkeypatch):
    """An outage while images are read must fail the job (the shard is redone by the rerun), never
    record a good image as unreadable (that would be committed: a lost sample)."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # fail fast
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(small_dir / SMALL[0], arcname="cat.jpg")
    tar_url = f"{images}/tars/{uuid.uuid4().hex}.tar"
    s3.filesystem().pipe_file(tar_url, buffer.getvalue())
    uris = [f"{images}/images/{SMALL[0]}", f"tar://cat.jpg::{tar_url}"]
    expected = (small_dir / SMALL[0]).read_bytes()
    assert dict(read_items(uris)) == {0: expected, 1: expected}
    missing = dict(
        read_items([f"{images}/images/nothing-here.jpg", f"tar://cat.jpg::{tar_url}.gone"])
    )
    assert all(isinstance(e, FileNotFoundError) for e in missing.values())  # bad inputs: skipped

    s3.stop()
    for uri in uris:
        with pytest.raises(Exception, match="Could not connect to the endpoint URL") as caught:
            list(read_items([uri]))
        assert unreachable_message(caught.value).startswith(
            f"object store at {s3.endpoint} unreachable (EndpointConnectionError); "
        )
    # Extraction reads in DataLoader workers, which re-raise it as a RuntimeError naming the type.
    with pytest.raises(RuntimeError, match="Caught EndpointConnectionError") as caught:
        list(DataLoader(_Reads(uris), num_workers=1, batch_size=None))
    assert unreachable_message(caught.value).startswith(f"object store at {s3.endpoint} unrea")


class _Reads(IterableDataset):
    def __init__(self, uris: list[str]):
        self.uris = uris

    def __iter__(self):
        return read_items(self.uris)


def test_lost_connections_of_unawaited_tasks_are_not_reported(caplog):
    """aiohttp's request tasks that die with the connection are dropped from asyncio's log (the
    job's own one-line error says it); any other unretrieved task error is still reported."""
    quiet_lost_connections()

    async def fail(exc: Exception) -> None:
        raise exc

    for exc in (aiohttp.ClientConnectionResetError("Cannot write to closing transport"),
                KeyError("not a connection error")):  # fmt: skip
        loop = asyncio.new_event_loop()
        task = loop.create_task(fail(exc))
        loop.run_until_complete(asyncio.sleep(0.01))
        del task  # never retrieved: asyncio reports it when the task is collected
        gc.collect()
        loop.close()
    # This test's tasks only: gc may also collect other tests' unclosed aiohttp sessions here.
    reports = [r for r in caplog.records
               if r.name == "asyncio" and fail.__qualname__ in r.getMessage()]  # fmt: skip
    assert [type(r.exc_info[1]) for r in reports] == [KeyError]
    assert reports[0].getMessage().startswith("Task exception was never retrieved")


def test_unreachable_store_fails_commands_in_one_line(s3, reference, monkeypatch):
    """Every command that reaches a stopped object store ends in one line naming its endpoint
    (never a credential), through the real CLI."""
    config, _, tmp = reference
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3.stop()
    for args in (
        ["validate", config["store"]],
        ["plan", str(tmp / "config.yaml")],
        ["extract-shard", str(tmp / "config.yaml"), "--shard", "0"],
    ):
        result = featinv(*args)
        assert result.returncode == 2, result.stderr[-3000:]
        assert result.stderr.splitlines() == [
            f"featinv: error: object store at {s3.endpoint} unreachable (EndpointConnectionError);"
            " nothing committed is lost, rerun the same command once it is back"
        ]
        _no_credentials(args[0], result.stderr.encode())


def test_a_store_in_a_bucket_that_does_not_exist_is_one_line(s3, images, tmp_path):
    """A deleted bucket (or a typo in its name): nothing to create the store in."""
    config = make_config(tmp_path, f"{images}/images", store="s3://no-such-bucket/x.zarr", **CONFIG)
    result = cli("plan", str(write_config(tmp_path, config)))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "featinv: error: cannot create store 's3://no-such-bucket/x.zarr': The specified bucket "
        "does not exist"
    ]


def test_credentials_never_in_provenance(s3, tmp_path, capsys):
    """Keys in URLs (user:password@) or in the environment never reach the recorded config."""
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SECRET_KEY  # the environment holds one pair
    url_key, url_secret = "AKIAINURLKEY5W8N3D1X", "url/Secret+In/The+Url9Qw"  # the URLs another
    in_url = f"{url_key}:{url_secret.replace('/', '%2F')}"
    config = {  # as given: the config check itself refuses such URLs (below)
        **make_config(tmp_path, "s3://photos/images", store="s3://feats/store.zarr", **CONFIG),
        "source": f"s3://{in_url}@photos/images",
        "store": f"s3://{in_url}@feats/store.zarr",
    }
    recorded = provenance(config)
    assert recorded["config"]["source"] == "s3://photos/images"
    assert recorded["config"]["store"] == "s3://feats/store.zarr"
    text = json.dumps(recorded)
    for secret in (ACCESS_KEY, SECRET_KEY, url_key, url_secret, url_secret.replace("/", "%2F")):
        assert secret not in text
    assert public_config(config)["source"] == "s3://photos/images"
    assert redact_url("https://user:pw@example.org:8443/a.tar") == "https://example.org:8443/a.tar"

    # s3fs never uses keys in a URL (it reads them as part of the bucket name, and the error
    # would repeat them into Snakemake's log): the config check of every command (and of
    # Snakemake, see test_config) refuses them in one line.
    path = str(write_config(tmp_path, config))
    for argv, what in (
        (["check-config", path], "config source"),
        (["plan", path], "config source"),
        (["extract-shard", path, "--shard", "0"], "config source"),
        (["finalize", path], "config source"),
        (["validate", config["store"]], "store"),
    ):
        with pytest.raises(SystemExit) as exit_:
            cli_main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"featinv: error: {what}: credentials in s3:// URLs are not")
        assert url_key not in err and "Secret" not in err and len(err.splitlines()) == 1


def test_server_stops_and_comes_back_on_the_same_port(s3, s3_bucket):
    """The test server itself: stopping cuts open connections and refuses new ones; restarting
    listens on the same port, and moto kept the objects."""
    s3.filesystem().pipe_file(f"{s3_bucket}/kept.txt", b"kept")
    port = s3.proxy.port
    held = socket.create_connection(("127.0.0.1", port), timeout=5)
    s3.stop()
    try:
        assert held.recv(1) == b""
    except ConnectionResetError:
        pass
    finally:
        held.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    s3.restart()
    assert s3.proxy.port == port and s3.endpoint.endswith(f":{port}")
    assert s3.filesystem().cat_file(f"{s3_bucket}/kept.txt") == b"kept"
