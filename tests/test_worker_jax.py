"""The worker under ``KERAS_BACKEND=jax`` on the CPU: `opacityd serve` and its embedded worker,
started with JAX as the backend, score studies pushed by storescu (a batch smaller than
``batch_size``, padded to a power of two for JAX) and send their SRs and summaries to a PACS;
the scores are TensorFlow's for the same bundle (one whose scores differ from image to image,
unlike the untrained demo's, which all round to 0.5)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import sqlalchemy as sa

from daemon.config import load_config
from db.engine import create_db_engine, make_session_factory, unit_of_work
from db.models import Job, Result
from db.states import JobState
from model.bundle import load_bundle, save_bundle
from model.predictor import Predictor
from model.preprocess import preprocess
from tests.conftest import Pacs, free_port, log_events, storescu, wait_until
from tests.daemon_process import DaemonProcess, start_daemon
from tests.factories import make_dx


@pytest.fixture(scope="module")
def spread_bundle(demo_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo network with its last layer's weights scaled up, so that the scores of
    different images differ by a few hundredths instead of millionths."""
    model, manifest = load_bundle(demo_bundle)
    dense = model.get_layer("probabilities")
    kernel, bias = dense.get_weights()
    dense.set_weights([kernel * 2e4, bias])
    bundle = tmp_path_factory.mktemp("spread") / "bundle"
    save_bundle(model, bundle, name="opacity-spread-TEST", version="0.0.1",
                spec=manifest.preprocessing)
    return bundle



def test_worker_under_jax_scores_studies_as_tensorflow_and_sends_their_srs(
        tmp_path: Path, spread_bundle: Path, daemons: list[DaemonProcess]) -> None:
    pytest.importorskip("jax")
    pacs = Pacs(tmp_path / "pacs", free_port()).start()
    try:
        daemon, cfg = start_daemon(
            tmp_path, daemons,
            f'[[destinations]]\nname = "pacs"\nhost = "127.0.0.1"\nport = {pacs.port}\n'
            'called_ae = "PACS"\n[delivery]\npoll_interval_s = 0.2\n'
            '[worker]\npoll_interval_s = 0.2\nbatch_size = 4\ninference_threads = 1\n',
            bundle=spread_bundle, quiet_s=2.0, env={"KERAS_BACKEND": "jax"})
        files = []
        for i in range(3):
            files.append(tmp_path / f"in/{i}.dcm")
            files[-1].parent.mkdir(exist_ok=True)
            make_dx(160, 128, seed=40 + i).save_as(files[-1], enforce_file_format=True)
        _, acks = storescu(daemon.port, files)
        assert set(acks.values()) == {"Success"}
        wait_until(lambda: len(pacs.srs()) == 3 and len(pacs.summaries()) == 3, timeout=300,
                   what="three SRs and three summaries at the PACS")
        log = daemon.output()
        (started,) = log_events(log, "worker_started")
        assert str(started["device"]).startswith("jax:cpu")
        (threads,) = log_events(log, "inference_threads")
        assert threads["backend"] == "jax" and threads["intra_op"] == 1
        assert {pydicom.dcmread(p).StudyInstanceUID for p in pacs.srs()} == {
            pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID for f in files}

        config = load_config(cfg, env={})
        engine = create_db_engine(config.database_url)
        try:
            with unit_of_work(make_session_factory(engine)) as s:
                assert set(s.scalars(sa.select(Job.state))) == {JobState.DONE}
                results = {r.sr_sop_instance_uid: (r.probability, json.loads(r.detail))
                           for r in s.scalars(sa.select(Result))}
        finally:
            engine.dispose()
        assert len(results) == 3
        tensorflow = Predictor(spread_bundle)
        spec = tensorflow.manifest.preprocessing
        expected = tensorflow.predict(np.stack([preprocess(f, spec).array for f in files]))
        assert np.ptp(expected) > 0.005  # else matching them would say little
        by_sop = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: p
                  for f, p in zip(files, expected, strict=True)}
        for probability, detail in results.values():
            ((sop, image),) = detail["images"].items()
            assert probability == pytest.approx(by_sop[sop], abs=1e-4)
            assert image["probability"] == pytest.approx(by_sop[sop], abs=1e-4)
            assert detail["summary"]["reason"] is None  # the heatmap (JAX's Grad-CAM) is shown
        assert daemon.terminate() == 0
    finally:
        pacs.stop()
