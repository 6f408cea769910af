"""Step 3, PPO: math (pure functions), experience (batches), rollout (sources), trainer (one iteration),
ema, models (loading the four models), prompts, gold (the embedded task's judge) and step (run_ppo)."""
