"""What the launch environment says about processes, and the commands that refuse several."""

import pytest

from jaxzero.cli.main import main
from jaxzero.parallel import distributed

LAUNCH_VARS = ("JAXZERO_DISTRIBUTED", "JAXZERO_NUM_PROCESSES", "SLURM_NTASKS",
               "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


@pytest.fixture
def launch(monkeypatch):
    for key in LAUNCH_VARS:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


@pytest.mark.parametrize("env,count", [
    ({}, None),
    ({"JAXZERO_NUM_PROCESSES": "4"}, 4),
    ({"SLURM_NTASKS": "2"}, 2),
    ({"SLURM_NTASKS": "1"}, 1),
    ({"OMPI_COMM_WORLD_SIZE": "8"}, 8),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, 4),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1", "JAXZERO_DISTRIBUTED": "0"}, 1),
])
def test_launched_processes(launch, env, count):
    for key, value in env.items():
        launch.setenv(key, value)
    assert distributed.launched_processes() == count


@pytest.mark.parametrize("argv", [["generate", "some/model", "--prompt", "hi"],
                                  ["eval", "some/model", "--data", "test.jsonl"]])
def test_eval_and_generate_refuse_a_multi_process_launch(launch, capsys, argv):
    launch.setenv("SLURM_NTASKS", "2")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"jaxzero {argv[0]}: error: jaxzero {argv[0]} runs on one process, "
                          "but this launch has 2 (from ")
    assert "srun --ntasks=1" in err and "JAXZERO_DISTRIBUTED=0" in err


def test_one_process_agrees_with_itself():
    assert distributed.agree_stop(False) is False and distributed.agree_stop(True) is True
    assert distributed.agree_max([1.0, -1.0]) == [1.0, -1.0]
    assert distributed.lost_processes() is None
