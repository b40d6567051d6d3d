"""DiagnosisZero's task: RareArena data and prompts, the matching reward, response analysis,
the demo, and RareArena's LLM-judge evaluation. `task.make_task` hands it to the engine."""
