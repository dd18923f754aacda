"""The benchmark harness runs and prints numbers; its RTVC peer computes what spkenc computes.

No timing is asserted here: timings belong in benchmarks/RESULTS.md.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# benchmarks/ is a folder of the repository, not an installed package
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import DataMissing, RowResult
from benchmarks.inputs import shared_sources
from benchmarks.rtvc_reference import RTVCEncoder
from spkenc.ge2e import GE2ELoss, batch_eer


def _table_rows(stdout: str) -> dict[str, list[str]]:
    rows = {}
    for line in stdout.splitlines():
        if line.startswith("| ") and not line.startswith("| what"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


@pytest.mark.slow
def test_quick_run_prints_a_table_with_figures_for_both_sides(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--only", "train,loader", "--cache", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "threads: 1 torch + 1 BLAS" in done.stdout
    assert "cpu: " in done.stdout and "date: " in done.stdout
    rows = _table_rows(done.stdout)
    assert set(rows) == {
        "training step fp32, 8x4x160",
        "training loader, 8x4x160 batches, shards in memory",
        "training loader, 8x4x160 batches, shards read on demand",
    }
    for what, (_, spkenc, peer, unit, ratio, _, verdict, gflops, _) in rows.items():
        assert float(spkenc.replace(",", "")) > 0 and float(peer.replace(",", "")) > 0, what
        assert ratio.endswith("x") and float(ratio[:-1]) > 0, what
        assert verdict in ("PASS", "FAIL"), what
    spkenc_gflops, peer_gflops = rows["training step fp32, 8x4x160"][7].split(" / ")
    assert float(spkenc_gflops) > 0 and float(peer_gflops) > 0


@pytest.mark.slow
def test_the_loss_curve_row_compares_bf16_with_the_spread_of_two_fp32_runs(tmp_path):
    from benchmarks.rows_training import moving_gap
    from spkenc.precision import bf16_autocast_error

    assert moving_gap(np.ones(30), np.full(30, 1.5), 20) == pytest.approx((0.5, 0.5, 1.0))
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--only", "loss_curve", "--curve-steps", "3", "--cache", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = _table_rows(done.stdout).values()
    if bf16_autocast_error("cpu") is not None:  # the row cannot run here: it says so and why
        assert "skipped: this CPU has no bfloat16 LSTM kernel" in done.stdout, done.stdout[-2000:]
        return
    assert row[0] == "loss curve bf16 vs fp32, 3 steps of 8x4x160" and row[6] in ("PASS", "FAIL")
    assert "fp32 seed 1 vs seed 0" in row[8]
    header = (tmp_path / "loss_curves_8x4_3.csv").read_text().splitlines()[0]
    assert header.startswith("step,loss_fp32,loss_bf16,loss_fp32_seed1")


def test_unknown_row_is_a_usage_error():
    done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--only", "nonsense"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2
    assert "unknown row(s) ['nonsense']" in done.stderr


def test_absent_shared_data_names_the_missing_folder(tmp_path):
    with pytest.raises(DataMissing, match=str(tmp_path / "speechocean762_train")):
        shared_sources(tmp_path)


def test_ratio_reads_the_same_way_for_throughput_and_time():
    assert RowResult("a", "a", 10.0, 2.0, "x/s", "higher", target_ratio=5.0).passed is True
    assert RowResult("a", "a", 3.0, 2.0, "s", "lower", target_ratio=1.2).ratio == pytest.approx(2 / 3)
    assert RowResult("a", "a", 3.0, 2.0, "s", "lower", target_ratio=1.2).passed is False
    assert RowResult("a", "a", 1600.0, None, "MB", "lower", limit=1500.0).passed is False


def test_rtvc_reference_loss_matches_spkenc_ge2e():
    """The peer's per-speaker loop computes GE2E's matrix (up to RTVC's 1e-5 norm epsilon) and
    the EER that spkenc's batch_eer computes."""
    torch.manual_seed(0)
    embeds = torch.nn.functional.normalize(torch.rand(6, 4, 16), dim=2)
    peer_loss, peer_eer = RTVCEncoder().loss(embeds)
    loss, sim = GE2ELoss()(embeds)
    assert float(peer_loss.detach()) == pytest.approx(float(loss.detach()), abs=1e-4)
    assert torch.allclose(RTVCEncoder().similarity_matrix(embeds).reshape(24, 6), sim.detach(), atol=1e-3)
    assert peer_eer == pytest.approx(batch_eer(sim.detach(), 6, 4), abs=1e-6)
