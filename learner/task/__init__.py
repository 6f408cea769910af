"""The embedded default task: a tiny world of questions, a hidden gold judge, noisy demonstrators, and
a tiny Llama pre-trained by the project, so RLHF can be seen working in minutes on a laptop CPU."""

from learner.task.demos import Demonstrator, embedded_samples, eval_prompts
from learner.task.evaluate import gold_of_checkpoint, greedy_answers, showcase_prompts
from learner.task.judge import GoldParts, gold_parts, gold_score
from learner.task.pretrain import MODEL_VERSION, default_model_path

__all__ = ["Demonstrator", "GoldParts", "MODEL_VERSION", "default_model_path", "embedded_samples", "eval_prompts",
           "gold_of_checkpoint", "gold_parts", "gold_score", "greedy_answers", "showcase_prompts"]
