"""The agreed stop's save: the grace-period rule, and what it saves or leaves on a real store."""

import signal

import jax.numpy as jnp
import pytest

from helpers import REPO, TINY
from jaxzero.config.files import load_config
from jaxzero.io.checkpoint import CheckpointStore
from jaxzero.monitor.writer import Console
from jaxzero.rl.setup import RunFiles, TrainState
from jaxzero.rl.stop import SAVE_MARGIN, StopSignal, final_save_fits, save_on_stop


@pytest.mark.parametrize("left,last,fits", [
    (None, None, True),           # no deadline configured
    (None, 500.0, True),
    (10.0, None, True),           # nothing measured yet: try, the commit is atomic
    (-1.0, None, False),          # the deadline has passed
    (15.0, 10.0, True),           # exactly the margin
    (14.9, 10.0, False),
    (0.0, 0.0, True),
])
def test_final_save_fits(left, last, fits):
    assert SAVE_MARGIN == 1.5
    assert final_save_fits(left, last) is fits


class _Loader:
    def get_state(self):
        return {"position": 7}


def _files(tmp_path, grace):
    cfg = load_config(REPO / "configs" / "demo.yaml", [
        f"trainer.run_dir={tmp_path}", f"trainer.preemption_grace_s={grace}"])
    store = CheckpointStore(tmp_path / "checkpoints", async_save=True)
    return RunFiles(cfg=cfg, run_dir=tmp_path, model_config=TINY, writer=None, store=store,
                    total_steps=10)


def _state(step, value):
    return TrainState(params={"w": jnp.full((4, 4), float(value))},
                      opt_state={"mu": jnp.zeros((4, 4))}, loader=_Loader(), step=step)


def _signalled():
    stop = StopSignal()
    stop.interrupt = False
    stop._handle(signal.SIGTERM, None)
    return stop


@pytest.mark.parametrize("grace,saved", [("null", True), (3600, True), (1e-9, False)])
def test_save_on_stop_saves_or_keeps_the_last_committed(tmp_path, grace, saved):
    files = _files(tmp_path, grace)
    files.store.save(2, {"params": {"w": jnp.ones((4, 4))}, "opt_state": {"mu": jnp.zeros((4, 4))}},
                     {"step": 2})   # the periodic save, still in flight
    lines = []
    save_on_stop(files, _state(3, 3.0), _signalled(), Console(lines.append))
    assert files.store.committed_steps() == ([2, 3] if saved else [2])
    assert files.store.save_seconds(2) > 0
    if not saved:
        assert len(lines) == 1 and lines[0].startswith("not saving step 3: 0.0 s of "
                                                       "trainer.preemption_grace_s=1e-09 are "
                                                       "left and the last save took "), lines
        assert lines[0].endswith(f"the last committed checkpoint, {tmp_path}/checkpoints/2, "
                                 "stays the one to resume from")
    files.store.close()


def test_a_stop_on_a_step_just_saved_saves_nothing_more(tmp_path):
    files = _files(tmp_path, 1e-9)
    files.store.save(3, {"params": {"w": jnp.ones((4, 4))}, "opt_state": {"mu": jnp.zeros((4, 4))}},
                     {"step": 3})
    lines = []
    save_on_stop(files, _state(3, 3.0), _signalled(), Console(lines.append))
    assert files.store.committed_steps() == [3] and lines == []
    files.store.close()


def test_the_stop_agreement_of_one_process_is_its_own_signal():
    assert StopSignal().agreed() is False
    stop = _signalled()
    assert stop.agreed() is True and stop.received == "SIGTERM" and 0.0 <= stop.waited() < 5


def test_a_checkpoint_from_before_yarn_names_the_rope_difference():
    """A checkpoint's meta written before Qwen2Config had `yarn` reads with its default
    (none); resumed under a YaRN config, the refusal names that field, not a KeyError."""
    import dataclasses

    from jaxzero.errors import CheckpointError
    from jaxzero.model.config import YarnScaling
    from jaxzero.rl.setup import _check_model_config
    old = {k: v for k, v in TINY.to_dict().items() if k != "yarn"}
    yarn = dataclasses.replace(TINY, yarn=YarnScaling(4.0, 16))
    _check_model_config({"model_config": old}, TINY, "ckpt")
    with pytest.raises(CheckpointError, match=r"another architecture: yarn: checkpoint None"):
        _check_model_config({"model_config": old}, yarn, "ckpt")
