"""The GRPO engine: pure loss math (`grpo`), the jitted step (`train_step`), rollouts, the
loop (`trainer`) and what builds it (`setup`, `run_dir`, `plan`). It imports no task: a task
hands it records, a reward and an eval through `task.Task`."""

from jaxzero.rl.task import Evaluation, Sample, Task, TaskFactory

__all__ = ["Evaluation", "Sample", "Task", "TaskFactory"]
