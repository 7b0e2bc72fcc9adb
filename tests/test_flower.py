"""The single round over Flower on a real local deployment: one SuperLink and two SuperNodes
started as processes on 127.0.0.1, each SuperNode with its own site folder and work directory, the
round submitted with `python -m msd_jax.protocols.flower.launch`. Its shards must equal, byte for
byte, those of the file-copy flow (`--mode encrypt` with the same seed); a site killed mid-upload
must fail the round with a message naming it and leave no shard folder behind. Model upload in a
secret mode runs on a deployment with TLS and registered SuperNodes only."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from conftest import class_folder
from msd_jax.encryption import verify

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SITES = ("hospital_a", "hospital_b")
CONFIG = ["--config.model.image_size=16", "--config.model.patch_size=4", "--config.model.embed_dim=16",
          "--config.model.num_heads=2", "--config.model.out_dim=32", "--config.model.head_hidden_dim=16",
          "--config.model.head_bottleneck_dim=8", "--config.msd.num_local=0", "--config.train.batch_size=8"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("flower")
    sites = {name: class_folder(root / "data" / name, i + 1) for i, name in enumerate(SITES)}
    # the Flower processes start each other by name (flower-superexec) from PATH
    environ = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
                   JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", TF_CPP_MIN_LOG_LEVEL="3")
    overrides = CONFIG + [f"--config.data.cache_dir={root / 'tfds_cache'}"]
    return {"root": root, "sites": sites, "env": environ, "overrides": overrides}


def make_certificates(folder, nodes):
    """What docs/hospitals.md has a deployment make with openssl and ssh-keygen: a CA, the
    SuperLink's TLS certificate for 127.0.0.1 signed by it, and an EC P-384 key pair per SuperNode
    (private key, OpenSSH public key)."""
    import datetime
    import ipaddress
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject, issuer, public_key, signing_key, *extensions):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
             .not_valid_after(now + datetime.timedelta(days=1)))
        for ext, critical in extensions:
            b = b.add_extension(ext, critical=critical)
        return b.sign(signing_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key, server_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    (folder / "ca.crt").write_bytes(certificate(name("test CA"), name("test CA"), ca_key.public_key(), ca_key,
                                                (x509.BasicConstraints(ca=True, path_length=None), True)))
    (folder / "server.pem").write_bytes(certificate(
        name("localhost"), name("test CA"), server_key.public_key(), ca_key,
        (x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                      x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)))
    (folder / "server.key").write_bytes(server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    for node in nodes:
        key = ec.generate_private_key(ec.SECP384R1())
        (folder / node).write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                      serialization.NoEncryption()))
        (folder / f"{node}.pub").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))


class Deployment:
    """A SuperLink and one SuperNode per site; killing one kills the Flower processes it started too
    (SuperExec runs in a session of its own). `secure`: TLS with a test CA, and only SuperNodes whose
    public key was registered (`flwr supernode register`) may connect, as docs/hospitals.md sets up."""

    def __init__(self, env, tag, secure=False):
        self.env, self.root = env, env["root"] / tag
        self.port = free_port()
        self.procs = {}
        self.certs = self.root / "certs" if secure else None
        if secure:
            make_certificates(self.certs, [*env["sites"], "unregistered"])
            link = ["--ssl-ca-certfile", str(self.certs / "ca.crt"), "--ssl-certfile", str(self.certs / "server.pem"),
                    "--ssl-keyfile", str(self.certs / "server.key"), "--enable-supernode-auth"]
        else:
            link = ["--insecure"]
        self.start("superlink", ["flower-superlink", *link, f"--port={self.port}",
                                 "--disable-runtime-dependency-installation"])
        for name, folder in env["sites"].items():
            if secure:
                self.register(self.certs / f"{name}.pub")
            self.start_node(name, folder)

    def node_args(self, key_name):
        if self.certs is None:
            return ["--insecure"]
        return ["--root-certificates", str(self.certs / "ca.crt"),
                "--auth-supernode-private-key", str(self.certs / key_name)]

    def start_node(self, name, folder, key_name=None):
        node_config = f'workdir="{self.root / "site_w" / name}" site-dir="{folder}"'
        self.start(name, ["flower-supernode", *self.node_args(key_name or name),
                          f"--superlink=127.0.0.1:{self.port}", f"--port={free_port()}",
                          "--node-config", node_config])

    def register(self, public_key):
        """`flwr supernode register KEY` against the SuperLink, retried until it listens."""
        home = self.root / "flwr_cli"
        home.mkdir(exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "link"\n\n[superlink.link]\naddress = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{self.certs / "ca.crt"}"\n')
        deadline = time.monotonic() + 120
        while True:
            proc = subprocess.run([sys.executable, "-c", "from flwr.cli.app import app; app()", "supernode",
                                   "register", str(public_key), "--format", "json"], capture_output=True,
                                  text=True, env=dict(self.env["env"], FLWR_HOME=str(home)))
            if '"success": true' in proc.stdout:
                return
            assert time.monotonic() < deadline, f"{proc.stdout}\n{proc.stderr}\n{self.logs()}"
            time.sleep(1.0)

    def start(self, name, args):
        home = self.root / "flwr_home" / name
        home.mkdir(parents=True)
        log = open(self.root / f"{name}.log", "w")
        exe = os.path.join(os.path.dirname(sys.executable), args[0])
        self.procs[name] = subprocess.Popen([exe, *args[1:]], stdout=log, stderr=subprocess.STDOUT,
                                            env=dict(self.env["env"], FLWR_HOME=str(home)),
                                            start_new_session=False)

    def kill(self, name):
        proc = self.procs.pop(name)
        try:
            tree = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        for p in [proc, *tree]:
            try:
                p.send_signal(signal.SIGKILL)
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
        proc.wait(timeout=30)

    def close(self):
        for name in list(self.procs):
            self.kill(name)

    def logs(self):
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.root.glob("*.log")))

    def run_round(self, workdir, *extra):
        tls = ["--insecure"] if self.certs is None else ["--root-certificates", str(self.certs / "ca.crt")]
        args = [sys.executable, "-m", "msd_jax.protocols.flower.launch", "--config", "configs/demo.py:quick",
                f"--workdir={workdir}", "--num-sites=2", f"--superlink=127.0.0.1:{self.port}", *tls,
                "--connect-timeout=120", *extra, *self.env["overrides"]]
        return subprocess.Popen(args, cwd=REPO, env=self.env["env"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def deployment(env):
    d = Deployment(env, "deployment")
    try:
        yield d
    finally:
        d.close()


def file_copy_round(env, workdir):
    """The reference: --mode encrypt of both sites, by hand (it makes the head from the same seed as
    --mode setup)."""
    sites = ",".join(env["sites"].values())
    proc = subprocess.run([sys.executable, "-m", "msd_jax.main", "--config", "configs/demo.py:quick",
                           f"--workdir={workdir}", "--mode=encrypt", *env["overrides"],
                           "--config.data.name=folders", f"--config.data.site_dirs={sites}",
                           f"--config.data.test_dir={env['sites'][SITES[0]]}"],
                          cwd=REPO, env=env["env"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def folder_files(path):
    return {name: open(os.path.join(path, name), "rb").read() for name in sorted(os.listdir(path))}


def test_round_equals_the_file_copy_flow(env, deployment):
    flower_w, copy_w = env["root"] / "server_w", env["root"] / "copy_w"
    t0 = time.perf_counter()
    proc = deployment.run_round(flower_w, "--chunk-mib=0.004")
    out, err = proc.communicate(timeout=600)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, f"{out}\n{err}\n{deployment.logs()}"
    t1 = time.perf_counter()
    file_copy_round(env, copy_w)
    copy_wall = time.perf_counter() - t1
    for site in SITES:
        got = folder_files(flower_w / "shards" / site)
        assert got == folder_files(copy_w / "shards" / site), site
        assert len(got) >= 2  # the manifest and at least one shard
    assert folder_files(flower_w / "head") == folder_files(copy_w / "head")
    assert sorted(os.listdir(flower_w / "shards")) == sorted(SITES)  # no staging folder left
    assert verify.main([str(flower_w)], out=open(os.devnull, "w")) == 0
    record = json.load(open(flower_w / "records" / "flower.json"))
    for site in SITES:
        want = sum(len(b) for b in folder_files(copy_w / "shards" / site).values())
        assert record["sites"][site]["bytes_uploaded"] == want
        assert record["sites"][site]["chunks"] > len(folder_files(copy_w / "shards" / site))  # chunked
    print(f"\nflower round: {wall:.1f} s wall ({record['seconds']:.1f} s in the ServerApp), file copy "
          f"(--mode encrypt of both sites): {copy_wall:.1f} s; {record['sites']}\n{out}")


def test_site_dropping_out_mid_upload_writes_nothing(env, deployment):
    """A site stops serving its upload after the server has received part of it: its ClientApp
    fails on the next chunk (its staged file is gone). (A killed SuperNode ends the same way, only
    later: after --chunk-timeout, or when the SuperLink's heartbeat marks it offline.)"""
    workdir = env["root"] / "server_dropout"
    proc = deployment.run_round(workdir, "--chunk-mib=0.0005")
    staging = workdir / "shards"
    site_file = deployment.root / "site_w" / SITES[1] / "shards" / SITES[1] / "tokens-00000.npy"
    broken = False
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline and not broken:
        partial = list(staging.glob(f".tmp-shards-{SITES[1]}-*/*")) if staging.is_dir() else []
        if any(p.stat().st_size > 0 for p in partial):
            os.truncate(site_file, 0)
            broken = True
        time.sleep(0.02)
    out, err = proc.communicate(timeout=600)
    assert broken, f"the upload finished before the site could drop out\n{out}\n{err}"
    assert proc.returncode == 1, f"{out}\n{err}\n{deployment.logs()}"
    assert f"site {SITES[1]}" in err and "dropped out during the upload" in err, err
    assert "changed since it was listed" in err, err
    assert not staging.exists() or os.listdir(staging) == [], os.listdir(staging)
    assert not (workdir / "uploads").exists()


def test_a_killed_supernode_fails_the_round_within_the_chunk_timeout(env):
    """A site's SuperNode (and every process it started) killed while the server fetches its upload:
    the round ends within --chunk-timeout with the site named, and nothing is written."""
    d = Deployment(env, "killed_node")
    workdir = env["root"] / "server_killed"
    try:
        proc = d.run_round(workdir, "--chunk-mib=0.0005", "--chunk-timeout=20")
        staging = workdir / "shards"
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            if staging.is_dir() and any(p.stat().st_size > 0 for p in staging.glob(f".tmp-shards-*/*")):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the round ended before the upload began"
        d.kill(SITES[1])
        killed = time.monotonic()
        out, err = proc.communicate(timeout=600)
        waited = time.monotonic() - killed
    finally:
        d.close()
    assert proc.returncode == 1, f"{out}\n{err}"
    assert f"site {SITES[1]}" in err and "dropped out during the upload" in err, err
    assert waited < 300, waited  # the chunk timeout (20 s), not the site timeout (24 h)
    assert not staging.exists() or os.listdir(staging) == [], os.listdir(staging)
    print(f"\nkilled SuperNode: the round failed {waited:.1f} s after the kill")


SECRET_MODEL_UPLOAD = ["--config.protocol=model_upload", "--config.encrypt.mode=secret_head"]


def test_model_upload_in_a_secret_mode_equals_the_file_copy_flow(env):
    """`--upload shards,uploads` in a secret-head mode: the server sends only the initial student
    (no head: the sites derive theirs from their shared key), every site encrypts and trains, and
    its shards, trained model and transform note equal, byte for byte, those of the commands run by
    hand (--mode setup, encrypt, site) with the same seed. The deployment runs as a real one should:
    TLS, and only registered SuperNodes; one with an unregistered key is turned away."""
    d = Deployment(env, "secret_model_upload", secure=True)
    try:
        flower_w, copy_w = env["root"] / "secret_server_w", env["root"] / "secret_copy_w"
        proc = d.run_round(flower_w, "--upload=shards,uploads", *SECRET_MODEL_UPLOAD)
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{out}\n{err}\n{d.logs()}"
        d.start_node("intruder", env["sites"][SITES[0]], key_name="unregistered")
        assert d.procs["intruder"].wait(timeout=300) != 0
        assert "Failed to activate SuperNode" in (d.root / "intruder.log").read_text()
    finally:
        d.close()
    assert not (flower_w / "head" / "head.msgpack").exists()  # no public head in a secret mode
    sites = ",".join(env["sites"].values())
    common = [*env["overrides"], *SECRET_MODEL_UPLOAD, "--config.merge.data=uploaded",
              "--config.data.name=folders", f"--config.data.site_dirs={sites}",
              f"--config.data.test_dir={env['sites'][SITES[0]]}"]
    for mode in ("setup", "encrypt", "site"):
        ref = subprocess.run([sys.executable, "-m", "msd_jax.main", "--config", "configs/demo.py:quick",
                              f"--workdir={copy_w}", f"--mode={mode}", *common],
                             cwd=REPO, env=env["env"], capture_output=True, text=True, timeout=600)
        assert ref.returncode == 0, ref.stderr[-3000:]
    for site in SITES:
        for kind in ("shards", "uploads"):
            got = folder_files(flower_w / kind / site)
            assert got and got == folder_files(copy_w / kind / site), (kind, site)
    assert folder_files(flower_w / "head") == folder_files(copy_w / "head") == {
        "transform.json": open(copy_w / "head" / "transform.json", "rb").read()}
    assert not (flower_w / "site_secret").exists()
    assert verify.main([str(flower_w)], out=open(os.devnull, "w")) == 0
    record = json.load(open(flower_w / "records" / "flower.json"))
    for site in SITES:
        want = sum(len(b) for k in ("shards", "uploads", "head")
                   for b in folder_files(copy_w / k / site if k != "head" else copy_w / k).values())
        assert record["sites"][site]["bytes_uploaded"] == want
    print(f"\nflower model-upload round (secret_head): {record}")


# The transfer on its own (no deployment): what a site offers, what the server accepts.

def _site_upload(root, site="hospital_a"):
    from msd_jax.encryption import shards
    tokens = np.random.default_rng(0).normal(size=(5, 4, 3)).astype(np.float32)
    shards.write_shards(str(root / "shards" / site), site, tokens, dtype="float32",
                        head_fingerprint="0" * 64, shard_size=2)
    return root


def test_a_site_serves_only_the_files_it_listed(tmp_path):
    from msd_jax.protocols.flower import transfer
    from msd_jax.trust import InputError
    root = _site_upload(tmp_path)
    (root / "site_secret").mkdir()
    (root / "site_secret" / "shared_key").write_bytes(b"k" * 32)
    listing = transfer.list_upload(str(root), "hospital_a", ["shards", "head"])
    assert [e["file"] for e in listing] == ["manifest.json", "tokens-00000.npy", "tokens-00001.npy",
                                            "tokens-00002.npy"]
    data = open(root / "shards" / "hospital_a" / "tokens-00001.npy", "rb").read()
    assert transfer.read_chunk(str(root), "hospital_a", listing, "shards", "tokens-00001.npy", 3, 7) == data[3:10]
    for kind, name in (("head", "../site_secret/shared_key"), ("shards", "../../site_secret/shared_key"),
                       ("shards", "other.npy")):
        with pytest.raises(InputError, match="not a file this site offered"):
            transfer.read_chunk(str(root), "hospital_a", listing, kind, name, 0, 1)
    with pytest.raises(InputError, match="outside"):
        transfer.read_chunk(str(root), "hospital_a", listing, "shards", "tokens-00001.npy", len(data) - 1, 2)


@pytest.mark.parametrize("entry, match", [
    ({"kind": "shards", "file": "../x.npy", "bytes": 1, "sha256": "0" * 64}, "not a file a shards folder"),
    ({"kind": "head", "file": "head.msgpack", "bytes": 1, "sha256": "0" * 64}, "not a file a head folder"),
    ({"kind": "uploads", "file": "model.json", "bytes": 1, "sha256": "0" * 64}, "not asked for"),
    ({"kind": "shards", "file": "tokens-00000.npy", "bytes": -1, "sha256": "0" * 64}, "expected an integer"),
    ({"kind": "shards", "file": "tokens-00000.npy", "bytes": 1, "sha256": "xyz"}, "64 lowercase hex"),
    ({"kind": "shards", "file": "tokens-00000.npy", "bytes": 2**31, "sha256": "0" * 64}, "more than"),
])
def test_the_server_refuses_a_bad_listing(entry, match):
    from msd_jax.protocols.flower import transfer
    from msd_jax.trust import InputError
    manifest = {"kind": "shards", "file": "manifest.json", "bytes": 10, "sha256": "a" * 64}
    with pytest.raises(InputError, match=match):
        transfer.check_listing("hospital_a", [manifest, entry], ["shards", "head"], 2**30)


def test_staging_commits_whole_verified_folders_or_nothing(tmp_path):
    from msd_jax.protocols.flower import transfer
    from msd_jax.trust import InputError
    site_root = _site_upload(tmp_path / "site")
    listing = transfer.list_upload(str(site_root), "hospital_a", ["shards"])
    server = tmp_path / "server"

    def fetch(corrupt=False):
        staging = transfer.Staging(str(server))
        for kind, name, offset, length in transfer.chunk_plan(listing, 100):
            data = transfer.read_chunk(str(site_root), "hospital_a", listing, kind, name, offset, length)
            if corrupt and name == "tokens-00002.npy" and offset == 0:
                data = bytes([data[0] ^ 1]) + data[1:]
            staging.write(kind, "hospital_a", name, offset, data)
        return staging

    staging = fetch(corrupt=True)
    with pytest.raises(InputError, match="SHA-256 differs"):
        staging.check_files("hospital_a", listing)
    staging.discard()
    assert os.listdir(server / "shards") == []
    staging = fetch()
    staging.check_files("hospital_a", listing)
    assert sorted(os.listdir(server / "shards")) == [f".tmp-shards-hospital_a-{staging.token}"]
    staging.commit(["hospital_a"])
    assert os.listdir(server / "shards") == ["hospital_a"]
    assert folder_files(server / "shards" / "hospital_a") == folder_files(site_root / "shards" / "hospital_a")
