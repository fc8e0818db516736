import dataclasses
import hashlib
import socket
import time
from pathlib import Path

import pytest
import yaml
from idx_files import declaration

from weightlapse.pipeline.datasets import (
    DATASETS, FILES, TEST_IMAGES, TEST_LABELS, TRAIN_LABELS, DatasetError, file_digest, load_dataset,
)
from weightlapse.pipeline.download import DownloadError, fetch_dataset, fetch_file, main, mirror_list
from weightlapse.pipeline.params import load_params


def no_partial_files(directory):
    return [p.name for p in directory.iterdir() if p.name not in FILES]


def test_local_directory_and_file_url_mirrors(tmp_path, generated_data):
    source, checksums = generated_data
    for mirror in (str(source), source.as_uri()):
        out = tmp_path / f"out-{len(mirror)}"
        out.mkdir()
        path = fetch_file(TRAIN_LABELS, checksums[TRAIN_LABELS], out, mirrors=[mirror], progress=False)
        assert path.read_bytes() == (source / TRAIN_LABELS).read_bytes()


def test_http_mirror_after_dead_and_corrupt_ones(tmp_path, generated_data, http_server, dead_mirror):
    source, checksums = generated_data
    good = (source / TEST_IMAGES).read_bytes()
    flipped = bytearray(good)
    flipped[100] ^= 0x01
    http_server.routes["/corrupt/" + TEST_IMAGES] = [("ok", bytes(flipped))]
    http_server.routes["/cut/" + TEST_IMAGES] = [("truncate", good)]
    http_server.routes["/good/" + TEST_IMAGES] = [("ok", good)]
    mirrors = [dead_mirror, http_server.url + "corrupt/", http_server.url + "cut/", http_server.url + "good/"]
    out = tmp_path / "out"
    out.mkdir()
    path = fetch_file(TEST_IMAGES, checksums[TEST_IMAGES], out, mirrors=mirrors, retries=0, progress=False)
    assert path.read_bytes() == good
    assert no_partial_files(out) == []
    assert http_server.requests[-1] == "/good/" + TEST_IMAGES


def test_server_error_then_success_is_retried(tmp_path, generated_data, http_server):
    source, checksums = generated_data
    body = (source / TEST_LABELS).read_bytes()
    http_server.routes["/" + TEST_LABELS] = [("status", 500), ("ok", body)]
    fetch_file(TEST_LABELS, checksums[TEST_LABELS], tmp_path, mirrors=[http_server.url], retries=1, progress=False)
    assert (tmp_path / TEST_LABELS).read_bytes() == body
    assert http_server.requests == ["/" + TEST_LABELS] * 2


def test_all_mirrors_failing_names_each_and_the_fix(tmp_path, generated_data, http_server, dead_mirror):
    source, checksums = generated_data
    http_server.routes["/" + TEST_IMAGES] = [("ok", b"not the dataset")]
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DownloadError) as raised:
        fetch_file(TEST_IMAGES, checksums[TEST_IMAGES], out, progress=False, retries=0,
                   mirrors=[dead_mirror, http_server.url, str(tmp_path / "nowhere")])
    message = str(raised.value)
    assert dead_mirror in message and http_server.url in message and "nowhere" in message
    assert "WEIGHTLAPSE_MIRRORS" in message
    assert isinstance(raised.value, ConnectionError)
    assert list(out.iterdir()) == []  # nothing a later run could trust


def test_a_corrupt_local_copy_is_refused_and_leaves_nothing(tmp_path, generated_data):
    source, checksums = generated_data
    wrong = "sha256:" + "0" * 64
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DownloadError, match="expected 0000"):
        fetch_file(TEST_LABELS, wrong, out, mirrors=[str(source)], progress=False)
    assert list(out.iterdir()) == []


def test_a_present_verified_file_is_not_fetched_again(tmp_path, generated_data, http_server):
    source, checksums = generated_data
    (tmp_path / TEST_LABELS).write_bytes((source / TEST_LABELS).read_bytes())
    fetch_file(TEST_LABELS, checksums[TEST_LABELS], tmp_path, mirrors=[http_server.url], progress=False)
    assert http_server.requests == []


def test_a_present_corrupt_file_is_replaced(tmp_path, generated_data):
    source, checksums = generated_data
    (tmp_path / TEST_LABELS).write_bytes(b"left over from a crash")
    fetch_file(TEST_LABELS, checksums[TEST_LABELS], tmp_path, mirrors=[str(source)], progress=False)
    assert (tmp_path / TEST_LABELS).read_bytes() == (source / TEST_LABELS).read_bytes()


def test_user_mirrors_come_before_built_in_ones():
    spec = DATASETS["mnist"]
    mirrors = mirror_list(spec, env="/srv/mnist  file:///mnt/mnist " + spec.mirrors[0])
    assert mirrors[:2] == ["/srv/mnist", "file:///mnt/mnist"]
    assert mirrors[2:] == list(spec.mirrors)


def test_checksum_table_matches_the_real_mnist_test_files(tmp_path, shared_mnist, http_server):
    # Serve the real files over HTTP and fetch them with the built-in checksums.
    spec = DATASETS["mnist"]
    for name in (TEST_IMAGES, TEST_LABELS):
        http_server.routes["/mnist/" + name] = [("ok", (shared_mnist / name).read_bytes())]
        fetch_file(name, spec.checksums[name], tmp_path, mirrors=[http_server.url + "mnist/"], progress=False)
        md5 = hashlib.md5((tmp_path / name).read_bytes()).hexdigest()
        assert md5 in (shared_mnist / "README.md").read_text()


def test_checksum_table_matches_debian_fashion_mnist(tmp_path, debian_fashion):
    files = fetch_dataset(DATASETS["fashion-mnist"], tmp_path, mirrors=[str(debian_fashion)], progress=False)
    assert sorted(files) == sorted(FILES)


def test_stage_fetches_what_it_can_and_names_what_is_missing(tmp_path, shared_mnist, monkeypatch, caplog):
    # The mirror holds only MNIST's test files: the stage fails, naming the two training
    # files, and keeps the verified test files for the next try.
    params = tmp_path / "params.yaml"
    params.write_text("data: {dataset: mnist}\nruns: {original: {seed: 0}}\n")
    # Leave out the built-in internet mirrors: these machines are offline.
    monkeypatch.setattr("weightlapse.pipeline.download.mirror_list", lambda spec: [str(shared_mnist)])
    out = tmp_path / "data"
    assert main(["--params", str(params), "--out", str(out)]) == 1
    spec = DATASETS["mnist"]
    for name in (TEST_IMAGES, TEST_LABELS):
        assert "sha256:" + file_digest(out / name) == spec.checksums[name]
    assert "mnist: could not fetch train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz." in caplog.text
    assert caplog.text.count("WEIGHTLAPSE_MIRRORS") == 1  # the fix, said once
    assert "train-images-idx3-ubyte.gz" in caplog.text and TRAIN_LABELS in caplog.text
    assert sorted(p.name for p in out.iterdir()) == sorted([TEST_IMAGES, TEST_LABELS])


def test_stage_reports_bad_params_without_a_traceback(tmp_path, caplog):
    params = tmp_path / "params.yaml"
    params.write_text("data: {dataset: cifar10}\nruns: {original: {seed: 0}}\n")
    assert main(["--params", str(params), "--out", str(tmp_path / "data")]) == 1
    assert "data.dataset: unknown dataset 'cifar10'; choose one of fashion-mnist, mnist" in caplog.text


def test_a_stalled_server_times_out_and_the_next_mirror_serves(tmp_path, generated_data, http_server):
    source, checksums = generated_data
    body = (source / TEST_IMAGES).read_bytes()
    http_server.stall_s = 3.0
    http_server.routes["/slow/" + TEST_IMAGES] = [("stall", body)]
    http_server.routes["/good/" + TEST_IMAGES] = [("ok", body)]
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DownloadError) as raised:
        fetch_file(TEST_IMAGES, checksums[TEST_IMAGES], out, mirrors=[http_server.url + "slow/"], retries=0,
                   timeout_s=0.5, progress=False)
    assert "within 0.5 s" in str(raised.value)
    assert no_partial_files(out) == []
    path = fetch_file(TEST_IMAGES, checksums[TEST_IMAGES], out, timeout_s=0.5, retries=0, progress=False,
                      mirrors=[http_server.url + "slow/", http_server.url + "good/"])
    assert path.read_bytes() == body


def test_a_pickle_offered_as_data_is_refused_and_never_runs(tmp_path, generated_data):
    # A pickle whose loading would create a file: the attack the original notebook was open to.
    import pickle

    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    source, checksums = generated_data
    mirror = tmp_path / "evil-mirror"
    mirror.mkdir()
    for name in FILES:
        (mirror / name).write_bytes(pickle.dumps(Payload()))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DownloadError, match="could not get"):
        fetch_file(TEST_IMAGES, checksums[TEST_IMAGES], out, mirrors=[str(mirror)], retries=0, progress=False)
    assert list(out.iterdir()) == [] and not marker.exists()
    # Offered straight to the parser, as files already in the data directory: refused too.
    with pytest.raises(DatasetError):
        load_dataset(mirror, "mnist")
    assert not marker.exists()


def generated_spec(source, checksums):
    """The MNIST entry, with the generated files' checksums and sizes."""
    sizes = {name: (source / name).stat().st_size for name in FILES}
    return dataclasses.replace(DATASETS["mnist"], checksums=checksums, sizes=sizes)


def test_an_endless_body_is_cut_at_the_published_size_and_leaves_nothing(tmp_path, generated_data, http_server):
    source, checksums = generated_data
    size = (source / TEST_IMAGES).stat().st_size
    http_server.routes["/" + TEST_IMAGES] = [("endless", b"\x00" * 65536)]  # no Content-Length, no end
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DownloadError, match=rf"sent more than the {size:,} bytes of the published file; cut off"):
        fetch_file(TEST_IMAGES, checksums[TEST_IMAGES], out, mirrors=[http_server.url], max_bytes=size,
                   retries=2, progress=False)
    assert list(out.iterdir()) == []
    assert http_server.requests == ["/" + TEST_IMAGES]  # a wrong file is not asked for again


def test_each_file_of_a_dataset_is_held_to_its_published_size(tmp_path, generated_data, http_server):
    source, checksums = generated_data
    for name in FILES:
        http_server.routes["/" + name] = [("ok", (source / name).read_bytes())]
    http_server.routes["/" + TRAIN_LABELS] = [("ok", (source / TRAIN_LABELS).read_bytes() + b"\x00")]
    out = tmp_path / "out"
    with pytest.raises(DownloadError, match=r"(?s)could not fetch train-labels-idx1-ubyte.gz\.\n.*announces "
                                            r"[0-9,]+ bytes, more than the [0-9,]+ of the published file"):
        fetch_dataset(generated_spec(source, checksums), out, mirrors=[http_server.url], progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(set(FILES) - {TRAIN_LABELS})


def test_a_local_copy_larger_than_published_is_refused(tmp_path, generated_data):
    source, checksums = generated_data
    with pytest.raises(DownloadError, match=r"is [0-9,]+ bytes, more than the 100 of the published file"):
        fetch_file(TEST_IMAGES, checksums[TEST_IMAGES], tmp_path, mirrors=[str(source)], max_bytes=100,
                   progress=False)
    assert list(tmp_path.iterdir()) == [source]


def test_a_trickling_server_is_cut_off_by_the_time_limit_and_leaves_nothing(tmp_path, generated_data, http_server):
    source, checksums = generated_data
    # 25 bytes a second: each read comes well within timeout_s, the whole file would take minutes.
    http_server.routes["/slow/" + TEST_LABELS] = [("trickle", (source / TEST_LABELS).read_bytes())]
    http_server.routes["/good/" + TEST_LABELS] = [("ok", (source / TEST_LABELS).read_bytes())]
    out = tmp_path / "out"
    out.mkdir()
    started = time.monotonic()
    with pytest.raises(DownloadError, match=r"sent only [0-9,]+ bytes in 2 s, the limit for one file; cut off"):
        fetch_file(TEST_LABELS, checksums[TEST_LABELS], out, mirrors=[http_server.url + "slow/"], retries=2,
                   timeout_s=5, total_timeout_s=2, progress=False)
    assert time.monotonic() - started < http_server.fault_s - 3  # not waiting for the server to give up
    assert list(out.iterdir()) == []
    fetch_file(TEST_LABELS, checksums[TEST_LABELS], out, mirrors=[http_server.url + "slow/", http_server.url + "good/"],
               retries=0, timeout_s=5, total_timeout_s=2, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [TEST_LABELS]


@pytest.fixture
def name_lookups(monkeypatch):
    """Host names looked up through socket.getaddrinfo, with proxies out of the way."""
    for variable in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)
    lookups, real = [], socket.getaddrinfo

    def counting(host, *args, **kwargs):
        lookups.append(host)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", counting)
    return lookups


UNRESOLVABLE = "http://weightlapse-nonexistent.invalid/"


def test_a_name_that_does_not_resolve_is_not_retried_and_the_error_names_the_offline_routes(tmp_path, name_lookups):
    spec = DATASETS["fashion-mnist"]
    with pytest.raises(DownloadError) as raised:
        fetch_dataset(spec, tmp_path, mirrors=[UNRESOLVABLE], retries=2, progress=False)
    message = str(raised.value)
    assert name_lookups.count("weightlapse-nonexistent.invalid") == 1  # once, for all four files
    assert f"{UNRESOLVABLE}: cannot resolve weightlapse-nonexistent.invalid (no network, or no DNS?); not retried" \
        in message
    assert "set WEIGHTLAPSE_MIRRORS=/that/dir" in message and "apt-get install dataset-fashion-mnist" in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("response", [("status", 404), ("ok", b"not the dataset")])
def test_a_missing_or_wrong_file_is_not_asked_for_again(tmp_path, generated_data, http_server, response):
    _, checksums = generated_data
    http_server.routes["/" + TEST_LABELS] = [response]
    with pytest.raises(DownloadError, match="HTTP 404 Not Found|expected"):
        fetch_file(TEST_LABELS, checksums[TEST_LABELS], tmp_path, mirrors=[http_server.url], retries=2,
                   progress=False)
    assert http_server.requests == ["/" + TEST_LABELS]


def stage_params_with_a_local_mirror(tmp_path, generated_data, monkeypatch):
    """A params file for the data stage, whose only mirror is the generated dataset's directory."""
    source, checksums = generated_data
    monkeypatch.setitem(DATASETS, "mnist", generated_spec(source, checksums))
    monkeypatch.setattr("weightlapse.pipeline.download.mirror_list", lambda spec: [str(source)])
    params = tmp_path / "params.yaml"
    params.write_text("data: {dataset: mnist}\nruns: {original: {seed: 0}}\n")
    return params


def test_stage_refuses_an_out_directory_holding_other_files(tmp_path, generated_data, monkeypatch, caplog):
    params = stage_params_with_a_local_mirror(tmp_path, generated_data, monkeypatch)
    out = tmp_path / "Documents"
    (out / "photos").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    assert main(["--params", str(params), "--out", str(out)]) == 1
    assert f"{out} holds files the data stage did not write (notes.txt, photos); choose an empty or new directory" \
        in caplog.text
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "photos"]  # nothing fetched, nothing deleted
    assert (out / "notes.txt").read_text() == "mine"


def test_stage_removes_only_its_own_stale_temp_files(tmp_path, generated_data, monkeypatch):
    params = stage_params_with_a_local_mirror(tmp_path, generated_data, monkeypatch)
    _, checksums = generated_data
    out = tmp_path / "data"
    out.mkdir()
    (out / f".{TEST_LABELS}.k2x9q1.part").write_bytes(b"left by a killed download")
    (out / TEST_IMAGES).write_bytes(b"a corrupt copy")
    assert main(["--params", str(params), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert all("sha256:" + file_digest(out / name) == checksums[name] for name in FILES)


def declared_params(tmp_path, name: str, raw: dict) -> Path:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"datasets": {"mnist": {}, name: raw}, "runs": {"a": {"dataset": name}}}))
    return params


def test_stage_fetches_a_declared_dataset_through_a_file_url_mirror(tmp_path, generated_data, monkeypatch):
    source, checksums = generated_data
    monkeypatch.delenv("WEIGHTLAPSE_MIRRORS", raising=False)
    params = declared_params(tmp_path, "my-set", declaration(source))
    out = tmp_path / "data" / "my-set"
    assert main(["--params", str(params), "--dataset", "my-set", "--out", str(out)]) == 0
    assert {name: "sha256:" + file_digest(out / name) for name in FILES} == checksums
    assert load_dataset(out, "my-set", spec=load_params(params).datasets["my-set"]).class_names[9] == "class-9"


def test_stage_refuses_a_declared_file_whose_checksum_differs(tmp_path, generated_data, monkeypatch, caplog):
    source, _ = generated_data
    monkeypatch.delenv("WEIGHTLAPSE_MIRRORS", raising=False)
    raw = declaration(source)
    raw["files"][TRAIN_LABELS]["sha256"] = "0" * 64
    out = tmp_path / "data" / "my-set"
    assert main(["--params", str(declared_params(tmp_path, "my-set", raw)), "--dataset", "my-set", "--out",
                 str(out)]) == 1
    assert f"could not fetch {TRAIN_LABELS}" in caplog.text and "the copy is corrupt or a different file" in caplog.text
    assert not (out / TRAIN_LABELS).exists()


def test_stage_refuses_a_dataset_the_params_do_not_name(tmp_path, caplog):
    params = tmp_path / "params.yaml"
    params.write_text("datasets: {mnist: {}}\nruns: {a: {}}\n")
    assert main(["--params", str(params), "--dataset", "fashion-mnist", "--out", str(tmp_path / "d")]) == 1
    assert "--dataset fashion-mnist: " in caplog.text and "choose one of mnist" in caplog.text


def test_debian_fashion_mnist_declared_under_another_name_is_fetched_and_verified(tmp_path, debian_fashion,
                                                                                   monkeypatch):
    monkeypatch.delenv("WEIGHTLAPSE_MIRRORS", raising=False)
    raw = declaration(debian_fashion, n_train=60_000, n_test=10_000)
    out = tmp_path / "data" / "zalando"
    assert main(["--params", str(declared_params(tmp_path, "zalando", raw)), "--dataset", "zalando", "--out",
                 str(out)]) == 0
    dataset = load_dataset(out, "zalando", spec=load_params(tmp_path / "params.yaml").datasets["zalando"])
    assert dataset.train.images.shape == (60_000, 784) and dataset.file_checksums == {
        name: DATASETS["fashion-mnist"].checksums[name] for name in FILES}
