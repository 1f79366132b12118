"""The Gradio demo, driven over HTTP with gradio_client like a user's browser would: personalize on the
built-in base, generate with the new concept, list and delete it; a second user sees and uses none of it;
refused uploads name each file and why; the file route serves nothing outside the outputs folder."""

from __future__ import annotations

import http.client
import json
import struct
import threading
import time
import zlib
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from demo.auth import Users, hash_password  # noqa: E402
from demo_support import gradio_env, tiny_service  # noqa: E402
from gen.provenance import read_provenance  # noqa: E402

ALICE, BOB = ("alice", "wonderland-42"), ("bob", "builder:with:colons")


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from demo.app import launch

    root = tmp_path_factory.mktemp("demo")
    with gradio_env(root):
        service = tiny_service(root, auth=True)
        users = Users({ALICE[0]: ALICE[1], BOB[0]: hash_password(BOB[1], iterations=1000)})
        demo = launch(service, users=users, prevent_thread_lock=True, quiet=True)
        try:
            yield {"url": demo.local_url.rstrip("/"), "service": service, "root": root}
        finally:
            demo.close()
            service.close()


def client(app, who) -> Client:
    return Client(app["url"], auth=who, verbose=False, download_files=str(app["root"] / "downloads" / who[0]))


def wait_for_training(c: Client) -> tuple:
    """Follow the job through the app's own watch endpoint until it finishes."""
    deadline = time.monotonic() + 600
    while True:
        result = c.predict(api_name="/watch_training")
        if any(w in result[0] for w in ("done", "failed", "cancelled")) or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


def gallery_paths(value) -> list[str]:
    return [item["image"] if isinstance(item["image"], str) else item["image"]["path"] for item in value]


def test_personalize_generate_list_delete_and_isolation(app):
    alice, bob = client(app, ALICE), client(app, BOB)

    status = alice.predict("Sample subject", "robot-3", 4, [], "robo", "robot", "quick", 12, True, api_name="/start_training")
    assert "robo" in status
    with pytest.raises(AppError, match="already have a training job"):  # one job per user at a time
        alice.predict("Sample subject", "robot-3", 4, [], "robo2", "robot", "quick", 12, True, api_name="/start_training")
    text, curve, validation = wait_for_training(alice)
    assert "done" in text and "version 1" in text, text
    assert len(curve["data"]) == 12  # one loss point per step
    assert len(validation) == 2  # 2 rounds x 1 image

    personalized, base, files, info = alice.predict(
        "a photo of <robo> on green grass", "", 3, 2, 4, 4.0, "ddim", True, api_name="/generate"
    )
    assert len(personalized) == 2 and len(base) == 2 and "seed 3" in info
    provenance = [read_provenance(p) for p in gallery_paths(personalized)]
    assert [p.seed for p in provenance] == [3, 4] and {p.user for p in provenance} == {"alice"}
    assert provenance[0].adapters[0]["concept"] == "robo" and provenance[0].adapters[0]["version"] == 1
    base_prov = [read_provenance(p) for p in gallery_paths(base)]
    assert [p.seed for p in base_prov] == [3, 4] and base_prov[0].adapters == () and "<robo>" not in base_prov[0].prompt
    assert any(Path(f).name == "provenance.json" for f in files)

    table = alice.predict(api_name="/list_concepts")[0]
    assert [row[0] for row in table["data"]] == ["robo"]
    history = alice.predict("robo", api_name="/history")[0]
    assert [row[0] for row in history["data"]] == [1]

    # Bob sees nothing of alice's and cannot use, read, export or delete it: the same "not found" as a missing concept.
    assert bob.predict(api_name="/list_concepts")[0]["data"] == []
    assert "No training job yet" in bob.predict(api_name="/watch_training")[0]  # jobs are per user too
    assert bob.predict(api_name="/cancel_training") == "Nothing to cancel."
    with pytest.raises(AppError, match="no concept &lt;robo&gt;"):
        bob.predict("a photo of <robo>", "", 0, 1, 2, 4.0, "ddim", False, api_name="/generate")
    for call in (
        lambda: bob.predict("robo", api_name="/history"),
        lambda: bob.predict("robo", "1", "kohya", api_name="/export"),
        lambda: bob.predict("robo", "1", "whole concept", True, api_name="/delete"),
        lambda: bob.predict("robo", "latest", api_name="/diagnostics"),
    ):
        with pytest.raises(AppError, match="has no concept 'robo'"):
            call()

    diag = alice.predict("robo", "latest", api_name="/diagnostics")
    assert "v1" in diag[0] and any(row[0] == "subject_fidelity" for row in diag[4]["data"]) and len(diag[3]["data"]) > 0
    recorded = {row[0]: row[1] for row in diag[4]["data"]}
    assert "autoencoder_ceiling" in recorded
    assert ("subject fidelity" in diag[0]) == (recorded["subject_fidelity"] < 0.85)  # the plain-language alarm, when due
    exported = alice.predict("robo", "1", "diffusers", api_name="/export")
    assert Path(exported).suffix == ".zip"

    with pytest.raises(AppError, match="Tick"):
        alice.predict("robo", "1", "whole concept", False, api_name="/delete")
    message = alice.predict("robo", "1", "whole concept", True, api_name="/delete")
    assert "deleted the whole concept" in message
    assert alice.predict(api_name="/list_concepts")[0]["data"] == []
    with pytest.raises(AppError, match="no concept &lt;robo&gt;"):
        alice.predict("a photo of <robo>", "", 0, 1, 2, 4.0, "ddim", False, api_name="/generate")


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height pixels and holds almost no data: a decompression bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_refused_uploads_name_each_file_and_why(app, tmp_path):
    c = client(app, BOB)
    good = []
    for i in range(21):
        good.append(tmp_path / f"ok{i}.png")
        Image.new("RGB", (64, 64), (i * 10, 100, 200)).save(good[-1])
    (tmp_path / "notes.png").write_text("not an image at all")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)).save(tmp_path / "noisy.png")  # ~270 KB: over our 200 KB, under the upload cap
    Image.new("RGB", (1200, 1000), "white").save(tmp_path / "wide.png")  # 1.2 MP, a few KB
    _png_header_only(tmp_path / "bomb.png", 30000, 30000)

    def start(files):
        return c.predict("Upload photos", "robot-3", 4, [handle_file(str(f)) for f in files], "mine", "robot", "quick", 2, False, api_name="/start_training")

    with pytest.raises(AppError) as refused:
        start([*good[:2], tmp_path / "notes.png", tmp_path / "noisy.png", tmp_path / "wide.png", tmp_path / "bomb.png"])
    message = str(refused.value)
    assert "notes.png: not a JPEG, PNG or WebP image" in message
    assert "noisy.png:" in message and "over the 200000-byte limit" in message
    assert "wide.png: 1200x1000 is 1200000 pixels, over the 1000000-pixel limit" in message
    assert "bomb.png: refused as a decompression bomb" in message  # PIL refuses it from the header, before decoding
    assert "ok0.png" not in message and "ok1.png" not in message
    with pytest.raises(AppError, match="21 photos is too many: give at most 20"):
        start(good)
    with pytest.raises(AppError, match="2 photos is too few"):
        start(good[:2])
    assert app["service"].jobs.latest("bob") is None  # nothing was queued


def _login_cookie(url: str, who) -> str:
    import httpx

    response = httpx.post(f"{url}/login", data={"username": who[0], "password": who[1]})
    assert response.status_code == 200, response.text
    return "; ".join(f"{k}={v}" for k, v in response.cookies.items())


def _raw_get(url: str, path: str, cookie: str | None, headers: dict | None = None) -> tuple[int, bytes]:
    """GET exactly ``path`` (no client-side normalization of '..' or percent-escapes)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("GET", path, headers={"Cookie": cookie} if cookie else {})
        response = conn.getresponse()
        if headers is not None:
            headers.update({k.lower(): v for k, v in response.getheaders()})
        return response.status, response.read()
    finally:
        conn.close()


def test_file_route_serves_nothing_outside_the_outputs_folder(app):
    url, root = app["url"], app["root"]
    outputs = app["service"].outputs
    secret = root / "secret.txt"
    secret.write_text("TOP SECRET registry neighbour")
    inside = outputs / "users" / "alice" / "probe.png"
    inside.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), "red").save(inside)
    repo_file = Path(__file__).resolve().parents[1] / "README.md"
    cookie = _login_cookie(url, ALICE)
    port = urlsplit(url).port

    assert _raw_get(url, f"/gradio_api/file={inside}", cookie)[0] == 200  # the control: an app file is served
    assert _raw_get(url, f"/gradio_api/file={inside}", None)[0] in (401, 403)  # but not without logging in
    attempts = [
        f"/gradio_api/file={secret}",
        f"/gradio_api/file={outputs}/../secret.txt",
        f"/gradio_api/file={outputs}/%2e%2e/secret.txt",
        "/gradio_api/file=/etc/passwd",
        "/gradio_api/file=../../../../../../../../etc/passwd",
        "/gradio_api/file=..%2f..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
        f"/gradio_api/file/{secret}",
        f"/gradio_api/file={repo_file}",
        "/gradio_api/file=README.md",
        f"/gradio_api/file=http://127.0.0.1:{port}/config",
        "/gradio_api/file=file:///etc/passwd",
        f"/gradio_api/proxy=http://127.0.0.1:{port}/config",
        f"/file={secret}",
    ]
    for path in attempts:
        status, body = _raw_get(url, path, cookie)
        assert status in (403, 404), (path, status)
        assert b"TOP SECRET" not in body and b"root:" not in body, path
        if path.startswith("/gradio_api/"):
            assert body == b"File not allowed.", (path, body)  # refused by the demo's own guard, before Gradio

    # What users upload is never served inline: an HTML "photo" comes back as a download, not a page.
    from gradio.utils import get_upload_folder

    planted = Path(get_upload_folder()) / "0123abcd" / "evil.html"
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.write_text("<script>alert(1)</script>")
    headers: dict = {}
    status, _ = _raw_get(url, f"/gradio_api/file={planted}", cookie, headers)
    assert status == 200 and headers["content-disposition"].startswith("attachment"), headers

    # An API call naming a server path as an "uploaded" photo is refused before any file is read.
    import httpx

    payload = {"data": ["Upload photos", "robot-3", 4, [{"path": str(secret), "meta": {"_type": "gradio.FileData"}}] * 3, "x", "robot", "quick", 2, False]}
    started = httpx.post(f"{url}/gradio_api/call/start_training", json=payload, headers={"Cookie": cookie})
    assert started.status_code == 200, started.text
    events = httpx.get(f"{url}/gradio_api/call/start_training/{started.json()['event_id']}", headers={"Cookie": cookie}).text
    assert "event: error" in events and "TOP SECRET" not in events
    assert app["service"].jobs.latest("alice") is None or app["service"].jobs.latest("alice").concept != "x"


def test_users_file_and_password_hashes(tmp_path):
    from demo.auth import AuthConfigError, load_users

    users_file = tmp_path / "users.txt"
    users_file.write_text(f"# team\nalice:plain pass\nbob:{hash_password('s3cret', iterations=1000)}\n")
    users = load_users(users_file)
    assert users.names == ["alice", "bob"]
    assert users("alice", "plain pass") and users("bob", "s3cret")
    assert not users("alice", "wrong") and not users("bob", "wrong") and not users("carol", "plain pass")
    users_file.write_text("../evil:pw\n")
    with pytest.raises(AuthConfigError, match="user name"):
        load_users(users_file)
    users_file.write_text("nopassword\n")
    with pytest.raises(AuthConfigError, match="name:password"):
        load_users(users_file)


def test_demo_command_is_listed_and_hashes_passwords(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "demo.cli", "demo", "--hash-password"], input="pw\n", capture_output=True, text=True, cwd=root, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert line.startswith("pbkdf2_sha256$") and Users({"u": line})("u", "pw")
    listing = subprocess.run([sys.executable, "-m", "demo.cli", "--help"], capture_output=True, text=True, cwd=root, env=env, timeout=120).stdout
    assert any(line.strip().startswith("demo ") for line in listing.splitlines()), listing
    help_text = subprocess.run([sys.executable, "-m", "demo.cli", "demo", "--help"], capture_output=True, text=True, cwd=root, env=env, timeout=120).stdout
    assert "--auth" in help_text and "--outputs" in help_text


def test_jobs_queue_one_at_a_time_and_cancel():
    """The job manager alone: one job at a time in order, one per user, queue positions, cancelling."""
    from demo.jobs import JobRefused, JobState, TrainingJobs

    def run(request, reporter):
        for step in range(1, 100_000):
            time.sleep(0.005 if request == "slow" else 0)
            reporter.progress(step, 100_000, {"phase": "train", "loss": 1.0 / step})
            if request == "fast" and step == 3:
                return 7
        return 1

    def until(user, done):
        status = jobs.latest(user)
        deadline = time.monotonic() + 60
        while not done(status) and time.monotonic() < deadline:
            status = jobs.wait(user, status.revision, 1.0)
        assert done(status), status
        return status

    jobs = TrainingJobs(run)
    try:
        jobs.submit("u1", "a", "slow")
        until("u1", lambda s: s.state is JobState.RUNNING and s.losses)
        queued = jobs.submit("u2", "b", "fast")
        assert queued.state is JobState.QUEUED and queued.queue_position == 1  # behind u1's running job
        with pytest.raises(JobRefused, match="already have a training job"):
            jobs.submit("u1", "c", "fast")
        assert jobs.cancel("u1").state is JobState.RUNNING  # a running job stops at its next step
        assert until("u1", lambda s: s.state.finished).state is JobState.CANCELLED
        done = until("u2", lambda s: s.state.finished)
        assert done.state is JobState.DONE and done.version == 7 and [step for step, _ in done.losses] == [1, 2, 3]
        jobs.submit("u1", "d", "slow")  # a finished job does not block the next one
        assert jobs.cancel("u1") is not None and until("u1", lambda s: s.state.finished).state is JobState.CANCELLED
        assert jobs.cancel("nobody") is None
    finally:
        jobs.close()


def test_file_guard_resolves_before_it_allows(tmp_path):
    from demo.file_guard import file_allowed

    outputs = tmp_path / "outputs"
    (outputs / "a").mkdir(parents=True)
    (outputs / "a" / "x.png").write_bytes(b"png")
    (tmp_path / "secret").write_text("s")
    (outputs / "link").symlink_to(tmp_path / "secret")
    roots = [outputs]
    assert file_allowed(str(outputs / "a" / "x.png"), roots)
    for target in (str(outputs / ".." / "secret"), str(outputs / "link"), "/etc/passwd", "http://example.com/x.png", "//host/x", "a\0b", ""):
        assert not file_allowed(target, roots), target


def test_provenance_survives_the_download(app):
    """Generated PNGs reach the browser byte for byte: the provenance chunk is still inside."""
    c = client(app, ALICE)
    personalized, _, files, _ = c.predict("a photo of a red mug on green grass", "", 11, 1, 2, 4.0, "ddim", True, api_name="/generate")
    (path,) = gallery_paths(personalized)
    assert read_provenance(path).seed == 11
    sidecar = next(f for f in files if Path(f).name == "provenance.json")
    assert json.loads(Path(sidecar).read_text())[0]["seed"] == 11


def test_upload_refusals_escape_control_characters_and_name_each_file_once(tmp_path):
    from demo.uploads import UploadRefused, check_uploads

    disguised = tmp_path / "photo\u202egnp.exe.png"
    disguised.write_bytes(b"MZ\x90\x00 not really a png")
    (tmp_path / "a\nb.png").write_bytes(b"")
    good = [tmp_path / f"g{i}.png" for i in range(2)]
    for path in good:
        Image.new("RGB", (32, 32)).save(path)
    with pytest.raises(UploadRefused) as refused:
        check_uploads([disguised, tmp_path / "a\nb.png", *good], upload_root=tmp_path)
    assert refused.value.problems == ["photo\\u202egnp.exe.png: not a JPEG, PNG or WebP image", "a\\u000ab.png: is empty (0 bytes)"]


def test_every_login_costs_one_hash_when_any_password_is_hashed(monkeypatch):
    """Plain passwords compared instantly, so timing told which plain names exist; each lookup now runs one hash."""
    import hashlib

    users = Users.parse(f"alice:correct horse battery staple\nbob:{hash_password('x', iterations=1000)}\n", "users.txt")
    real = hashlib.pbkdf2_hmac
    costs: list[int] = []
    monkeypatch.setattr(hashlib, "pbkdf2_hmac", lambda name, pw, salt, n, *a: costs.append(n) or real(name, pw, salt, n, *a))
    for name in ("alice", "bob", "mallory"):
        costs.clear()
        assert not users(name, "guess")
        assert costs == [1000], (name, costs)
    assert users("alice", "correct horse battery staple") and users("bob", "x")


def test_login_names_are_matched_in_nfc():
    users = Users.parse("zo\u00eb:pw\n", "users.txt")
    assert users("zoe\u0308", "pw")  # e + combining diaeresis, as some keyboards type it
    assert Users({"zoe\u0308": "pw"})("zo\u00eb", "pw")


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """The service without login or a server, for what needs no HTTP round trip."""
    root = tmp_path_factory.mktemp("local")
    with gradio_env(root):
        service = tiny_service(root, auth=False)
        try:
            yield service
        finally:
            service.close()


def _put_versions(service, concept: str, n: int) -> None:
    from adapters.registry.synthetic import random_adapter
    from adapters.validate import BaseSpec

    spec = BaseSpec.from_base(service.base)
    for i in range(n):
        service.registry.for_user("local").put(random_adapter(spec, seed=i, std=0.05), service.base, concept, trigger="sks", class_word="robot")


def test_deleting_everything_is_an_explicit_choice(local):
    """An empty version box (or an alias named 'all') once deleted the whole concept."""
    import types

    import gradio as gr

    from demo.app import build_app
    from gen.errors import InvalidRequest

    _put_versions(local, "rex", 3)
    for empty in (None, "", "  "):
        with pytest.raises(InvalidRequest, match="pick the version to delete"):
            local.delete("local", "rex", empty)
    local.set_alias("local", "rex", "all", "2")
    assert local.delete("local", "rex", "all", force=True) == "deleted v2 of rex (1 version)"
    assert local.versions("local", "rex") == ["3", "1"]

    fns = {f.api_name: f.fn for f in build_app(local).fns.values() if f.api_name}
    request = types.SimpleNamespace(username=None)
    with pytest.raises(gr.Error, match="pick the version to delete"):
        fns["delete"]("rex", None, "this version", True, request)
    with pytest.raises(gr.Error, match="Choose what to delete"):
        fns["delete"]("rex", "1", "everything", True, request)
    assert fns["delete"]("rex", None, "whole concept", True, request) == "deleted the whole concept of rex (2 versions)"
    assert local.concept_rows("local") == []


def test_concurrent_page_loads_write_the_sample_preview_safely(local, monkeypatch):
    """Two writers shared one ``<i>.tmp``: the second rename found it gone. Each save here waits for the other writer's."""
    import shutil
    import threading

    shutil.rmtree(local.outputs / "samples", ignore_errors=True)
    both = threading.Barrier(2, timeout=20)
    real_save = Image.Image.save

    def save_in_step(self, *args, **kwargs):
        real_save(self, *args, **kwargs)
        both.wait()  # both writers have written before either renames

    monkeypatch.setattr(Image.Image, "save", save_in_step)
    results, errors = [], []

    def load():
        try:
            results.append(local.sample_preview("robot-3", 3))
        except Exception as e:  # noqa: BLE001 - any failure is the finding
            errors.append(repr(e))

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 2 and results[0] == results[1], errors
    monkeypatch.undo()
    assert all(Image.open(p).size == (64, 64) for p in results[0])
    assert sorted(p.name for p in (local.outputs / "samples").rglob("*")) == ["0.png", "1.png", "2.png", "robot-3"]


def test_out_of_range_seeds_are_refused_in_a_line(local):
    from gen.errors import InvalidRequest

    for seed, n in ((10**20, 1), (2**63 - 1, 2), (float("inf"), 1), (1.5, 1)):
        with pytest.raises(InvalidRequest, match="seed must be"):
            local.generate("local", "a red mug", seed=seed, num_images=n, steps=1)


def _api(service) -> dict:
    from demo.app import build_app

    return {f.api_name: f.fn for f in build_app(service).fns.values() if f.api_name}


def test_one_user_cannot_hold_every_watch_slot(local, monkeypatch):
    """Each watch holds a shared slot until its job ends: 32 of one user's watches once left other users' pages waiting."""
    import threading
    import types

    from demo.app import WATCH_CONCURRENCY, WATCHERS_PER_USER
    from demo.jobs import TrainingJobs

    release = threading.Event()

    def slow(request, reporter):
        step = 0
        while not release.is_set():
            step += 1
            reporter.progress(step, 10**6, {"phase": "train", "loss": 1.0})
            time.sleep(0.05)
        return 1

    jobs = TrainingJobs(slow)
    monkeypatch.setattr(local, "jobs", jobs)
    watch = _api(local)["watch_training"]
    request = types.SimpleNamespace(username=None)
    outputs: dict[int, list] = {}
    try:
        jobs.submit("local", "rex", object())
        threads = []
        for i in range(WATCH_CONCURRENCY):
            outputs[i] = []
            threads.append(threading.Thread(target=lambda i=i: outputs[i].extend(watch(request, progress=lambda *a, **k: None)), daemon=True))
            threads[-1].start()
            time.sleep(0.01)
        deadline = time.monotonic() + 20
        while sum(t.is_alive() for t in threads) > WATCHERS_PER_USER and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sum(t.is_alive() for t in threads) == WATCHERS_PER_USER  # the newest follow the job; the rest gave their slots back
        retired = [out[-1][0] for out in outputs.values() if out and "newer page" in out[-1][0]]
        assert len(retired) == WATCH_CONCURRENCY - WATCHERS_PER_USER
    finally:
        release.set()
        for t in threads:
            t.join(20)
        jobs.close()
    assert sum("done" in out[-1][0] for out in outputs.values()) == WATCHERS_PER_USER


def test_nothing_deleted_or_unregistered_stays_on_disk(local, monkeypatch):
    """A deleted concept's export zips and training images, a deleted version's exports and a failed or
    cancelled job's validation images all stayed under outputs/, where the app kept serving them."""
    import types

    import adapters.train
    from demo.jobs import JobState
    from gen.errors import InvalidRequest

    users = local.outputs / "users" / "local"
    _put_versions(local, "gone", 2)
    zips = {v: Path(local.export("local", "gone", v, "diffusers")) for v in ("1", "2")}
    assert all(z.is_file() for z in zips.values())
    local.delete("local", "gone", "1", force=True)
    assert not zips["1"].exists() and zips["2"].is_file()  # a version's exports go with it

    mode = {"run": "ok"}

    def fake_personalize(base, user, concept, photos, class_word, *, on_validation, progress, **kw):
        on_validation(types.SimpleNamespace(step=1, images=[Image.new("RGB", (8, 8))]))
        if mode["run"] == "fail":
            raise InvalidRequest("boom")
        if mode["run"] == "cancel":
            for step in range(1, 10**6):
                progress(step, 10**6, {"phase": "train", "loss": 1.0})
                time.sleep(0.01)
        return types.SimpleNamespace(version=3)

    monkeypatch.setattr(adapters.train, "personalize", fake_personalize)

    def train(run: str):
        mode["run"] = run
        status = local.start_training("local", concept="gone", class_word="robot", subject="robot-3", n_photos=4, evaluate=False)
        while not status.state.finished:
            if run == "cancel" and status.validations:
                local.jobs.cancel("local")
            status = local.jobs.wait("local", status.revision, 5)
        return status

    done = train("ok")
    assert done.state is JobState.DONE and Path(done.validations[0][1][0]).is_file()
    for run, state in (("fail", JobState.FAILED), ("cancel", JobState.CANCELLED)):
        status = train(run)
        assert status.state is state and status.validations == (), status
    assert len(list((users / "train").rglob("*.png"))) == 1  # only the registered run's image is left

    local.delete("local", "gone", None, whole=True, force=True)
    assert not zips["2"].exists() and not Path(done.validations[0][1][0]).exists()
    assert list(users.rglob("*.zip")) == [] and list((users / "train").rglob("*.png")) == []


def test_demo_on_a_busy_port_says_so_in_one_line(tmp_path, capsys):
    """It ended in Gradio's traceback, whose hint ($GRADIO_SERVER_PORT) an explicit --port overrides."""
    import socket

    from demo.cli import main

    with socket.socket() as busy, gradio_env(tmp_path):
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["demo", "--port", str(port), "--outputs", str(tmp_path / "out"), "--registry", str(tmp_path / "reg")])
    err = capsys.readouterr().err
    assert code == 2 and f"error: cannot listen on 127.0.0.1:{port}" in err and "choose another --port" in err, err
    assert "Traceback" not in err and "GRADIO_SERVER_PORT" not in err


def test_shutdown_mid_step_cancels_the_job_and_removes_its_files(local, monkeypatch):
    """close() waited 5 s, then left the job 'running' and its unregistered run's images on disk: at exit the daemon
    trainer thread stops where it is, so its own clean-up never runs. Now close marks it cancelled and removes them."""
    import types

    import adapters.train
    from demo.jobs import JobState, TrainingJobs

    in_step, release = threading.Event(), threading.Event()

    def slow_step(base, user, concept, photos, class_word, *, on_validation, progress, **kw):
        on_validation(types.SimpleNamespace(step=1, images=[Image.new("RGB", (8, 8))]))
        in_step.set()
        release.wait(30)  # one step longer than close() waits
        on_validation(types.SimpleNamespace(step=2, images=[Image.new("RGB", (8, 8))]))
        return types.SimpleNamespace(version=1)

    monkeypatch.setattr(adapters.train, "personalize", slow_step)
    jobs = TrainingJobs(local._train, public=local.public)
    monkeypatch.setattr(local, "jobs", jobs)
    train = local.outputs / "users" / "local" / "train" / "slow"
    try:
        local.start_training("local", concept="slow", class_word="robot", subject="robot-3", n_photos=3, evaluate=False)
        assert in_step.wait(60) and list(train.rglob("*.png"))
        jobs.close(timeout=0.1)
        status = jobs.latest("local")
        assert status.state is JobState.CANCELLED and "shut down" in status.message, status
        assert not list(train.rglob("*.png"))
    finally:
        release.set()
        jobs._thread.join(30)
    assert not list(train.rglob("*.png"))  # the step's end, once the thread goes on, writes nothing more
    assert jobs.latest("local").state is JobState.CANCELLED and "slow" not in local.handle("local").concepts()



def test_a_finished_job_keeps_no_photos():
    """Each user's latest job stays for their pages; its request (the decoded photos) stayed with it."""
    from demo.jobs import JobState, TrainingJobs

    jobs = TrainingJobs(lambda request, reporter: 1)
    try:
        jobs.submit("u", "c", ["photo"] * 3)
        status = jobs.wait("u", -1, 0)
        while not status.state.finished:
            status = jobs.wait("u", status.revision, 5)
        assert status.state is JobState.DONE and jobs._latest["u"].request is None
    finally:
        jobs.close()


def test_failure_messages_hide_server_paths(local, monkeypatch):
    """A registry error named the registry's index file on the page; the log keeps it, the page says '[server path]'."""
    import types

    import gradio as gr

    from adapters.registry.errors import RegistryBusy
    from demo.jobs import JobState, TrainingJobs

    index = local.registry.root / "index.sqlite"
    busy = RegistryBusy(f"the registry index {index} is locked by another process (waited 60 s); nothing was changed, try again")

    def fails(request, reporter):
        raise busy

    jobs = TrainingJobs(fails, public=local.public)
    try:
        jobs.submit("local", "c", None)
        status = jobs.wait("local", -1, 0)
        while not status.state.finished:
            status = jobs.wait("local", status.revision, 5)
        assert status.state is JobState.FAILED and str(local.registry.root) not in status.message
        assert status.message.startswith("the registry index [server path] is locked"), status.message
    finally:
        jobs.close()

    fns = _api(local)
    request = types.SimpleNamespace(username=None)
    monkeypatch.setattr(local, "concept_rows", lambda user: (_ for _ in ()).throw(busy))
    with pytest.raises(gr.Error) as shown:
        fns["list_concepts"](request)
    assert str(local.registry.root) not in shown.value.message and "[server path] is locked" in shown.value.message
    missing = local.outputs / "nowhere" / "x.png"
    monkeypatch.setattr(local, "concept_rows", lambda user: missing.read_bytes())  # a raw OSError, naming the file
    with pytest.raises(gr.Error) as shown:
        fns["list_concepts"](request)
    assert "No such file or directory" in shown.value.message and str(missing) not in shown.value.message


def test_numbers_the_page_cannot_send_are_refused_by_name(local):
    """NaN passes Gradio's slider bounds check; int(nan) then failed as a bare 'Error'."""
    import types

    import gradio as gr

    fns = _api(local)
    request = types.SimpleNamespace(username=None)
    nan = float("nan")
    with pytest.raises(gr.Error, match="number of images must be a whole number"):
        fns["generate"]("a red mug", "", 0, nan, 2, 4.0, "ddim", False, request, progress=lambda *a, **k: None)
    with pytest.raises(gr.Error, match="steps must be a whole number"):
        fns["generate"]("a red mug", "", 0, 1, nan, 4.0, "ddim", False, request, progress=lambda *a, **k: None)
    with pytest.raises(gr.Error, match="guidance_scale must be"):
        fns["generate"]("a red mug", "", 0, 1, 2, nan, "ddim", False, request, progress=lambda *a, **k: None)
    with pytest.raises(gr.Error, match="number of photos must be a whole number"):
        fns["start_training"]("Sample subject", "robot-3", nan, None, "c", "robot", "quick", 0, False, request)


def test_run_folders_of_the_older_layout_are_removed_on_start(local):
    """users/<u>/train|exports/<run>/ (no concept level) outlived their concept's deletion and stayed served."""
    import uuid

    users = local.outputs / "users" / "old"
    old_train, old_export = users / "train" / uuid.uuid4().hex, users / "exports" / uuid.uuid4().hex
    for folder, name in ((old_train, "step000001-0.png"), (old_export, "rex-v1-diffusers.zip")):
        folder.mkdir(parents=True)
        (folder / name).write_bytes(b"x")
    hex_concept = uuid.uuid4().hex  # a concept may be named like a run: its run folders stay
    kept = [users / "train" / hex_concept / uuid.uuid4().hex, users / "exports" / hex_concept / f"v2-{uuid.uuid4().hex}", users / "train" / "rex" / uuid.uuid4().hex]
    for folder in kept:
        folder.mkdir(parents=True)
        (folder / "a.png").write_bytes(b"x")
    local._remove_old_layout()
    assert not old_train.exists() and not old_export.exists()
    assert all((folder / "a.png").is_file() for folder in kept)


def test_generate_progress_reaches_its_own_page_from_a_batched_thread(local, monkeypatch):
    """Batched with another user's request, the pipeline runs in that request's thread: gr.Progress read that
    thread's context, so this page's updates went to the other page (and this one showed none)."""
    import contextvars
    import types

    from gen.errors import InvalidRequest

    page: contextvars.ContextVar[str] = contextvars.ContextVar("page", default="none")
    seen: list[str] = []

    def batched_elsewhere(requests):
        def leader():
            page.set("the other page")
            requests[0].progress(1, 2)

        thread = threading.Thread(target=leader)
        thread.start()
        thread.join(10)
        raise InvalidRequest("stop here")

    monkeypatch.setattr(local.sampler, "generate_many", batched_elsewhere)
    fn = _api(local)["generate"]
    page.set("this page")
    with pytest.raises(Exception, match="stop here"):
        fn("a red mug", "", 0, 1, 2, 4.0, "ddim", False, types.SimpleNamespace(username=None), progress=lambda *a, **k: seen.append(page.get()))
    assert seen == ["this page"], seen


def test_hide_paths_takes_whole_paths_only():
    from demo.jobs import hide_paths

    roots = ["/srv/bespoke reg", "/srv/reg"]
    assert hide_paths("the index /srv/bespoke reg/index.sqlite is locked", roots) == "the index [server path] is locked"
    assert hide_paths("in /srv/registry2/a b; and /var/srv/reg/x.", roots) == "in [server path] b; and [server path]."
    assert hide_paths("a / b, and/or 1/2 <rex:0.8>", roots) == "a / b, and/or 1/2 <rex:0.8>"
