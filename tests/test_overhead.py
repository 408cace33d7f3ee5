"""`bnbench overhead`: a row for every path, its launches counted (stubbed, not run) and equal
to the path's known launches, the stub's cost subtracted, the ratio computed, the common
stamp first in the CSV.  Never a speed: the numbers are only checked to be consistent."""

import math

import pandas as pd
import pytest

from bnbench import cli, overhead
from bnbench.environment import STAMP_COLUMNS

FWD_SINGLE, BWD_SINGLE = "_bn_fwd_single_launch_kernel", "_bn_bwd_single_launch_kernel"
STATS, APPLY, REDUCE, DX = ("_bn_fwd_stats_kernel", "_bn_fwd_apply_kernel",
                            "_bn_bwd_reduce_kernel", "_bn_bwd_dx_kernel")
# the kernels each path launches at 2x8x4x4 (32 values per channel: the single-launch path)
# and at 16x4x28x28 (12544 per channel: the general path); eval is always one launch;
# sync_batch_norm in a group of one is the single-process op
LAUNCHED = {
    "eval_no_grad": ([APPLY], [APPLY]),
    "eval": ([APPLY], [APPLY]),
    "train_fwd": ([FWD_SINGLE], [STATS, APPLY]),
    "train_fwd_bwd": ([FWD_SINGLE, BWD_SINGLE], [STATS, APPLY, REDUCE, DX]),
    "functional_eval": ([APPLY], [APPLY]),
    "functional_train": ([FWD_SINGLE], [STATS, APPLY]),
    "sync_module_one_rank": ([FWD_SINGLE], [STATS, APPLY]),
    "sync_functional_one_rank": ([FWD_SINGLE], [STATS, APPLY]),
    "residual_relu_train_fwd": ([FWD_SINGLE], [STATS, APPLY]),
    "folded_inference": ([APPLY], [APPLY]),
}


def test_every_path_has_its_known_launches():
    assert set(LAUNCHED) == set(overhead.PATH_NAMES)


@pytest.mark.parametrize("shape, which", [((2, 8, 4, 4), 0), ((16, 4, 28, 28), 1)],
                         ids=["single_launch", "general"])
def test_rows_for_every_path_with_launches_counted(shape, which):
    rows = overhead.overhead_table(shape=shape, rounds=3, round_ms=0.3)
    assert [r["path"] for r in rows] == list(overhead.PATH_NAMES)
    for r in rows:
        expected = LAUNCHED[r["path"]][which]
        assert r["kernels_launched"].split("+") == expected, r["path"]
        assert r["launches"] == len(expected) > 0
        assert (r["N"], r["C"], r["H"], r["W"]) == shape
        # the stub's cost is measured (the recorded launches replayed) and subtracted
        assert r["stub_us"] > 0
        assert math.isclose(r["kernels_us"], r["kernels_raw_us"] - r["stub_us"])
        assert math.isclose(r["ratio"], r["kernels_us"] / r["torch_us"])
        assert r["torch_p20_us"] <= r["torch_us"] <= r["torch_p80_us"]
        assert r["kernels_p20_us"] <= r["kernels_us"] <= r["kernels_p80_us"]
        assert r["torch_call"] and r["kernels_call"]


def test_the_command_writes_a_stamped_csv_and_its_table(tmp_path, capsys):
    status = cli.main(["overhead", "--out", str(tmp_path), "--rounds", "2", "--round-ms", "0.2",
                       "--paths", "eval_no_grad,7"])
    assert status == 0
    df = pd.read_csv(tmp_path / overhead.CSV_NAME)
    assert tuple(df.columns[:len(STAMP_COLUMNS)]) == STAMP_COLUMNS
    assert list(df.path) == ["eval_no_grad", "sync_functional_one_rank"]
    assert (df.device_type == "cpu").all() and "record_launches" in df.method[0]
    table = overhead.markdown(df)
    assert table in capsys.readouterr().out
    assert len(table.splitlines()) == 2 + len(df)


@pytest.mark.parametrize("argv", [["--shape", "2x8"], ["--shape", "2x8x4x4,2x8x4x4"],
                                  ["--paths", "99"], ["--paths", "nope"], ["--rounds", "0"]])
def test_bad_arguments_exit_2_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["overhead", *argv])
    assert exc.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_a_path_without_a_recorded_launch_is_refused():
    """A kernels call whose launches bypass the stub would be timed with the kernels running:
    the command refuses it instead of reporting that as host time."""
    torch_path = overhead.CallPath("unstubbed", "F.batch_norm", "F.batch_norm",
                                   lambda shape, group: overhead._functional(False)(shape, group)
                                   [:1] * 2)
    with pytest.raises(RuntimeError, match="recorded no Triton launch"):
        overhead.overhead_table([torch_path], rounds=1, round_ms=0.1)


def test_device_table_times_both_sides_with_the_kernels_running():
    """On CPU (Triton through the interpreter, so the numbers are no speed): the rows, the
    wall times and the ratio; no CUDA-graph time, the reason given."""
    paths = [p for p in overhead.PATHS if p.name in ("eval_no_grad", "sync_functional_one_rank")]
    rows = overhead.device_table(paths, shapes=[(2, 3, 5, 3)], device="cpu", calls=1, rounds=1)
    assert [r["path"] for r in rows] == ["eval_no_grad", "sync_functional_one_rank"]
    for r in rows:
        assert r["torch_wall_us"] > 0 and r["kernels_wall_us"] > 0
        assert math.isclose(r["wall_ratio"], r["kernels_wall_us"] / r["torch_wall_us"])
        assert r["kernels_graph_us"] is None and "CUDA" in r["kernels_graph_error"]
