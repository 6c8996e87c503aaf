"""What the containerd and Kubernetes tests run, built here and cached under ~/.cache/podwire.

    python -m tests.k8s.artifacts          # build whatever is missing (``make test`` does this)
    python -m tests.k8s.artifacts --show   # print where each artifact is, build nothing

- Kubernetes' server binaries (kube-apiserver, kube-controller-manager, kube-scheduler,
  kubelet, kube-proxy), built from the Go module proxy through the wrapper module in
  ``tests/k8s/go/kube`` (k8s.io/kubernetes replaces its staging modules with relative paths,
  so the wrapper pins each to the published v0.x of the same release). The first build is the
  only slow step of the whole suite (see README); the cache key is a hash of the wrapper's
  go.mod/go.sum, the link flags and the Go version, so a new release means a new directory.
- etcd: Debian's ``etcd-server`` package, fetched with ``apt-get download`` and unpacked here
  rather than installed: installing it would register a system etcd service (and start one on
  machines whose policy allows it).
- Two images in docker-archive form for ``ctr images import`` (no registry is reachable): the
  sandbox's pause process and the test server, both static Go binaries from
  ``tests/k8s/go/images`` (stdlib only, no network needed).

Builds take a lock, so concurrent test runs on one machine build once and share the result;
each artifact is built into a temporary directory and renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import attrs

HERE = Path(__file__).resolve().parent
KUBE_MODULE = HERE / "go" / "kube"
IMAGES_MODULE = HERE / "go" / "images"
CACHE = Path(os.environ.get("PODWIRE_CACHE", Path.home() / ".cache" / "podwire"))

KUBE_VERSION = "v1.35.4"
KUBE_COMMANDS = (
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
)
KUBE_LDFLAGS = " ".join(
    [
        "-s",
        "-w",
        f"-X k8s.io/component-base/version.gitVersion={KUBE_VERSION}",
        "-X k8s.io/component-base/version.gitMajor=1",
        "-X k8s.io/component-base/version.gitMinor=35",
        "-X k8s.io/component-base/version.gitTreeState=clean",
    ]
)
PAUSE_IMAGE = "podwire.test/pause:1"
SERVER_IMAGE = "podwire.test/testserver:1"
ETCD_PACKAGE = "etcd-server"


class ArtifactError(Exception):
    """An artifact could not be built; the message says which and why."""


@attrs.frozen(kw_only=True)
class Kube:
    dir: Path
    version: str

    def bin(self, name: str) -> Path:
        return self.dir / name


@attrs.frozen(kw_only=True)
class Images:
    pause_tar: Path
    server_tar: Path
    pause: str = PAUSE_IMAGE
    server: str = SERVER_IMAGE


def go_binary() -> str:
    """The Go toolchain, found on PATH or where this machine kind installs it."""
    found = shutil.which("go") or next(
        (p for p in ("/usr/local/go/bin/go", "/usr/lib/go/bin/go") if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise ArtifactError("the Go toolchain (go) is needed to build the test binaries")
    return found


def _go_version(go: str) -> str:
    return subprocess.run(
        [go, "env", "GOVERSION"], check=True, capture_output=True, text=True
    ).stdout.strip()


def _digest(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _tree_bytes(root: Path) -> Iterator[bytes]:
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        yield str(path.relative_to(root)).encode()
        yield path.read_bytes()


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _say(msg: str) -> None:
    print(f"[artifacts] {msg}", file=sys.stderr, flush=True)


def _go_env(go: str) -> dict[str, str]:
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=readonly -trimpath -buildvcs=false"}
    env["PATH"] = f"{Path(go).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    return env


def _build_into(final: Path, build: object) -> Path:
    """Run ``build(tmpdir)`` and move the result to ``final`` atomically."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)  # type: ignore[operator]
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def kube(*, build: bool = True) -> Kube:
    """Return the Kubernetes binaries, building them first if they are not cached."""
    go = go_binary()
    key = _digest(
        (KUBE_MODULE / "go.mod").read_bytes(),
        (KUBE_MODULE / "go.sum").read_bytes(),
        KUBE_LDFLAGS,
        " ".join(KUBE_COMMANDS),
        _go_version(go),
    )
    final = CACHE / f"kube-{KUBE_VERSION}-{key}"
    if (final / "BUILD.json").exists():
        return Kube(dir=final, version=KUBE_VERSION)
    if not build:
        raise ArtifactError(
            f"Kubernetes binaries not built (run `python -m tests.k8s.artifacts`): {final}"
        )
    with _locked("kube"):
        if (final / "BUILD.json").exists():
            return Kube(dir=final, version=KUBE_VERSION)

        def run(tmp: Path) -> None:
            _say(f"building Kubernetes {KUBE_VERSION} ({', '.join(KUBE_COMMANDS)}): slow once")
            started = time.monotonic()
            pkgs = [f"k8s.io/kubernetes/cmd/{c}" for c in KUBE_COMMANDS]
            done = subprocess.run(
                [go, "build", "-ldflags", KUBE_LDFLAGS, "-o", f"{tmp}/", *pkgs],
                cwd=KUBE_MODULE,
                env=_go_env(go),
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                raise ArtifactError(f"go build of Kubernetes failed:\n{done.stderr[-4000:]}")
            elapsed = time.monotonic() - started
            (tmp / "BUILD.json").write_text(
                json.dumps(
                    {
                        "version": KUBE_VERSION,
                        "go": _go_version(go),
                        "wall_s": round(elapsed, 1),
                        "cpus": os.cpu_count(),
                        "load_at_end": os.getloadavg(),
                    },
                    indent=2,
                )
            )
            _say(f"built Kubernetes in {elapsed:.0f} s")

        _build_into(final, run)
    return Kube(dir=final, version=KUBE_VERSION)


def _etcd_version() -> str:
    """The etcd-server version apt would fetch (apt-cache reads the local lists only)."""
    out = subprocess.run(
        ["apt-cache", "policy", ETCD_PACKAGE], capture_output=True, text=True, check=False
    ).stdout
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Candidate:"):
            version = line.split(":", 1)[1].strip()
            if version and version != "(none)":
                return version
    return ""


def etcd(*, build: bool = True) -> Path:
    """Return Debian's etcd binary, unpacked from its package into the cache."""
    existing = sorted(CACHE.glob("etcd-*/etcd"))
    version = _etcd_version()
    if not version:
        if existing:
            return existing[-1]
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        version = _etcd_version()
        if not version:
            raise ArtifactError(f"apt knows no {ETCD_PACKAGE} package")
    final = CACHE / f"etcd-{version.replace(':', '_')}"
    if (final / "etcd").exists():
        return final / "etcd"
    if not build:
        raise ArtifactError(f"etcd not unpacked (run `python -m tests.k8s.artifacts`): {final}")
    with _locked("etcd"):
        if (final / "etcd").exists():
            return final / "etcd"

        def run(tmp: Path) -> None:
            _say(f"fetching {ETCD_PACKAGE} {version} from Debian")
            got = subprocess.run(
                ["apt-get", "download", "-qq", f"{ETCD_PACKAGE}={version}"],
                cwd=tmp,
                capture_output=True,
                text=True,
            )
            if got.returncode != 0:
                raise ArtifactError(f"apt-get download {ETCD_PACKAGE} failed: {got.stderr.strip()}")
            (deb,) = tmp.glob("*.deb")
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp / "pkg")], check=True)
            shutil.move(tmp / "pkg" / "usr" / "bin" / "etcd", tmp / "etcd")
            shutil.rmtree(tmp / "pkg")
            deb.unlink()

        _build_into(final, run)
    return final / "etcd"


def docker_archive(binary: bytes, path_in_image: str, tag: str, entrypoint: list[str]) -> bytes:
    """A one-layer image holding ``binary``, in the form ``docker save`` writes."""

    def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for info, data in members:
                tar.addfile(info, io.BytesIO(data) if data is not None else None)
        return buf.getvalue()

    def entry(
        name: str, data: bytes | None = None, mode: int = 0o755
    ) -> tuple[tarfile.TarInfo, bytes | None]:
        info = tarfile.TarInfo(name)
        info.mode = mode
        info.mtime = 0
        if data is None:
            info.type = tarfile.DIRTYPE
        else:
            info.size = len(data)
        return info, data

    name = path_in_image.lstrip("/")
    dirs = ["tmp/", "etc/"]  # /tmp for the test server, /etc for the runtime's hosts/resolv.conf
    layer = tar_bytes(
        [entry(d, mode=0o1777 if d == "tmp/" else 0o755) for d in dirs] + [entry(name, binary)]
    )
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": entrypoint, "Env": ["PATH=/"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created_by": "tests/k8s/artifacts.py"}],
        },
        sort_keys=True,
    ).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    layer_dir = diff_id.split(":")[1]
    manifest = json.dumps(
        [{"Config": config_name, "RepoTags": [tag], "Layers": [f"{layer_dir}/layer.tar"]}]
    ).encode()
    return tar_bytes(
        [
            entry(f"{layer_dir}/"),
            entry(f"{layer_dir}/layer.tar", layer, 0o644),
            entry(config_name, config, 0o644),
            entry("manifest.json", manifest, 0o644),
        ]
    )


def images(*, build: bool = True) -> Images:
    """Return the pause and test-server image archives, building them if not cached."""
    go = go_binary()
    key = _digest(*_tree_bytes(IMAGES_MODULE), PAUSE_IMAGE, SERVER_IMAGE, _go_version(go))
    final = CACHE / f"images-{key}"
    result = Images(pause_tar=final / "pause.tar", server_tar=final / "testserver.tar")
    if result.server_tar.exists():
        return result
    if not build:
        raise ArtifactError(f"test images not built (run `python -m tests.k8s.artifacts`): {final}")
    with _locked("images"):
        if result.server_tar.exists():
            return result

        def run(tmp: Path) -> None:
            _say("building the pause and test-server images")
            done = subprocess.run(
                [go, "build", "-ldflags", "-s -w", "-o", f"{tmp}/", "./pause", "./testserver"],
                cwd=IMAGES_MODULE,
                env=_go_env(go),
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                raise ArtifactError(f"go build of the test images failed:\n{done.stderr[-4000:]}")
            for prog, tag in (("pause", PAUSE_IMAGE), ("testserver", SERVER_IMAGE)):
                binary = (tmp / prog).read_bytes()
                (tmp / prog).unlink()
                archive = docker_archive(binary, f"/{prog}", tag, [f"/{prog}"])
                (tmp / f"{prog}.tar").write_bytes(archive)

        _build_into(final, run)
    return result


def main(argv: list[str]) -> int:
    build = "--show" not in argv
    try:
        built_images = images(build=build)
        etcd_bin = etcd(build=build)
        kube_bins = kube(build=build)
    except ArtifactError as e:
        print(f"tests.k8s.artifacts: {e}", file=sys.stderr)
        return 1
    print(f"images: {built_images.pause_tar.parent}")
    print(f"etcd:   {etcd_bin}")
    print(f"kube:   {kube_bins.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
