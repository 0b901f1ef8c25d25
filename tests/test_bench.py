"""benchmarks.perf and friends: perf_analyzer's input files (BYTES as base64), its output parsers on captured
samples, the message when the binary cannot start, and one real perf_analyzer run against the session server."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import perf, serving_compare
from benchmarks.quality import Recorder
from mim import contract
from mim.search.ranking import parity

# --- captured perf_analyzer 2.50 output (bundled tritonserver 2.51, cpu config, 2 cores) ---------------------
ENSEMBLE_STDOUT = """\
 Successfully read data for 1 stream/streams with 8 step/steps.
*** Measurement Settings ***
  Batch size: 1
  Service Kind: TRITON
  Using "time_windows" mode for stabilization
  Measurement window: 500 msec
  Using synchronous calls for inference

Request concurrency: 4
  Client:
    Request count: 406
    Throughput: 218.942 infer/sec
    Avg latency: 18099 usec (standard deviation 4855 usec)
    p50 latency: 17449 usec
    p90 latency: 24977 usec
    p95 latency: 27358 usec
    p99 latency: 31357 usec
    Avg gRPC time: 18024 usec ((un)marshal request/response 41 usec + response wait 17983 usec)
  Server:
    Inference count: 406
    Execution count: 406
    Successful request count: 406
    Avg request latency: 14899 usec (overhead 0 usec + queue 6329 usec + compute 16846 usec)

  Composing models:
  fuse, version: 1
      Inference count: 406
      Execution count: 288
      Successful request count: 406
      Avg request latency: 2628 usec (overhead 4 usec + queue 633 usec + compute input 60 usec + compute infer 1395 usec + compute output 534 usec)

  image_encoder, version: 1
      Inference count: 408
      Execution count: 268
      Successful request count: 408
      Avg request latency: 7303 usec (overhead 6 usec + queue 2386 usec + compute input 41 usec + compute infer 4693 usec + compute output 176 usec)

  preprocess_image, version: 1
      Inference count: 410
      Execution count: 341
      Successful request count: 410
      Avg request latency: 4451 usec (overhead 2 usec + queue 301 usec + compute input 46 usec + compute infer 3949 usec + compute output 152 usec)

Inferences/Second vs. Client Average Batch Latency
Concurrency: 4, throughput: 218.942 infer/sec, latency 18099 usec
"""

TWO_LEVEL_STDOUT = """\
Request concurrency: 1
  Client:
    Request count: 837
    Throughput: 278.409 infer/sec
    Avg latency: 3580 usec (standard deviation 2068 usec)
    p50 latency: 3385 usec
    p90 latency: 4014 usec
    p95 latency: 4363 usec
    p99 latency: 7663 usec
  Server:
    Inference count: 836
    Execution count: 836
    Successful request count: 836
    Avg request latency: 3098 usec (overhead 3 usec + queue 1156 usec + compute input 29 usec + compute infer 1737 usec + compute output 171 usec)

Request concurrency: 2
  Client:
    Request count: 1298
    Throughput: 430.97 infer/sec
    Avg latency: 4622 usec (standard deviation 1307 usec)
    p50 latency: 4308 usec
    p90 latency: 5729 usec
    p95 latency: 7726 usec
    p99 latency: 10057 usec
  Server:
    Inference count: 1299
    Execution count: 666
    Successful request count: 1299
    Avg request latency: 3680 usec (overhead 6 usec + queue 1070 usec + compute input 47 usec + compute infer 2317 usec + compute output 239 usec)
"""

# Rows come sorted by throughput, not by concurrency.
CSV_SAMPLE = """\
Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency
4,84.2,279,1604,33669,233,11731,18,1,47045,56545,59225,64886
2,87.2,235,1973,9151,190,11346,17,0,21874,28557,29768,34766
"""


def _image(fmt: str, colour: str = "red") -> bytes:
    from mim.data.render import Look, render_catalog_image

    buf = io.BytesIO()
    render_catalog_image("mug", "zebra", colour, 64, Look((0.1, 0.2, 0.3))).save(buf, format=fmt)
    return buf.getvalue()


# --- input data --------------------------------------------------------------------------------------------
def test_bytes_tensor_round_trips_through_base64_like_triton_serializes_it():
    from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

    items = [_image("JPEG"), b"", b"\x00ends with nul\x00", "zebra mug \u2602".encode()]
    entry = perf.tensor_entry(contract.IMAGE, items)
    assert entry["shape"] == [4]
    raw = base64.b64decode(entry["content"]["b64"])
    # The layout perf_analyzer expects: per element a little-endian uint32 length, then the bytes, as in
    # tritonclient's own serializer.
    assert raw == serialize_byte_tensor(np.array(items, dtype=np.object_)).item()
    assert list(deserialize_bytes_tensor(raw)) == items
    assert perf.decode_entry(contract.IMAGE, json.loads(json.dumps(entry))) == items
    assert (
        perf.tensor_entry(contract.TEXT, ["in red"])["content"]["b64"]
        == base64.b64encode(b"\x06\x00\x00\x00in red").decode()
    )


def test_truncated_bytes_tensor_is_refused_with_the_sizes():
    with pytest.raises(ValueError, match=r"element of 10 bytes, 3 left"):
        perf.deserialize_bytes_elements(b"\x0a\x00\x00\x00abc")
    with pytest.raises(ValueError, match=r"2 byte\(s\) left where a 4-byte length"):
        perf.deserialize_bytes_elements(b"\x01\x00\x00\x00a\x00\x00")


def test_numeric_tensors_are_little_endian_raw_bytes_with_their_shape():
    pixels = np.random.default_rng(0).random((3, 4, 4), dtype=np.float32)
    entry = perf.tensor_entry(contract.PIXEL_VALUES, pixels)
    assert entry["shape"] == [3, 4, 4]
    assert base64.b64decode(entry["content"]["b64"]) == pixels.astype("<f4").tobytes()
    np.testing.assert_array_equal(perf.decode_entry(contract.PIXEL_VALUES, entry), pixels)
    ids = perf.decode_entry(contract.INPUT_IDS, perf.tensor_entry(contract.INPUT_IDS, [2, 5, 3, 0]))
    assert ids.dtype == np.int64 and ids.tolist() == [2, 5, 3, 0]


def test_input_files_hold_real_images_and_texts_for_every_model(tmp_path, served_repository):
    from mim.model.preprocess import preprocess_image_bytes

    samples = [
        perf.Sample(_image("PNG"), "red zebra-striped ceramic mug", "shop"),
        perf.Sample(_image("JPEG", "blue"), "zebra mug", "street"),
    ]
    towers = perf.TowerInputs(served_repository)
    for model in perf.ALL_MODELS:
        path = perf.write_input_data(tmp_path / f"{model}.json", model, samples, towers)
        data = json.loads(path.read_text())["data"]
        assert len(data) == 2
        for entry, sample in zip(data, samples):
            assert set(entry) == {s.name for s in contract.MODELS[model].inputs}
            if contract.IMAGE.name in entry:
                assert perf.decode_entry(contract.IMAGE, entry["image"]) == [sample.image]
            if contract.TEXT.name in entry:
                assert perf.decode_entry(contract.TEXT, entry["text"]) == [sample.text.encode()]
            if contract.PIXEL_VALUES.name in entry:
                got = perf.decode_entry(contract.PIXEL_VALUES, entry["pixel_values"])
                np.testing.assert_array_equal(got, preprocess_image_bytes(sample.image, towers.image_cfg))
            if contract.INPUT_IDS.name in entry:
                ids = perf.decode_entry(contract.INPUT_IDS, entry["input_ids"])
                mask = perf.decode_entry(contract.ATTENTION_MASK, entry["attention_mask"])
                assert ids.shape == mask.shape == (towers.text.cfg.context_length,)
                assert mask.sum() >= 3  # [CLS] + at least one word piece + [SEP]


def test_tower_inputs_need_the_repository():
    with pytest.raises(ValueError, match="takes preprocessed tensors; pass TowerInputs"):
        perf.request_data(contract.IMAGE_ENCODER, perf.Sample(b"x", "t", "s"))


# --- parsers -----------------------------------------------------------------------------------------------
def test_csv_parser_keys_rows_by_concurrency_with_our_names():
    rows = perf.parse_csv(CSV_SAMPLE)
    assert [r["concurrency"] for r in rows] == [4, 2]
    assert rows[1]["throughput"] == pytest.approx(87.2)
    assert rows[0]["p99_us"] == 64886 and rows[0]["server_queue_us"] == 33669


def test_stdout_parser_keeps_the_composing_models_of_an_ensemble():
    report = perf.parse_stdout(ENSEMBLE_STDOUT)
    assert list(report) == [4]
    level = report[4]
    assert level["client"]["throughput"] == pytest.approx(218.942)
    assert level["client"]["p99_latency_us"] == 31357
    assert level["server"] == {
        "inference_count": 406,
        "execution_count": 406,
        "successful_request_count": 406,
        "avg_latency_us": 14899,
        "overhead_us": 0,
        "queue_us": 6329,
        "compute_us": 16846,
    }
    assert set(level["composing"]) == {"fuse", "image_encoder", "preprocess_image"}
    enc = level["composing"]["image_encoder"]
    assert (enc["inference_count"], enc["execution_count"]) == (408, 268)
    assert (enc["queue_us"], enc["compute_input_us"], enc["compute_infer_us"], enc["compute_output_us"]) == (
        2386,
        41,
        4693,
        176,
    )


def test_stdout_parser_separates_concurrency_levels():
    report = perf.parse_stdout(TWO_LEVEL_STDOUT)
    assert sorted(report) == [1, 2]
    assert report[2]["server"]["execution_count"] == 666 and report[1]["composing"] == {}
    assert report[2]["client"]["p50_latency_us"] == 4308


def test_levels_combine_csv_and_report(tmp_path):
    csv_text = CSV_SAMPLE.replace("4,84.2,", "4,218.942,")
    level = perf._level(
        "embed_image", 4, perf.QUICK, csv_text, ENSEMBLE_STDOUT, ["perf_analyzer"], seconds=1.0, label=""
    )
    assert level.row["throughput"] == pytest.approx(218.942)
    assert level.row["p50_ms"] == pytest.approx(47.045)
    assert level.row["server_queue_ms"] == pytest.approx(6.329)  # the report's, not the CSV's ensemble column
    assert level.row["server_compute_ms"] == pytest.approx(16.846)
    by_component = {b["component"]: b for b in level.breakdown}
    assert by_component["image_encoder"]["avg_batch"] == pytest.approx(408 / 268, abs=1e-3)
    assert set(by_component) == {"(whole model)", "fuse", "image_encoder", "preprocess_image"}


def test_missing_library_is_named_with_its_fix():
    out = (
        "perf_analyzer: error while loading shared libraries: libb64.so.0d: cannot open shared object file: "
        "No such file or directory"
    )
    msg = perf.diagnose_start_failure(Path("/venv/bin/perf_analyzer"), 127, out)
    assert "libb64.so.0d not found" in msg and "apt-get install -y libb64-0d" in msg
    msg = perf.diagnose_start_failure(Path("pa"), 127, out.replace("libb64.so.0d", "libcudart.so.12"))
    assert "nvidia-cuda-runtime-cu12" in msg


def test_settings_are_checked_and_bounded():
    with pytest.raises(ValueError, match="at least 3 windows"):
        perf.PerfSettings(concurrencies=(1,), max_trials=2)
    with pytest.raises(ValueError, match="expected time_windows or count_windows"):
        perf.PerfSettings(concurrencies=(1,), mode="forever")
    s = perf.PerfSettings(concurrencies=(1, 4), interval_ms=500, max_trials=5)
    assert "--measurement-interval=500" in s.window_args() and s.time_bound_s() < 60
    assert s.fixed_count_args(4) == ["--request-count=200"]


# --- other pure helpers ------------------------------------------------------------------------------------
def test_comparison_ratios_are_ours_over_the_other():
    row = serving_compare.comparison_row(
        "embed_image",
        4,
        {"throughput": 300.0, "p50_ms": 10.0, "p99_ms": 20.0, "stable": True},
        {"throughput": 150.0, "p50_ms": 25.0, "p99_ms": 40.0, "stable": False},
        0.004,
        0.01,
        4,
    )
    assert row["throughput_ours_over_pytriton"] == pytest.approx(2.0)
    assert row["p50_ours_over_pytriton"] == pytest.approx(0.4)
    assert row["p50_ours_over_inprocess"] == pytest.approx(2.5)
    assert row["inproc_batch_throughput"] == pytest.approx(400.0)
    assert row["throughput_ours_over_inprocess_ceiling"] == pytest.approx(0.75)
    missing = serving_compare.comparison_row("embed_text", 1, {"throughput": 1.0, "p50_ms": 1.0}, {}, 0.001, 0.001, 1)
    assert missing["throughput_ours_over_pytriton"] is None


def test_recorder_and_parity():
    rec = Recorder(lambda xs: np.ones((len(xs), 2)))
    rec([1, 2]), rec([3])
    assert rec.all().shape == (3, 2)
    a = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    d = parity(a, a + np.array([[0.0, 1e-3], [0.0, 0.0]], np.float32)).as_dict()
    assert d["rows"] == 2 and d["min_cosine"] < 1.0 and d["max_abs_diff"] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="differ in shape"):
        parity(a, a[:1])


# --- the real tool -----------------------------------------------------------------------------------------
def test_perf_analyzer_starts_here():
    """Fails (does not skip) with the missing library named: `make system-deps` and the serve extra install them."""
    try:
        pa = perf.locate()
    except perf.PerfAnalyzerError as e:
        pytest.fail(str(e))
    assert pa.binary.is_file()


@pytest.mark.server
@pytest.mark.timeout(120)
def test_perf_analyzer_measures_an_ensemble_on_the_session_server(triton_server, served_repository, tmp_path):
    try:
        pa = perf.locate()
    except perf.PerfAnalyzerError as e:
        pytest.fail(str(e))
    samples = [
        perf.Sample(_image("PNG"), "red zebra mug", "shop"),
        perf.Sample(_image("JPEG", "blue"), "in blue", "street"),
    ]
    inputs = perf.write_input_data(tmp_path / "embed_image.json", contract.EMBED_IMAGE, samples)
    settings = perf.PerfSettings(concurrencies=(1,), interval_ms=300, stability_pct=100.0, max_trials=3)
    perf.warm_up(pa, contract.EMBED_IMAGE, triton_server.grpc_url, inputs, requests=4)
    level = perf.measure(pa, contract.EMBED_IMAGE, triton_server.grpc_url, inputs, 1, settings, tmp_path)

    rows = perf.parse_csv((tmp_path / "embed_image_c1.csv").read_text())
    assert [r["concurrency"] for r in rows] == [1] and rows[0]["throughput"] > 0
    assert level.row["throughput"] > 0 and level.row["p50_ms"] > 0
    components = {b["component"] for b in level.breakdown}
    assert {"(whole model)", contract.PREPROCESS_IMAGE, contract.IMAGE_ENCODER} <= components

    # Windows that can never settle (0 % tolerance) fall back to one fixed-count measurement, marked as such.
    strict = perf.PerfSettings(concurrencies=(1,), interval_ms=200, stability_pct=0.0, max_trials=3, request_count=20)
    fallback = perf.measure(pa, contract.EMBED_IMAGE, triton_server.grpc_url, inputs, 1, strict, tmp_path, "strict")
    assert fallback.row["throughput"] > 0
    assert fallback.row["stable"] is False and "one measurement of 100 requests" in fallback.row["note"]


def test_results_markdown_reports_every_section_and_the_problems(tmp_path):
    from benchmarks import run as bench_run

    level = perf._level(
        "embed_multimodal",
        4,
        perf.QUICK,
        CSV_SAMPLE,
        ENSEMBLE_STDOUT,
        ["perf_analyzer", "-m", "x"],
        seconds=1.0,
        label="",
    )
    r = bench_run.Run(bench_run.QUICK, ["--quick"], tmp_path, tmp_path)
    r.sweep = perf.SweepResult([level.row], level.breakdown, {"embed_multimodal": "perf_analyzer -m x"}, {})
    row = serving_compare.comparison_row(
        "embed_multimodal", 4, level.row, {"throughput": 100.0, "p50_ms": 30.0}, 0.003, 0.008, 4
    )
    r.comparison = serving_compare.Comparison([row], [], {"embed_multimodal": {"ours_vs_pytriton": 1.0}}, {}, {})
    r.gpu_reason = "no NVIDIA GPU on this machine"
    r.errors["quality"] = "served and in-process results differ"
    r.stages = {"perf": 1.0, "total": 2.0}
    md = bench_run.results_markdown(r)
    for heading in (
        "## Commands",
        "## perf_analyzer: latency vs throughput",
        "## Ours vs PyTriton vs in-process",
        "## Retrieval quality",
        "## GPU",
        "## Run",
        "## Failed or skipped",
    ):
        assert heading in md
    assert "| image_encoder | 408 | 268 | 1.52 |" in md  # the composing-model breakdown, avg batch = 408/268
    assert "Skipped: no NVIDIA GPU on this machine" in md
    assert "**quality** failed: served and in-process results differ" in md
    assert "| embed_multimodal | 4 | 84.20 | 100.00 | 0.84 |" in md  # ours/PyTriton throughput ratio


# --- benchmarks.search_bench ---------------------------------------------------------------------------------
def test_search_bench_closed_loop_counts_calls_and_errors():
    from benchmarks.search_bench import closed_loop

    def make():
        def work(n: int) -> None:
            if n % 3 == 2:
                raise RuntimeError("refused")

        return work

    row = closed_loop(make, concurrency=3, seconds=0.3)
    assert row["requests"] > 0 and 0 < row["errors"] < row["requests"]
    assert row["throughput"] == row["requests"] / 0.3 and row["p50_ms"] <= row["p99_ms"]


def test_search_bench_inputs_for_the_search_ensembles(tmp_path):
    from benchmarks.search_bench import PERF_MODELS, _is_knn_version

    sample = perf.Sample(image=b"\x89PNG fake", text="zebra mug", source="x.png")
    files = perf.prepare_inputs(PERF_MODELS, [sample], None, tmp_path)
    entry = json.loads(files[contract.SEARCH_MULTIMODAL].read_text())["data"][0]
    assert set(entry) == {contract.IMAGE.name, contract.TEXT.name}
    assert _is_knn_version("/r/knn", "3") and not _is_knn_version("/r/knn", "1")
    assert not _is_knn_version("/r/image_encoder", "2")
